// What every deltaprop CUDA module shares: the compute type per storage type, conversions, special
// values, chunks (16-byte vector loads and stores), the teams that own a row of a row-wise kernel, and
// the targets of the loss kernels.
//
// The loader (loader.py) prepends this file and the generated activation functors to each *.cu file,
// so that a module's source text is complete: CuPy's kernel cache is keyed by that text.
// NVRTC defines neither INFINITY nor NAN: special values are built from their bit patterns.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// ---- the compute type: float for float and the 16-bit types, double for double --------------------

template <typename T> struct Accum { using type = float; };
template <> struct Accum<double> { using type = double; };
template <typename T> using acc_t = typename Accum<T>::type;

template <typename T> __device__ __forceinline__ acc_t<T> load(const T* p, long long i) {
    return static_cast<acc_t<T>>(p[i]);
}
template <typename T> __device__ __forceinline__ T store(acc_t<T> v) { return static_cast<T>(v); }

template <typename A> __device__ __forceinline__ A infinity();
template <> __device__ __forceinline__ float infinity<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double infinity<double>() {
    return __longlong_as_double(0x7ff0000000000000LL);
}
template <typename A> __device__ __forceinline__ A quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
    return __longlong_as_double(0x7ff8000000000000LL);
}

// ---- grid-stride loops over 64-bit index ranges ----------------------------------------------------

__device__ __forceinline__ long long global_thread() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_threads() {
    return static_cast<long long>(gridDim.x) * blockDim.x;
}

// ---- stacks: K members, member k of an array at k * (that array's member stride) elements --------------
//
// A kernel over a stack takes a member count and one member stride per array (0: every member reads the
// same data; a 2-D call is a stack of one). blockIdx.z walks the members, gridDim.z apart (gridDim.z is
// at most 65535), unless the kernel folds the members into its rows.

// f(k) for this block's members k of [0, members)
template <typename F> __device__ __forceinline__ void for_each_member(long long members, F f) {
    for (long long k = blockIdx.z; k < members; k += gridDim.z) f(k);
}

// ---- chunks: V consecutive elements, moved as one 16-byte vector where the address allows ------------
//
// A vectorised kernel splits a range (a row, a flat buffer) into chunks of V elements counted from the
// range's start, V = vector_width<T> (4 floats, 2 doubles, 8 halves or bfloat16s); the last chunk may
// be shorter. A whole chunk whose address is 16-byte aligned is one vector access (ld.global.v4.f32,
// .v2.f64, .v4.u32); any other chunk is V element accesses. Which thread handles which elements, and
// in which order, does not depend on the address: results are bitwise the same either way.

template <typename T> constexpr int vector_width = 16 / sizeof(T);

template <typename T, int V> struct alignas(16) Packed {
    static_assert(V * sizeof(T) % 16 == 0, "a packed chunk is whole 16-byte vectors");
    T v[V];
};

template <typename T> __device__ __forceinline__ bool aligned16(const T* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15) == 0;
}

// f(j) for j in [0, n), n <= V; unrolled over V, so that a chunk's arrays stay in registers
template <int V, typename F> __device__ __forceinline__ void for_each_element(int n, F f) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
        if (j < n) f(j);
    }
}

// v[0, n) = p[0, n) in the compute type (v[n, V) is not written)
template <int V, typename T> __device__ __forceinline__ void load_chunk(const T* p, int n, acc_t<T> (&v)[V]) {
    if constexpr (V > 1) {
        if (n == V && aligned16(p)) {
            const Packed<T, V> packed = *reinterpret_cast<const Packed<T, V>*>(p);
            for_each_element<V>(V, [&](int j) { v[j] = static_cast<acc_t<T>>(packed.v[j]); });
            return;
        }
    }
    for_each_element<V>(n, [&](int j) { v[j] = load(p, j); });
}

// p[0, n) = v[0, n) in the storage type
template <int V, typename T> __device__ __forceinline__ void store_chunk(T* p, int n, const acc_t<T> (&v)[V]) {
    if constexpr (V > 1) {
        if (n == V && aligned16(p)) {
            Packed<T, V> packed;
            for_each_element<V>(V, [&](int j) { packed.v[j] = store<T>(v[j]); });
            *reinterpret_cast<Packed<T, V>*>(p) = packed;
            return;
        }
    }
    for_each_element<V>(n, [&](int j) { p[j] = store<T>(v[j]); });
}

// f(c, n) for the chunks [c, c + n) of [0, count) that start at first * V, (first + step) * V, ..., in order
template <int V, typename F>
__device__ __forceinline__ void for_each_chunk(long long count, long long first, long long step, F f) {
    for (long long c = first * V; c < count; c += step * V) f(c, count - c < V ? static_cast<int>(count - c) : V);
}

// f(i, k) for this thread's chunks [i, i + k) of a flat buffer of n elements of T: a grid-stride loop
// that gives consecutive threads consecutive 16-byte chunks
template <typename T, typename F> __device__ __forceinline__ void for_each_grid_chunk(long long n, F f) {
    for_each_chunk<vector_width<T>>(n, global_thread(), grid_threads(), f);
}

struct Sum {
    template <typename A> __device__ __forceinline__ A operator()(A x, A y) const { return x + y; }
};
struct Max {
    template <typename A> __device__ __forceinline__ A operator()(A x, A y) const { return x > y ? x : y; }
};

// ---- teams: who works on one row of a row-wise kernel ----------------------------------------------
//
// A team walks rows [begin, rows) in steps of `step`; its row is `base + offset`. A lane owns the row's
// chunks lane, lane + size, ... of chunk<T> elements: 16 bytes for a warp or a block per row, one element
// for narrower teams (rows of at most 16 elements gain nothing from vectors). Every lane of a warp
// runs the same number of iterations (the shuffles below need the whole warp), so a lane whose row is
// past the end works on the last row again and writes nothing (`valid` is false). Reductions are fixed
// trees of shuffles (and, for a block, a fixed-order pass over the warps' results): deterministic.

// W lanes per row (W a power of two up to 32): 32 / W rows per warp for short rows, a warp per row at W = 32.
template <int W> struct GroupTeam {
    static constexpr int rows_per_warp = 32 / W;
    template <typename T> static constexpr int chunk = W == 32 ? vector_width<T> : 1;
    __device__ static int lane() { return threadIdx.x & (W - 1); }
    __device__ static int size() { return W; }
    __device__ static long long begin() { return (global_thread() / 32) * rows_per_warp; }
    __device__ static long long step() { return (grid_threads() / 32) * rows_per_warp; }
    __device__ static long long offset() { return (threadIdx.x & 31) / W; }
    template <typename A> __device__ static A* row_cache(int) { return nullptr; }
    template <typename A, typename Op> __device__ static A reduce(A v, Op op) {
        for (int delta = W / 2; delta > 0; delta /= 2) {
            v = op(v, __shfl_xor_sync(0xffffffffu, v, delta, W));
        }
        return v;
    }
};

// A block per row (blockDim.x a multiple of 32). With `cache` set, each lane keeps the row elements it
// reads in dynamic shared memory (cols values of the compute type, at their column), so later passes
// skip global memory.
struct BlockTeam {
    template <typename T> static constexpr int chunk = vector_width<T>;
    __device__ static int lane() { return threadIdx.x; }
    __device__ static int size() { return blockDim.x; }
    __device__ static long long begin() { return blockIdx.x; }
    __device__ static long long step() { return gridDim.x; }
    __device__ static long long offset() { return 0; }
    template <typename A> __device__ static A* row_cache(int cache) {
        extern __shared__ __align__(16) unsigned char dynamic_shared[];  // whole chunks go as vectors
        return cache ? reinterpret_cast<A*>(dynamic_shared) : nullptr;
    }
    template <typename A, typename Op> __device__ static A reduce(A v, Op op) {
        __shared__ A per_warp[32];
        v = GroupTeam<32>::reduce(v, op);
        __syncthreads();  // per_warp may still be read by the previous reduction
        if ((threadIdx.x & 31) == 0) per_warp[threadIdx.x / 32] = v;
        __syncthreads();
        A total = per_warp[0];
        for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) total = op(total, per_warp[w]);
        return total;
    }
};

// ---- targets of the loss kernels: one row's targets t_c, built for a row of a member ---------------------
//
// Built from (targets, member_at, row, cols): member_at is where the member's targets start (its index
// times the targets' member stride). load(c, n, v): v[0, n) = t_c .. t_{c+n-1}, a chunk of the row's
// targets in the compute type.

// int64 class labels (B,) per member: t_c = (c == label). A label outside [0, C) makes the row's loss NaN.
template <typename T> struct LabelTargets {
    long long label;
    __device__ LabelTargets(const void* targets, long long member_at, long long row, long long) :
        label(static_cast<const long long*>(targets)[member_at + row]) {}
    __device__ bool valid(long long cols) const { return 0 <= label && label < cols; }
    template <int V> __device__ void load(long long c, int n, acc_t<T> (&v)[V]) const {
        for_each_element<V>(n, [&](int j) { v[j] = c + j == label ? acc_t<T>(1) : acc_t<T>(0); });
    }
};

// a (B, C) target matrix per member in the storage type
template <typename T> struct MatrixTargets {
    const T* row_targets;
    __device__ MatrixTargets(const void* targets, long long member_at, long long row, long long cols) :
        row_targets(static_cast<const T*>(targets) + member_at + row * cols) {}
    __device__ bool valid(long long) const { return true; }
    template <int V> __device__ void load(long long c, int n, acc_t<T> (&v)[V]) const {
        load_chunk(row_targets + c, n, v);
    }
};

// no targets: the row softmax itself (t = 0, scale 1)
template <typename T> struct NoTargets {
    __device__ NoTargets(const void*, long long, long long, long long) {}
    __device__ bool valid(long long) const { return true; }
    template <int V> __device__ void load(long long, int n, acc_t<T> (&v)[V]) const {
        for_each_element<V>(n, [&](int j) { v[j] = acc_t<T>(0); });
    }
};
