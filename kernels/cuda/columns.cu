// Column sums: out[c] = sum_r delta[r, c] (the bias gradient). A block of 32 x 32 threads owns 32
// columns: x picks the column (coalesced rows), y a fixed stride of rows; the 32 partial sums of a
// column are then added in a fixed order. Deterministic, no atomics.
//
// Where the column tiles alone would not fill the device, the rows are split into chunks of
// `chunk_rows` (launch.py: a grid of (column tiles, row chunks)): block (x, y) writes the sums of chunk y
// to partial[y * cols + c] in the compute type, and column_sums_of_partials adds each column's chunk
// sums in chunk order, the same way. With one chunk (gridDim.y == 1) column_sums writes out itself.
//
// Over a stack (common.cuh): delta (rows, cols) and out (cols,) per member at their member strides,
// partial (chunks, cols) per member, contiguous. A member's rows are chunked as a 2-D call's (launch.py),
// so member k's sums are bias_grad's of its matrix, bit for bit.

// out[c] for the columns of this block's tiles, summed over rows [begin, end) of `matrix`
template <typename In, typename Out>
__device__ __forceinline__ void sum_column_tiles(const In* matrix, Out* out, long long begin, long long end,
                                                 long long cols) {
    using A = acc_t<In>;
    __shared__ A partial[32][33];  // 33: no bank conflicts when a column's partials are read
    for (long long c0 = static_cast<long long>(blockIdx.x) * 32; c0 < cols; c0 += static_cast<long long>(gridDim.x) * 32) {
        const long long c = c0 + threadIdx.x;
        A sum = 0;
        if (c < cols) {
            for (long long r = begin + threadIdx.y; r < end; r += blockDim.y) sum += load(matrix, r * cols + c);
        }
        partial[threadIdx.y][threadIdx.x] = sum;
        __syncthreads();
        if (threadIdx.y == 0 && c < cols) {
            A total = partial[0][threadIdx.x];
            for (int y = 1; y < static_cast<int>(blockDim.y); ++y) total += partial[y][threadIdx.x];
            out[c] = store<Out>(total);
        }
        __syncthreads();  // partial is rewritten by the next tile
    }
}

// The first pass: the sums of row chunk blockIdx.y, into out (one chunk) or partial (several)
template <typename T>
__global__ void column_sums(const T* delta, T* out, acc_t<T>* partial, long long members, long long rows,
                            long long cols, long long chunk_rows, long long delta_stride, long long out_stride) {
    const long long begin = static_cast<long long>(blockIdx.y) * chunk_rows;
    const long long end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
    for_each_member(members, [&](long long k) {
        const T* const delta_k = delta + k * delta_stride;
        if (gridDim.y == 1) {
            sum_column_tiles(delta_k, out + k * out_stride, 0, rows, cols);
        } else {
            const long long chunk = k * gridDim.y + blockIdx.y;
            sum_column_tiles(delta_k, partial + chunk * cols, begin, end, cols);
        }
    });
}

// The second pass: out[c] = sum over the chunks of partial[chunk, c], in chunk order, per member
template <typename T>
__global__ void column_sums_of_partials(const acc_t<T>* partial, T* out, long long members, long long chunks,
                                        long long cols, long long out_stride) {
    for_each_member(members, [&](long long k) {
        sum_column_tiles(partial + k * chunks * cols, out + k * out_stride, 0, chunks, cols);
    });
}
