// Row-wise kernels: the row softmax and the three losses. Team (GroupTeam<W> or BlockTeam, common.cuh)
// says who owns a row; Targets (LabelTargets, MatrixTargets, NoTargets) what a row's targets are.
// Each loss writes one loss per row into row_loss (compute type); mean_of_rows then reduces them in a
// second, deterministic step: no atomics anywhere.

// delta = (softmax(z) - t) * scale and row_loss = sum_c t_c (logsumexp(z) - z_c), per row; either
// output may be null. With NoTargets and scale 1, delta is softmax(z). Three passes over the row:
// max, sum of exp(z - max), then the outputs; stable for any finite z. Each lane reads and writes its
// chunks of the row (common.cuh), as 16-byte vectors where they are aligned.
template <typename T, typename Targets, typename Team>
__global__ void softmax_rows(const T* z, const void* targets, T* delta, acc_t<T>* row_loss,
                             long long rows, long long cols, acc_t<T> scale, int cache) {
    using A = acc_t<T>;
    constexpr int V = Team::template chunk<T>;
    A* cached = Team::template row_cache<A>(cache);
    for (long long base = Team::begin(); base < rows; base += Team::step()) {
        const bool valid = base + Team::offset() < rows;
        const long long row = valid ? base + Team::offset() : rows - 1;
        const T* zr = z + row * cols;
        // the chunk [c, c + n) of z's row after the first pass: from shared memory where it was kept
        const auto reread = [&](long long c, int n, A (&v)[V]) {
            if (cached) {
                load_chunk(cached + c, n, v);
            } else {
                load_chunk(zr + c, n, v);
            }
        };

        A row_max = -infinity<A>();
        for_each_chunk<V>(cols, Team::lane(), Team::size(), [&](long long c, int n) {
            A v[V];
            load_chunk(zr + c, n, v);
            if (cached) store_chunk(cached + c, n, v);  // each lane reads back only what it wrote: no barrier needed
            for_each_element<V>(n, [&](int j) { row_max = Max()(row_max, v[j]); });
        });
        row_max = Team::reduce(row_max, Max());

        A sum = 0;
        for_each_chunk<V>(cols, Team::lane(), Team::size(), [&](long long c, int n) {
            A v[V];
            reread(c, n, v);
            for_each_element<V>(n, [&](int j) { sum += exp(v[j] - row_max); });
        });
        sum = Team::reduce(sum, Sum());

        const Targets t(targets, row, cols);
        const A log_sum = log(sum);
        const A inv_sum = A(1) / sum;
        T* const delta_row = valid && delta ? delta + row * cols : nullptr;
        A loss = 0;
        for_each_chunk<V>(cols, Team::lane(), Team::size(), [&](long long c, int n) {
            A v[V], tc[V], out[V];
            reread(c, n, v);
            t.load(c, n, tc);
            for_each_element<V>(n, [&](int j) {
                const A shifted = v[j] - row_max;
                loss += tc[j] * (log_sum - shifted);
                if (delta_row) out[j] = (exp(shifted) * inv_sum - tc[j]) * scale;
            });
            if (delta_row) store_chunk(delta_row + c, n, out);
        });
        loss = Team::reduce(loss, Sum());
        if (valid && row_loss && Team::lane() == 0) row_loss[row] = t.valid(cols) ? loss : quiet_nan<A>();
    }
}

// The losses whose terms are elementwise in (y, t): value(y, t) summed over the row, delta(y, t).
struct SigmoidXent {  // y are logits: -[t log s + (1 - t) log(1 - s)] = softplus(y) - t y
    template <typename A> __device__ static A value(A y, A t) { return act_softplus::forward(y) - t * y; }
    template <typename A> __device__ static A delta(A y, A t) { return act_sigmoid::forward(y) - t; }
};
struct SquaredError {  // 1/2 (y - t)^2
    template <typename A> __device__ static A value(A y, A t) { return A(0.5) * (y - t) * (y - t); }
    template <typename A> __device__ static A delta(A y, A t) { return y - t; }
};

// delta = Loss::delta(y, t) * scale and row_loss = sum_c Loss::value(y_c, t_c), per row; delta may be
// null. One pass over the row, by chunks as softmax_rows.
template <typename T, typename Loss, typename Targets, typename Team>
__global__ void elementwise_loss_rows(const T* y, const void* targets, T* delta, acc_t<T>* row_loss,
                                      long long rows, long long cols, acc_t<T> scale) {
    using A = acc_t<T>;
    constexpr int V = Team::template chunk<T>;
    for (long long base = Team::begin(); base < rows; base += Team::step()) {
        const bool valid = base + Team::offset() < rows;
        const long long row = valid ? base + Team::offset() : rows - 1;
        const T* yr = y + row * cols;
        const Targets t(targets, row, cols);
        T* const delta_row = valid && delta ? delta + row * cols : nullptr;
        A loss = 0;
        for_each_chunk<V>(cols, Team::lane(), Team::size(), [&](long long c, int n) {
            A yc[V], tc[V], out[V];
            load_chunk(yr + c, n, yc);
            t.load(c, n, tc);
            for_each_element<V>(n, [&](int j) {
                loss += Loss::value(yc[j], tc[j]);
                if (delta_row) out[j] = Loss::delta(yc[j], tc[j]) * scale;
            });
            if (delta_row) store_chunk(delta_row + c, n, out);
        });
        loss = Team::reduce(loss, Sum());
        if (valid && Team::lane() == 0) row_loss[row] = t.valid(cols) ? loss : quiet_nan<A>();
    }
}

// out[0] = mean of row_loss[0 .. rows): one block, each thread summing a fixed stride, then a fixed tree.
template <typename T>
__global__ void mean_of_rows(const acc_t<T>* row_loss, long long rows, acc_t<T>* out) {
    using A = acc_t<T>;
    A sum = 0;
    for (long long i = threadIdx.x; i < rows; i += blockDim.x) sum += row_loss[i];
    sum = BlockTeam::reduce(sum, Sum());
    if (threadIdx.x == 0) out[0] = sum / static_cast<A>(rows);
}
