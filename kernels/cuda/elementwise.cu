// The fused elementwise kernels of the layer loop, over a stack of members (common.cuh: a 2-D call is a
// stack of one). Act is a generated activation functor (act_<name>, from the activation table) with
// forward(z) and derivative(z) in the compute type.

// z = acc + b (b broadcast over rows); a = act(z), per member. acc, z, a: (rows, cols) C-contiguous per
// member; b: (cols,) per member; each at its own member stride. z may be acc, and a may be z (in place:
// a overwrites z). A 2-D grid-stride loop per member: x walks columns, y walks rows, so the bias index
// needs no division.
template <typename T, typename Act>
__global__ void bias_act(const T* acc, const T* b, T* z, T* a, long long members, long long rows, long long cols,
                         long long acc_stride, long long b_stride, long long z_stride, long long a_stride) {
    const long long col0 = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long col_step = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long row0 = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y;
    const long long row_step = static_cast<long long>(gridDim.y) * blockDim.y;
    for_each_member(members, [&](long long k) {
        const T* const acc_k = acc + k * acc_stride;
        const T* const b_k = b + k * b_stride;
        T* const z_k = z + k * z_stride;
        T* const a_k = a + k * a_stride;
        for (long long r = row0; r < rows; r += row_step) {
            for (long long c = col0; c < cols; c += col_step) {
                const long long i = r * cols + c;
                const T zt = store<T>(load(acc_k, i) + load(b_k, c));
                z_k[i] = zt;
                a_k[i] = store<T>(Act::forward(static_cast<acc_t<T>>(zt)));  // act of the stored z, as the reference
            }
        }
    });
}

// out = g * act'(z) over n elements per member, by 16-byte chunks (common.cuh); out may be g (in place).
template <typename T, typename Act>
__global__ void act_backward(const T* g, const T* z, T* out, long long members, long long n, long long g_stride,
                             long long z_stride, long long out_stride) {
    using A = acc_t<T>;
    constexpr int V = vector_width<T>;
    for_each_member(members, [&](long long k) {
        const T* const g_k = g + k * g_stride;
        const T* const z_k = z + k * z_stride;
        T* const out_k = out + k * out_stride;
        for_each_grid_chunk<T>(n, [&](long long i, int m) {
            A gi[V], zi[V];
            load_chunk(g_k + i, m, gi);
            load_chunk(z_k + i, m, zi);
            for_each_element<V>(m, [&](int j) { gi[j] *= Act::derivative(zi[j]); });
            store_chunk(out_k + i, m, gi);
        });
    });
}
