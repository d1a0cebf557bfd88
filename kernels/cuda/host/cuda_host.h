// CUDA's device-side language on the host CPU, so that the project's .cu sources compile with g++ (C++17)
// and run with CUDA's semantics: a host thread per CUDA thread, blocks one after another.
//
// - threadIdx, blockIdx, blockDim, gridDim are per host thread; warpSize is 32 and a warp is 32
//   consecutive threads of the block (x fastest).
// - __syncthreads() is a barrier across every thread of the block. Threads that wait at different
//   __syncthreads, or wait while another thread has returned, are a fault naming the kernel and the
//   threads (CUDA: undefined behaviour, usually a hang).
// - Shuffles and votes exchange values among the lanes of the mask in lockstep; a mask that does not
//   name the calling lane, names a lane that does not exist, differs between the lanes that meet, or names
//   a lane that never arrives is a fault (counting, not a timeout: when every thread of a block waits, the
//   block is stuck).
// - __shared__ variables are per block and exact-size (the driver rewrites their declarations into
//   dp::shared<T>(key) and extern __shared__ into dp::dynamic_shared()); they start filled with 0xff
//   bytes (NaN in every float type) so that a read of a value no thread wrote shows.
// - A 16-byte vector access (float4, double2, a struct alignas(16)) at an address that is not a multiple
//   of 16 is a fault naming the kernel and the thread (the harness is built with -fsanitize=alignment and
//   its handler is here; the ASan/UBSan build uses UBSan's own report instead).
// - __half is _Float16 and __nv_bfloat16 a 16-bit struct; conversions from float round to nearest even.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
// every __shared__ declaration is rewritten by the driver; one left over is an error, not a silent static
#define __shared__ static_assert(false, "a __shared__ declaration the host harness cannot rewrite");

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace dp {

struct Site {
    const char* file;
    int line;
};

// the CUDA thread this host thread runs now
struct ThreadContext {
    uint3 thread_idx{0, 0, 0};
    uint3 block_idx{0, 0, 0};
    dim3 block_dim, grid_dim;
    unsigned int linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
};
extern thread_local ThreadContext current;

void syncthreads(Site site);
// lane values of one warp operation: every lane of `mask` contributes `value`; returns all 32 slots
const uint64_t* warp_exchange(unsigned int mask, uint64_t value, Site site, const char* operation);
void* shared_variable(const void* key, size_t bytes, size_t alignment);
void* dynamic_shared();
[[noreturn]] void trap(const char* what);

template <typename T> T& shared(const void* key) {
    return *static_cast<T*>(shared_variable(key, sizeof(T), alignof(T)));
}

template <typename T> uint64_t to_slot(T value) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "a shuffled value is at most 8 bytes");
    uint64_t slot = 0;
    memcpy(&slot, &value, sizeof(T));
    return slot;
}
template <typename T> T from_slot(uint64_t slot) {
    T value;
    memcpy(&value, &slot, sizeof(T));
    return value;
}

inline unsigned int lane_id() { return current.linear & 31; }

// PTX shfl.sync: the source lane j of each mode, with c = ((32 - width) << 8) | clamp
enum class Shuffle { idx, up, down, bfly };
template <typename T>
T shuffle(Shuffle mode, unsigned int mask, T var, int b, int width, Site site, const char* operation) {
    const unsigned int lane = lane_id();
    const unsigned int segmask = (32u - static_cast<unsigned int>(width)) & 31u;
    const unsigned int clamp = mode == Shuffle::up ? 0u : 31u;
    const unsigned int max_lane = (lane & segmask) | (clamp & ~segmask);
    unsigned int j = lane;
    const unsigned int operand = static_cast<unsigned int>(b);
    switch (mode) {
    case Shuffle::idx: j = (lane & segmask) | (operand & 31u & ~segmask); break;
    case Shuffle::up: j = lane - operand; break;
    case Shuffle::down: j = lane + operand; break;
    case Shuffle::bfly: j = lane ^ operand; break;
    }
    const bool in_range = mode == Shuffle::up ? static_cast<int>(j) >= static_cast<int>(max_lane) : j <= max_lane;
    const uint64_t* slots = warp_exchange(mask, to_slot(var), site, operation);
    if (!in_range) return var;
    if (!(mask >> j & 1u)) trap("a shuffle reads a lane outside its mask (the value is undefined)");
    return from_slot<T>(slots[j]);
}

// ---- 16-bit floats -----------------------------------------------------------------------------------

inline uint16_t bfloat16_bits(float f) {  // round to nearest even; NaN stays a quiet NaN
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

// launching: the argument array of cuLaunchKernel (a pointer to each argument's value) unpacked into
// the kernel's parameters, then the kernel run by every thread of every block
struct Launch {
    dim3 grid, block;
    size_t dynamic_shared_bytes;
};
using ThreadBody = void (*)(const void* closure);
// 0 when the grid ran; else the fault (dp_last_error)
int run_grid(const char* kernel, const Launch& launch, ThreadBody body, const void* closure);

template <typename... Params> struct Bound {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> args;
    static void run(const void* closure) {
        const Bound* self = static_cast<const Bound*>(closure);
        std::apply(self->kernel, self->args);
    }
};

template <typename... Params, size_t... I>
Bound<Params...> bind(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
    return Bound<Params...>{kernel, {*static_cast<std::decay_t<Params>*>(args[I])...}};
}

template <typename... Params>
int launch(void (*kernel)(Params...), const char* name, const Launch& config, void** args) {
    const auto bound = bind(kernel, args, std::index_sequence_for<Params...>{});
    return run_grid(name, config, &Bound<Params...>::run, &bound);
}

// ---- the kernel's C signature, for the driver's argument checks: "const float*,long long,float" ----

template <typename T> struct TypeName { static constexpr const char* value = "?"; };
#define DP_TYPE_NAME(type, name) template <> struct TypeName<type> { static constexpr const char* value = name; };

template <typename T> void append_type(char* out) {
    if constexpr (std::is_pointer_v<T>) {
        using Pointee = std::remove_pointer_t<T>;
        if constexpr (std::is_const_v<Pointee>) strcat(out, "const ");
        strcat(out, TypeName<std::remove_cv_t<Pointee>>::value);
        strcat(out, "*");
    } else {
        strcat(out, TypeName<std::remove_cv_t<T>>::value);
    }
}

template <typename... Params> const char* signature(void (*)(Params...)) {
    static char text[1024];
    if (!text[0]) {
        int index = 0;
        ((index++ ? strcat(text, ",") : text, append_type<Params>(text)), ...);
        if (!text[0]) strcpy(text, " ");
    }
    return text;
}

}  // namespace dp

#define threadIdx (::dp::current.thread_idx)
#define blockIdx (::dp::current.block_idx)
#define blockDim (::dp::current.block_dim)
#define gridDim (::dp::current.grid_dim)
constexpr int warpSize = 32;

// the caller's file and line (GCC evaluates these builtins at the call site only as default arguments)
#define DP_CALLER const char* file = __builtin_FILE(), int line = __builtin_LINE()
#define DP_SITE ::dp::Site{file, line}

inline void __syncthreads(DP_CALLER) { dp::syncthreads(DP_SITE); }
inline void __syncwarp(unsigned int mask = 0xffffffffu, DP_CALLER) {
    dp::warp_exchange(mask, 0, DP_SITE, "__syncwarp");
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T> T __shfl_sync(unsigned int mask, T var, int src, int width = 32, DP_CALLER) {
    return dp::shuffle(dp::Shuffle::idx, mask, var, src, width, DP_SITE, "__shfl_sync");
}
template <typename T> T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32, DP_CALLER) {
    return dp::shuffle(dp::Shuffle::up, mask, var, static_cast<int>(delta), width, DP_SITE, "__shfl_up_sync");
}
template <typename T> T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32, DP_CALLER) {
    return dp::shuffle(dp::Shuffle::down, mask, var, static_cast<int>(delta), width, DP_SITE, "__shfl_down_sync");
}
template <typename T> T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32, DP_CALLER) {
    return dp::shuffle(dp::Shuffle::bfly, mask, var, lane_mask, width, DP_SITE, "__shfl_xor_sync");
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate, DP_CALLER) {
    const uint64_t* slots = dp::warp_exchange(mask, predicate != 0, DP_SITE, "__ballot_sync");
    unsigned int ballot = 0;
    for (unsigned int lane = 0; lane < 32; ++lane) {
        if (mask >> lane & 1u) ballot |= static_cast<unsigned int>(slots[lane] != 0) << lane;
    }
    return ballot;
}
inline int __all_sync(unsigned int mask, int predicate, DP_CALLER) {
    return __ballot_sync(mask, predicate, file, line) == mask;
}
inline int __any_sync(unsigned int mask, int predicate, DP_CALLER) {
    return __ballot_sync(mask, predicate, file, line) != 0;
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x ? __builtin_clz(static_cast<unsigned int>(x)) : 32; }

// ---- atomics: sequentially consistent read-modify-writes on plain memory ------------------------------

template <typename T> T __dp_atomic_update(T* address, T (*op)(T, T), T value) {
    T old;
    __atomic_load(address, &old, __ATOMIC_SEQ_CST);
    T next = op(old, value);
    while (!__atomic_compare_exchange(address, &old, &next, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        next = op(old, value);
    }
    return old;
}
template <typename T> T atomicAdd(T* address, T value) {
    return __dp_atomic_update<T>(address, [](T a, T b) { return a + b; }, value);
}
template <typename T> T atomicSub(T* address, T value) {
    return __dp_atomic_update<T>(address, [](T a, T b) { return a - b; }, value);
}
template <typename T> T atomicMax(T* address, T value) {
    return __dp_atomic_update<T>(address, [](T a, T b) { return a > b ? a : b; }, value);
}
template <typename T> T atomicMin(T* address, T value) {
    return __dp_atomic_update<T>(address, [](T a, T b) { return a < b ? a : b; }, value);
}
template <typename T> T atomicExch(T* address, T value) {
    return __dp_atomic_update<T>(address, [](T, T b) { return b; }, value);
}
template <typename T> T atomicCAS(T* address, T compare, T value) {
    __atomic_compare_exchange(address, &compare, &value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}

// ---- bit casts and intrinsics --------------------------------------------------------------------

template <typename To, typename From> inline To __dp_bit_cast(From from) {
    static_assert(sizeof(To) == sizeof(From));
    To to;
    memcpy(&to, &from, sizeof(To));
    return to;
}
inline float __int_as_float(int x) { return __dp_bit_cast<float>(x); }
inline float __uint_as_float(unsigned int x) { return __dp_bit_cast<float>(x); }
inline int __float_as_int(float x) { return __dp_bit_cast<int>(x); }
inline unsigned int __float_as_uint(float x) { return __dp_bit_cast<unsigned int>(x); }
inline double __longlong_as_double(long long x) { return __dp_bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return __dp_bit_cast<long long>(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
using std::max;
using std::min;

// ---- 16-bit floats -----------------------------------------------------------------------------------

using __half = _Float16;
struct __nv_bfloat16 {
    uint16_t bits;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : bits(dp::bfloat16_bits(f)) {}
    __nv_bfloat16(double d) : bits(dp::bfloat16_bits(static_cast<float>(d))) {}
    operator float() const { return __dp_bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
};
inline __half __float2half(float f) { return static_cast<__half>(f); }
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }

// ---- vector types, with CUDA's sizes and alignments ------------------------------------------------

#define DP_VECTOR2(name, type, align) \
    struct alignas(align) name { type x, y; }; \
    inline name make_##name(type x, type y) { return name{x, y}; }
#define DP_VECTOR4(name, type, align) \
    struct alignas(align) name { type x, y, z, w; }; \
    inline name make_##name(type x, type y, type z, type w) { return name{x, y, z, w}; }
DP_VECTOR2(float2, float, 8)
DP_VECTOR4(float4, float, 16)
DP_VECTOR2(double2, double, 16)
DP_VECTOR2(int2, int, 8)
DP_VECTOR4(int4, int, 16)
DP_VECTOR2(uint2, unsigned int, 8)
DP_VECTOR4(uint4, unsigned int, 16)
DP_VECTOR2(longlong2, long long, 16)
DP_VECTOR2(ulonglong2, unsigned long long, 16)
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

namespace dp {
DP_TYPE_NAME(void, "void")
DP_TYPE_NAME(bool, "bool")
DP_TYPE_NAME(char, "char")
DP_TYPE_NAME(signed char, "signed char")
DP_TYPE_NAME(unsigned char, "unsigned char")
DP_TYPE_NAME(short, "short")
DP_TYPE_NAME(unsigned short, "unsigned short")
DP_TYPE_NAME(int, "int")
DP_TYPE_NAME(unsigned int, "unsigned int")
DP_TYPE_NAME(long, "long")
DP_TYPE_NAME(unsigned long, "unsigned long")
DP_TYPE_NAME(long long, "long long")
DP_TYPE_NAME(unsigned long long, "unsigned long long")
DP_TYPE_NAME(float, "float")
DP_TYPE_NAME(double, "double")
DP_TYPE_NAME(__half, "__half")
DP_TYPE_NAME(__nv_bfloat16, "__nv_bfloat16")
}  // namespace dp
