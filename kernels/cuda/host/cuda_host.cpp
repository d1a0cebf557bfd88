// The runtime of the host harness (cuda_host.h): a pool of host threads, one per CUDA thread of a block,
// blocks run one after another; barriers, warp exchanges, shared memory and the faults they detect.
//
// A block is stuck when every thread that has not returned waits (at a barrier or a warp operation):
// `running` counts the threads that neither wait nor have returned, and the thread that takes it to 0
// while others wait reports every thread's state. A fault fails the block: its waiting threads wake and
// unwind (Aborted), the remaining blocks do not run, and run_grid returns 1 with the message.
#include "cuda_host.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace dp {

thread_local ThreadContext current;

namespace {

struct Aborted {};  // unwinds a thread of a failed block

void futex_wait(std::atomic<unsigned int>& word, unsigned int seen) {
    syscall(SYS_futex, reinterpret_cast<unsigned int*>(&word), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
}
void futex_wake(std::atomic<unsigned int>& word, int count) {
    syscall(SYS_futex, reinterpret_cast<unsigned int*>(&word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}

enum State : int { state_running, state_at_barrier, state_at_warp, state_returned };

struct ThreadState {  // what a thread does now, for the report of a stuck block
    std::atomic<int> state{state_running};
    std::atomic<const char*> operation{nullptr};
    std::atomic<const char*> file{nullptr};
    std::atomic<int> line{0};
    std::atomic<unsigned int> mask{0};
};

struct Block;

// threads that meet (at a barrier, at a warp operation): the last to arrive lets them all go on. Arrivals
// count under `mutex`; waiters sleep on the futex word `wakeups` without the mutex (no convoy on waking),
// and see the release through `generation` (acquire/release: ThreadSanitizer sees the ordering).
struct Rendezvous {
    std::mutex mutex;
    std::atomic<unsigned int> generation{0}, wakeups{0};
    unsigned int arrived = 0;
    void wake_all() {
        wakeups.fetch_add(1, std::memory_order_release);
        futex_wake(wakeups, INT_MAX);
    }
    // with `lock` on `mutex` held; returns, with it released, once `participants` threads have arrived
    void meet(Block& b, std::unique_lock<std::mutex>& lock, unsigned int participants, ThreadState& me);
};

struct Warp {
    Rendezvous meeting;
    unsigned int mask = 0;
    const char* operation = nullptr;
    uint64_t slots[2][32] = {};  // by the parity of the generation: a lane that went on to the next operation
                                 // writes the other half while slower lanes still copy this one
};

struct Block {
    const char* kernel;
    uint3 index;
    dim3 dim;
    unsigned int size;
    std::atomic<int> running, returned{0};
    std::atomic<bool> failed{false};
    std::mutex fail_mutex;
    std::string message;

    Rendezvous barrier;
    Site site{nullptr, 0};  // of the __syncthreads the waiting threads are at

    std::unique_ptr<Warp[]> warps;
    std::unique_ptr<ThreadState[]> threads;

    std::mutex shared_mutex;
    std::unordered_map<const void*, void*> shared;  // declaration -> this block's allocation
    void* dynamic;
    unsigned long long serial;

    Block(const char* kernel_, uint3 index_, dim3 dim_, size_t dynamic_bytes, unsigned long long serial_)
        : kernel(kernel_), index(index_), dim(dim_), size(dim_.x * dim_.y * dim_.z), running(static_cast<int>(size)),
          warps(new Warp[(size + 31) / 32]), threads(new ThreadState[size]), dynamic(malloc(dynamic_bytes)),
          serial(serial_) {
        memset(dynamic, 0xff, dynamic_bytes);
    }
    ~Block() {
        for (auto& entry : shared) free(entry.second);
        free(dynamic);
    }

    std::string thread_name(unsigned int linear) const {
        char text[64];
        snprintf(text, sizeof text, "(%u,%u,%u)", linear % dim.x, linear / dim.x % dim.y, linear / (dim.x * dim.y));
        return text;
    }
    std::string where() const {
        char text[256];
        snprintf(text, sizeof text, "kernel %s, block (%u,%u,%u)", kernel, index.x, index.y, index.z);
        return text;
    }

    void fail(const std::string& what) {  // the first fault of a block is its message
        {
            std::lock_guard<std::mutex> lock(fail_mutex);
            if (failed) return;
            message = where() + ": " + what;
            failed = true;
        }
        barrier.wake_all();
        for (unsigned int w = 0; w < (size + 31) / 32; ++w) warps[w].meeting.wake_all();
    }
    [[noreturn]] void fault(const std::string& what) {
        fail("thread " + thread_name(current.linear) + ": " + what);
        throw Aborted{};
    }

    std::string state_of(unsigned int linear) const {
        const ThreadState& t = threads[linear];
        char text[256];
        switch (t.state.load()) {
        case state_at_barrier:
            snprintf(text, sizeof text, "wait at __syncthreads (%s:%d)", t.file.load(), t.line.load());
            break;
        case state_at_warp:
            snprintf(text, sizeof text, "wait at %s with mask 0x%08x (%s:%d)", t.operation.load(), t.mask.load(),
                     t.file.load(), t.line.load());
            break;
        case state_returned: snprintf(text, sizeof text, "returned"); break;
        default: snprintf(text, sizeof text, "run"); break;
        }
        return text;
    }
    // every thread waits or has returned: say who does what, consecutive threads doing the same grouped
    [[noreturn]] void stuck() {
        std::string report = "every thread waits and none can go on (a barrier or warp operation that not all the"
                             " threads it names reach):";
        for (unsigned int first = 0; first < size;) {
            const std::string state = state_of(first);
            unsigned int last = first;
            while (last + 1 < size && state_of(last + 1) == state) ++last;
            const std::string who = last > first ? "threads " + thread_name(first) + ".." + thread_name(last)
                                                 : "thread " + thread_name(first);
            report += "\n  " + who + ": " + state;
            first = last + 1;
        }
        fail(report);
        throw Aborted{};
    }
    void wait_or_stuck() {  // this thread is about to wait: stuck if no thread runs any more
        if (running.fetch_sub(1) == 1) stuck();
    }
    void check() {
        if (failed) throw Aborted{};
    }
};

void Rendezvous::meet(Block& b, std::unique_lock<std::mutex>& lock, unsigned int participants, ThreadState& me) {
    if (++arrived == participants) {
        arrived = 0;
        b.running += static_cast<int>(participants) - 1;
        generation.fetch_add(1, std::memory_order_release);
        lock.unlock();
        wake_all();
    } else {
        const unsigned int waited = generation.load(std::memory_order_relaxed);
        lock.unlock();
        b.wait_or_stuck();
        for (;;) {
            const unsigned int seen = wakeups.load(std::memory_order_acquire);
            if (generation.load(std::memory_order_acquire) != waited) break;
            if (b.failed) throw Aborted{};
            futex_wait(wakeups, seen);
        }
    }
    me.state = state_running;
}

thread_local Block* block = nullptr;
thread_local std::unordered_map<const void*, void*> shared_cache;  // this thread's view of block->shared
thread_local unsigned long long shared_cache_serial = 0;
thread_local uint64_t exchanged[32];

// host thread i runs CUDA thread i (linear index) of the current block; each waits on its own futex word
class Pool {
  public:
    ~Pool() {
        for (auto& worker : workers_) {
            worker->stop = true;
            worker->post();
            worker->thread.join();
        }
    }
    // run_thread(linear) for linear in [0, n) on n host threads; returns when all have finished
    template <typename F> void run(unsigned int n, F run_thread) {
        while (workers_.size() < n) workers_.emplace_back(new Worker(this));
        std::function<void(unsigned int)> job = run_thread;
        remaining_.store(n, std::memory_order_relaxed);
        const unsigned int finished = finished_.load(std::memory_order_relaxed);
        for (unsigned int i = 0; i < n; ++i) {
            workers_[i]->job = &job;
            workers_[i]->linear = i;
            workers_[i]->post();
        }
        while (finished_.load(std::memory_order_acquire) == finished) futex_wait(finished_, finished);
    }

  private:
    struct Worker {
        std::atomic<unsigned int> posted{0};  // bumped for each job, and to stop
        std::function<void(unsigned int)>* job = nullptr;
        unsigned int linear = 0;
        bool stop = false;
        std::thread thread;
        explicit Worker(Pool* pool) : thread([this, pool] { loop(pool); }) {}
        void post() {
            posted.fetch_add(1, std::memory_order_release);
            futex_wake(posted, 1);
        }
        void loop(Pool* pool) {
            for (unsigned int seen = 0;;) {
                unsigned int now;
                while ((now = posted.load(std::memory_order_acquire)) == seen) futex_wait(posted, seen);
                seen = now;
                if (stop) return;
                (*job)(linear);
                if (pool->remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                    pool->finished_.fetch_add(1, std::memory_order_release);
                    futex_wake(pool->finished_, 1);
                }
            }
        }
    };
    std::vector<std::unique_ptr<Worker>> workers_;
    std::atomic<unsigned int> remaining_{0}, finished_{0};
};

std::mutex launch_mutex;  // one launch at a time: blocks run in order, as on a one-SM device
std::string last_error;
unsigned long long block_serial = 0;

Pool& pool() {
    static Pool instance;
    return instance;
}

void run_thread(Block& b, unsigned int linear, ThreadBody body, const void* closure, const Launch& launch) {
    current.linear = linear;
    current.thread_idx = uint3{linear % b.dim.x, linear / b.dim.x % b.dim.y, linear / (b.dim.x * b.dim.y)};
    current.block_idx = b.index;
    current.block_dim = launch.block;
    current.grid_dim = launch.grid;
    block = &b;
    try {
        body(closure);
        b.threads[linear].state = state_returned;
        ++b.returned;
        if (b.running.fetch_sub(1) == 1 && b.returned.load() < static_cast<int>(b.size)) b.stuck();
    } catch (const Aborted&) {
    } catch (const std::exception& error) {
        b.fail("thread " + b.thread_name(linear) + ": " + error.what());
    }
    block = nullptr;
}

}  // namespace

// ---- what cuda_host.h's functions call ----------------------------------------------------------------

void syncthreads(Site site) {
    Block& b = *block;
    b.check();
    ThreadState& me = b.threads[current.linear];
    std::unique_lock<std::mutex> lock(b.barrier.mutex);
    if (b.barrier.arrived > 0 && (b.site.line != site.line || strcmp(b.site.file, site.file) != 0)) {
        lock.unlock();
        b.fault("waits at __syncthreads (" + std::string(site.file) + ":" + std::to_string(site.line) +
                ") while other threads wait at another (" + b.site.file + ":" + std::to_string(b.site.line) + ")");
    }
    b.site = site;
    me.file = site.file;
    me.line = site.line;
    me.state = state_at_barrier;
    b.barrier.meet(b, lock, b.size, me);
}

const uint64_t* warp_exchange(unsigned int mask, uint64_t value, Site site, const char* operation) {
    Block& b = *block;
    b.check();
    const unsigned int lane = current.linear & 31, warp = current.linear >> 5;
    const unsigned int lanes_here = std::min(32u, b.size - warp * 32);
    const unsigned int existing = lanes_here == 32 ? 0xffffffffu : (1u << lanes_here) - 1;
    char text[160];
    if (!(mask >> lane & 1u)) {
        snprintf(text, sizeof text, "%s with mask 0x%08x, which does not name its own lane %u", operation, mask, lane);
        b.fault(text);
    }
    if (mask & ~existing) {
        snprintf(text, sizeof text, "%s with mask 0x%08x names lanes that do not exist (its warp has %u)", operation,
                 mask, lanes_here);
        b.fault(text);
    }
    for (unsigned int other = 0; other < 32; ++other) {
        if ((mask >> other & 1u) && b.threads[warp * 32 + other].state.load() == state_returned) {
            snprintf(text, sizeof text, "%s with mask 0x%08x names lane %u, which has returned", operation, mask,
                     other);
            b.fault(text);
        }
    }
    Warp& w = b.warps[warp];
    ThreadState& me = b.threads[current.linear];
    std::unique_lock<std::mutex> lock(w.meeting.mutex);
    if (w.meeting.arrived > 0 && (w.mask != mask || w.operation != operation)) {
        snprintf(text, sizeof text, "%s with mask 0x%08x meets lanes at %s with mask 0x%08x", operation, mask,
                 w.operation, w.mask);
        lock.unlock();
        b.fault(text);
    }
    w.mask = mask;
    w.operation = operation;
    const unsigned int parity = w.meeting.generation.load(std::memory_order_relaxed) & 1u;
    w.slots[parity][lane] = value;
    me.operation = operation;
    me.mask = mask;
    me.file = site.file;
    me.line = site.line;
    me.state = state_at_warp;
    w.meeting.meet(b, lock, static_cast<unsigned int>(__builtin_popcount(mask)), me);
    memcpy(exchanged, w.slots[parity], sizeof exchanged);  // no lane writes this half before all have copied it
    return exchanged;
}

void* shared_variable(const void* key, size_t bytes, size_t alignment) {
    Block& b = *block;
    if (shared_cache_serial != b.serial) {
        shared_cache.clear();
        shared_cache_serial = b.serial;
    }
    auto cached = shared_cache.find(key);
    if (cached != shared_cache.end()) return cached->second;
    std::lock_guard<std::mutex> lock(b.shared_mutex);
    void*& allocation = b.shared[key];
    if (!allocation) {
        if (posix_memalign(&allocation, std::max(alignment, sizeof(void*)), bytes) != 0) b.fault("out of host memory");
        memset(allocation, 0xff, bytes);  // NaN in every float type: a value no thread wrote shows
    }
    shared_cache[key] = allocation;
    return allocation;
}

void* dynamic_shared() { return block->dynamic; }

void trap(const char* what) { block->fault(what); }

int run_grid(const char* kernel, const Launch& launch, ThreadBody body, const void* closure) {
    std::lock_guard<std::mutex> lock(launch_mutex);
    last_error.clear();
    const unsigned int size = launch.block.x * launch.block.y * launch.block.z;
    for (unsigned int z = 0; z < launch.grid.z; ++z) {
        for (unsigned int y = 0; y < launch.grid.y; ++y) {
            for (unsigned int x = 0; x < launch.grid.x; ++x) {
                Block b(kernel, uint3{x, y, z}, launch.block, launch.dynamic_shared_bytes, ++block_serial);
                pool().run(size, [&](unsigned int linear) { run_thread(b, linear, body, closure, launch); });
                if (b.failed) {
                    last_error = b.message;
                    return 1;
                }
            }
        }
    }
    return 0;
}

}  // namespace dp

extern "C" const char* dp_last_error() { return dp::last_error.c_str(); }

#ifndef DP_SANITIZED
// -fsanitize=alignment calls this for an access at an address that is not a multiple of its type's
// alignment (a misaligned float4 or 16-byte struct: cudaErrorMisalignedAddress on a device). The layout
// is UBSan's (TypeMismatchData); the handler must not throw: it fails the block and the access goes on.
namespace {
struct UbsanLocation {
    const char* file;
    uint32_t line, column;
};
struct UbsanType {
    uint16_t kind, info;
    char name[1];
};
struct UbsanTypeMismatch {
    UbsanLocation location;
    const UbsanType* type;
    unsigned char log_alignment;
    unsigned char check_kind;
};
void misaligned(UbsanTypeMismatch* data, uintptr_t pointer) {
    const uintptr_t alignment = uintptr_t{1} << data->log_alignment;
    char text[512];
    snprintf(text, sizeof text, "misaligned access (%s:%u): address %#lx of a %s, which needs %lu-byte alignment",
             data->location.file, data->location.line, static_cast<unsigned long>(pointer), data->type->name,
             static_cast<unsigned long>(alignment));
    if (dp::block == nullptr) {
        fprintf(stderr, "host harness: %s\n", text);
        abort();
    }
    dp::block->fail("thread " + dp::block->thread_name(dp::current.linear) + ": " + text);
}
}  // namespace
extern "C" void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* data, uintptr_t pointer) {
    misaligned(data, pointer);
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(UbsanTypeMismatch* data, uintptr_t pointer) {
    misaligned(data, pointer);
}
#endif
