// Column sums: out[c] = sum_r delta[r, c] (the bias gradient). A block of 32 x 32 threads owns 32
// columns: x picks the column (coalesced rows), y a fixed stride of rows; the 32 partial sums of a
// column are then added in a fixed order. Deterministic, no atomics.
template <typename T>
__global__ void column_sums(const T* delta, T* out, long long rows, long long cols) {
    using A = acc_t<T>;
    __shared__ A partial[32][33];  // 33: no bank conflicts when a column's partials are read
    for (long long c0 = static_cast<long long>(blockIdx.x) * 32; c0 < cols; c0 += static_cast<long long>(gridDim.x) * 32) {
        const long long c = c0 + threadIdx.x;
        A sum = 0;
        if (c < cols) {
            for (long long r = threadIdx.y; r < rows; r += blockDim.y) sum += load(delta, r * cols + c);
        }
        partial[threadIdx.y][threadIdx.x] = sum;
        __syncthreads();
        if (threadIdx.y == 0 && c < cols) {
            A total = partial[0][threadIdx.x];
            for (int y = 1; y < static_cast<int>(blockDim.y); ++y) total += partial[y][threadIdx.x];
            out[c] = store<T>(total);
        }
        __syncthreads();  // partial is rewritten by the next tile
    }
}
