// Row-wise kernels: the row softmax and the three losses. Team (GroupTeam<W> or BlockTeam, common.cuh)
// says who owns a row; Targets (LabelTargets, MatrixTargets, NoTargets) what a row's targets are.
// Each loss writes one loss per row into row_loss (compute type); mean_of_rows then reduces them in a
// second, deterministic step: no atomics anywhere.
//
// Over a stack (common.cuh), the members' rows are one range: row R of the stack is row R % rows of
// member R / rows, which starts at member * (the array's member stride) + row * cols of each array;
// row_loss is contiguous, members * rows values. A 2-D call is a stack of one.

// Row `stacked` of a stack of members of `rows` rows each: its member and its row in that member
struct StackRow {
    long long member, row;
    __device__ StackRow(long long stacked, long long rows) : member(stacked / rows), row(stacked - member * rows) {}
    // where the row starts in an array of rows of `cols` elements at member stride `stride`
    __device__ long long at(long long stride, long long cols) const { return member * stride + row * cols; }
};

// f(valid, stacked, place) for each row `stacked` of the stack (at `place`) that this team owns; a lane past
// the end works on the last row with `valid` false (common.cuh: every lane of a warp walks as many rows)
template <typename Team, typename F>
__device__ __forceinline__ void for_each_team_row(long long members, long long rows, F f) {
    const long long stack_rows = members * rows;
    for (long long base = Team::begin(); base < stack_rows; base += Team::step()) {
        const bool valid = base + Team::offset() < stack_rows;
        const long long stacked = valid ? base + Team::offset() : stack_rows - 1;
        f(valid, stacked, StackRow(stacked, rows));
    }
}

// delta = (softmax(z) - t) * scale and row_loss = sum_c t_c (logsumexp(z) - z_c), per row; either
// output may be null. With NoTargets and scale 1, delta is softmax(z). Three passes over the row:
// max, sum of exp(z - max), then the outputs; stable for any finite z. Each lane reads and writes its
// chunks of the row (common.cuh), as 16-byte vectors where they are aligned.
template <typename T, typename Targets, typename Team>
__global__ void softmax_rows(const T* z, const void* targets, T* delta, acc_t<T>* row_loss, long long members,
                             long long rows, long long cols, long long z_stride, long long targets_stride,
                             long long delta_stride, acc_t<T> scale, int cache) {
    using A = acc_t<T>;
    constexpr int V = Team::template chunk<T>;
    A* cached = Team::template row_cache<A>(cache);
    for_each_team_row<Team>(members, rows, [&](bool valid, long long stacked, const StackRow& place) {
        const T* zr = z + place.at(z_stride, cols);
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

        const Targets t(targets, place.member * targets_stride, place.row, cols);
        const A log_sum = log(sum);
        const A inv_sum = A(1) / sum;
        T* const delta_row = valid && delta ? delta + place.at(delta_stride, cols) : nullptr;
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
        if (valid && row_loss && Team::lane() == 0) row_loss[stacked] = t.valid(cols) ? loss : quiet_nan<A>();
    });
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
                                      long long members, long long rows, long long cols, long long y_stride,
                                      long long targets_stride, long long delta_stride, acc_t<T> scale) {
    using A = acc_t<T>;
    constexpr int V = Team::template chunk<T>;
    for_each_team_row<Team>(members, rows, [&](bool valid, long long stacked, const StackRow& place) {
        const T* yr = y + place.at(y_stride, cols);
        const Targets t(targets, place.member * targets_stride, place.row, cols);
        T* const delta_row = valid && delta ? delta + place.at(delta_stride, cols) : nullptr;
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
        if (valid && Team::lane() == 0) row_loss[stacked] = t.valid(cols) ? loss : quiet_nan<A>();
    });
}

// out[k] = mean of member k's row losses, row_loss[k * rows .. (k + 1) * rows): a block per member (blocks
// gridDim.x apart), each thread summing a fixed stride, then a fixed tree: member k's mean is a 2-D call's
// on its rows, bit for bit.
template <typename T>
__global__ void mean_of_rows(const acc_t<T>* row_loss, long long members, long long rows, acc_t<T>* out) {
    using A = acc_t<T>;
    for (long long k = blockIdx.x; k < members; k += gridDim.x) {
        const acc_t<T>* const member_loss = row_loss + k * rows;
        A sum = 0;
        for (long long i = threadIdx.x; i < rows; i += blockDim.x) sum += member_loss[i];
        sum = BlockTeam::reduce(sum, Sum());  // begins with a barrier: the last member's reads are done
        if (threadIdx.x == 0) out[k] = sum / static_cast<A>(rows);
    }
}
