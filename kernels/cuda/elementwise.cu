// The fused elementwise kernels of the layer loop. Act is a generated activation functor (act_<name>,
// from the activation table) with forward(z) and derivative(z) in the compute type.

// z = acc + b (b broadcast over rows); a = act(z). acc, z, a: (rows, cols) C-contiguous; b: (cols,).
// z may be acc, and a may be z (in place: a overwrites z). A 2-D grid-stride loop:
// x walks columns, y walks rows, so the bias index needs no division.
template <typename T, typename Act>
__global__ void bias_act(const T* acc, const T* b, T* z, T* a, long long rows, long long cols) {
    const long long col0 = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long col_step = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long row0 = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y;
    const long long row_step = static_cast<long long>(gridDim.y) * blockDim.y;
    for (long long r = row0; r < rows; r += row_step) {
        for (long long c = col0; c < cols; c += col_step) {
            const long long i = r * cols + c;
            const T zt = store<T>(load(acc, i) + load(b, c));
            z[i] = zt;
            a[i] = store<T>(Act::forward(static_cast<acc_t<T>>(zt)));  // act of the stored z, as the reference
        }
    }
}

// out = g * act'(z) over n elements, by 16-byte chunks (common.cuh); out may be g (in place).
template <typename T, typename Act>
__global__ void act_backward(const T* g, const T* z, T* out, long long n) {
    using A = acc_t<T>;
    constexpr int V = vector_width<T>;
    for_each_grid_chunk<T>(n, [&](long long i, int k) {
        A gi[V], zi[V];
        load_chunk(g + i, k, gi);
        load_chunk(z + i, k, zi);
        for_each_element<V>(k, [&](int j) { gi[j] *= Act::derivative(zi[j]); });
        store_chunk(out + i, k, gi);
    });
}
