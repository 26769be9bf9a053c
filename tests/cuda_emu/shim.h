// A CPU stand-in for the CUDA execution model, just enough to run the
// kernels of kernels-cu/ unchanged: `c++ -x c++ -std=c++17 -O2 -fPIC -shared
// -DAITL_EMULATED -include tests/cuda_emu/shim.h -I kernels-cu FILE.cu`.
//
// Blocks run one after another. The threads of a block run as fibers
// (ucontext) on the calling OS thread, switching only at barriers and warp
// shuffles, so a launch is deterministic, needs no locks, and costs a
// context switch per thread per barrier rather than an OS thread handoff:
// a 1024-thread block with 66 barriers is cheap on two cores. Because the
// calling thread is the only one involved, separate threads (cargo's test
// threads) may launch at the same time: all emulator state and every
// `__shared__` array is thread_local.
//
// What it checks beyond running the code:
// - a barrier that can never complete (a thread returned while others wait
//   at __syncthreads, or a lane left its warp before a shuffle) fails the
//   launch with a message instead of hanging;
// - dynamic shared memory starts as NaN in every block, so reading what no
//   thread wrote shows up in the results.
// What it cannot check: timing-dependent races between warps (threads run
// in index order between barriers), register spills, or device math
// accuracy (host libm stands in for the CUDA math library).

#ifndef AITL_EMU_SHIM_H
#define AITL_EMU_SHIM_H

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// One block at a time per OS thread: a per-thread static is the block's
// shared memory.
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict

struct aitl_emu_dim3 {
    unsigned x, y, z;
};

// External linkage on purpose: the compiler must assume the context switch
// inside a barrier may change them (a file-static could be proven
// untouched and cached across it).
inline thread_local aitl_emu_dim3 threadIdx;
inline thread_local aitl_emu_dim3 blockIdx;
inline thread_local aitl_emu_dim3 blockDim;
inline thread_local aitl_emu_dim3 gridDim;

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
inline int __float_as_int(float f) { return (int)__float_as_uint(f); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
// IEEE products and sums, never fused into a multiply-add.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
// Round to nearest, ties to even: the host's default rounding mode.
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
// The sum of the four signed byte products of a and b, plus c (PTX dp4a.s32.s32).
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 32; i += 8) {
        c += (int)(signed char)(a >> i) * (int)(signed char)(b >> i);
    }
    return c;
}

namespace aitl_emu {

constexpr unsigned kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
    ucontext_t context;
    aitl_emu_dim3 tid;
    bool done;
    // Which of the two exchange buffers this thread's next shuffle uses.
    unsigned phase;
};

struct State {
    // Per launch.
    void (*body)(void*) = nullptr;
    void* argument = nullptr;
    // Per block.
    std::vector<Fiber> fibers;
    unsigned live = 0;
    unsigned current = 0;
    ucontext_t launcher;
    unsigned block_arrived = 0;
    unsigned long long block_generation = 0;
    std::vector<unsigned> warp_arrived;
    std::vector<unsigned long long> warp_generation;
    // A shuffle writes its value to buffer `phase`, waits for the warp, reads
    // its source lane's value and flips `phase`; two buffers suffice since no
    // lane can write buffer p again before every lane has passed the barrier
    // of the shuffle in between.
    std::vector<unsigned long long> exchange[2];
    // Wake-ups in a row that found their barrier still closed; more than
    // two rounds of every live thread means none can ever go on.
    unsigned long long stalls = 0;
    bool failed = false;
    std::string error;
    std::vector<unsigned char> dynamic_shared;
    // Reused across blocks and launches.
    std::vector<char*> stacks;

    ~State() {
        long page = sysconf(_SC_PAGESIZE);
        for (char* s : stacks) {
            munmap(s - page, kStackBytes + page);
        }
    }
};

inline State& state() {
    static thread_local State s;
    return s;
}

inline void compiler_fence() { asm volatile("" ::: "memory"); }

inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline unsigned next_live(unsigned from) {
    State& s = state();
    unsigned n = (unsigned)s.fibers.size();
    for (unsigned step = 1; step <= n; step++) {
        unsigned j = (from + step) % n;
        if (!s.fibers[j].done) {
            return j;
        }
    }
    return from;
}

inline void resume(unsigned next) {
    State& s = state();
    unsigned prev = s.current;
    if (next == prev) {
        return;
    }
    s.current = next;
    threadIdx = s.fibers[next].tid;
    compiler_fence();
    swapcontext(&s.fibers[prev].context, &s.fibers[next].context);
    compiler_fence();
}

[[noreturn]] inline void fail(const std::string& what) {
    State& s = state();
    s.failed = true;
    char where[128];
    std::snprintf(where, sizeof where, " (block %u,%u,%u, thread %u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z,
                  threadIdx.x, threadIdx.y, threadIdx.z);
    s.error = what + where;
    setcontext(&s.launcher);
    std::abort();
}

// Runs other threads until `open()` holds.
template <class Open>
inline void wait_until(Open open, const char* barrier) {
    State& s = state();
    while (!open()) {
        if (++s.stalls > 2ull * s.live + 4) {
            fail(std::string("deadlock: ") + barrier +
                 " can never complete (a thread of the block returned or took another path)");
        }
        resume(next_live(s.current));
    }
    s.stalls = 0;
}

inline void block_barrier() {
    State& s = state();
    compiler_fence();
    s.stalls = 0;
    unsigned long long generation = s.block_generation;
    if (++s.block_arrived == s.fibers.size()) {
        s.block_arrived = 0;
        s.block_generation++;
    } else {
        wait_until([&] { return s.block_generation != generation; }, "__syncthreads");
    }
    compiler_fence();
}

// Lanes of the calling thread's warp that `mask` names and the block has.
inline unsigned warp_members(unsigned mask) {
    State& s = state();
    unsigned warp = linear_tid() / kWarp;
    unsigned present = (unsigned)s.fibers.size() - warp * kWarp;
    unsigned lanes = present >= kWarp ? 0xffffffffu : ((1u << present) - 1u);
    return (unsigned)__builtin_popcount(mask & lanes);
}

inline void warp_barrier(unsigned mask, const char* what) {
    State& s = state();
    compiler_fence();
    s.stalls = 0;
    unsigned warp = linear_tid() / kWarp;
    unsigned long long generation = s.warp_generation[warp];
    if (++s.warp_arrived[warp] == warp_members(mask)) {
        s.warp_arrived[warp] = 0;
        s.warp_generation[warp]++;
    } else {
        wait_until([&] { return s.warp_generation[warp] != generation; }, what);
    }
    compiler_fence();
}

// Publishes `v`, waits for the warp, returns lane `source`'s value (or `v`
// when `source` is out of the warp, as the hardware does for shfl_down).
template <class T>
inline T exchange(unsigned mask, T v, unsigned source, bool in_range, const char* what) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a wide type");
    State& s = state();
    unsigned me = linear_tid();
    unsigned phase = s.fibers[me].phase;
    s.fibers[me].phase ^= 1;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    s.exchange[phase][me] = bits;
    warp_barrier(mask, what);
    if (!in_range) {
        return v;
    }
    unsigned from = me / kWarp * kWarp + source;
    if (from >= s.fibers.size()) {
        fail(std::string(what) + " reads a lane the block does not have");
    }
    T out;
    std::memcpy(&out, &s.exchange[phase][from], sizeof(T));
    return out;
}

[[noreturn]] inline void fiber_main() {
    State& s = state();
    s.body(s.argument);
    s.fibers[s.current].done = true;
    s.live--;
    s.stalls = 0;
    if (s.live == 0) {
        setcontext(&s.launcher);
    } else {
        unsigned next = next_live(s.current);
        s.current = next;
        threadIdx = s.fibers[next].tid;
        setcontext(&s.fibers[next].context);
    }
    std::abort();
}

inline bool ensure_stacks(unsigned count) {
    State& s = state();
    long page = sysconf(_SC_PAGESIZE);
    while (s.stacks.size() < count) {
        void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) {
            return false;
        }
        // A guard page below the stack turns an overflow into a crash rather
        // than a neighbour's corrupted stack.
        mprotect(p, page, PROT_NONE);
        s.stacks.push_back((char*)p + page);
    }
    return true;
}

inline bool run_block(unsigned threads) {
    State& s = state();
    s.fibers.assign(threads, Fiber{});
    unsigned warps = (threads + kWarp - 1) / kWarp;
    s.warp_arrived.assign(warps, 0);
    s.warp_generation.assign(warps, 0);
    s.exchange[0].assign(threads, 0);
    s.exchange[1].assign(threads, 0);
    s.block_arrived = 0;
    s.block_generation = 0;
    s.live = threads;
    s.stalls = 0;
    std::fill(s.dynamic_shared.begin(), s.dynamic_shared.end(), (unsigned char)0xff);
    for (unsigned i = 0; i < threads; i++) {
        Fiber& f = s.fibers[i];
        f.tid = {i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)};
        f.done = false;
        f.phase = 0;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = s.stacks[i];
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = nullptr;
        makecontext(&f.context, (void (*)())fiber_main, 0);
    }
    s.current = 0;
    threadIdx = s.fibers[0].tid;
    compiler_fence();
    swapcontext(&s.launcher, &s.fibers[0].context);
    compiler_fence();
    return !s.failed;
}

}  // namespace aitl_emu

inline void __syncthreads() { aitl_emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { aitl_emu::warp_barrier(mask, "__syncwarp"); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int source, int width = 32) {
    unsigned lane = aitl_emu::linear_tid() % aitl_emu::kWarp;
    unsigned w = (unsigned)width;
    unsigned from = lane / w * w + (unsigned)source % w;
    return aitl_emu::exchange(mask, v, from, true, "__shfl_sync");
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    unsigned lane = aitl_emu::linear_tid() % aitl_emu::kWarp;
    unsigned from = lane ^ (unsigned)lane_mask;
    bool in_range = from / (unsigned)width == lane / (unsigned)width && from < aitl_emu::kWarp;
    return aitl_emu::exchange(mask, v, from, in_range, "__shfl_xor_sync");
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    unsigned lane = aitl_emu::linear_tid() % aitl_emu::kWarp;
    bool in_range = lane % (unsigned)width + delta < (unsigned)width;
    return aitl_emu::exchange(mask, v, lane + delta, in_range, "__shfl_down_sync");
}

extern "C" {

// The current block's dynamic shared memory (AITL_DYNAMIC_SHARED).
inline void* aitl_emu_dynamic_shared() { return aitl_emu::state().dynamic_shared.data(); }

// The message of the last failed launch on this thread.
__attribute__((visibility("default"))) const char* aitl_emu_last_error() {
    return aitl_emu::state().error.c_str();
}

// Runs `body(argument)` as every thread of every block of the grid; `body`
// calls the kernel with its arguments. Returns 0, or 1 with
// aitl_emu_last_error() set.
__attribute__((visibility("default"))) int aitl_emu_launch(void (*body)(void*), void* argument, unsigned grid_x,
                                                            unsigned grid_y, unsigned grid_z, unsigned block_x,
                                                            unsigned block_y, unsigned block_z,
                                                            unsigned long long dynamic_shared_bytes) {
    aitl_emu::State& s = aitl_emu::state();
    s.failed = false;
    s.error.clear();
    unsigned long long threads = (unsigned long long)block_x * block_y * block_z;
    if (threads == 0 || threads > 1024 || grid_x == 0 || grid_y == 0 || grid_z == 0 || grid_y > 65535 ||
        grid_z > 65535 || block_z > 64) {
        s.error = "invalid launch configuration";
        return 1;
    }
    if (dynamic_shared_bytes > 227 * 1024) {
        s.error = "dynamic shared memory beyond the device limit";
        return 1;
    }
    if (!aitl_emu::ensure_stacks((unsigned)threads)) {
        s.error = "out of memory for thread stacks";
        return 1;
    }
    s.body = body;
    s.argument = argument;
    s.dynamic_shared.assign(dynamic_shared_bytes, 0xff);
    gridDim = {grid_x, grid_y, grid_z};
    blockDim = {block_x, block_y, block_z};
    for (unsigned z = 0; z < grid_z; z++) {
        for (unsigned y = 0; y < grid_y; y++) {
            for (unsigned x = 0; x < grid_x; x++) {
                blockIdx = {x, y, z};
                if (!aitl_emu::run_block((unsigned)threads)) {
                    return 1;
                }
            }
        }
    }
    return 0;
}

}  // extern "C"

#endif  // AITL_EMU_SHIM_H
