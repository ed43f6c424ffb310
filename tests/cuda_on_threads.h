// Runs kernels/*.cu code on a CPU: every CUDA thread of a block is a std::thread, so
// barriers, warp votes and shuffles, shared-memory atomics and races between lanes behave
// as threads do; mma.sync is computed from the fragments of all 32 lanes with the layouts
// of the PTX ISA, and cp.async copies land at their wait or at once. One block runs at a
// time, on one pool of threads; __shared__ arrays are function statics. Built (g++
// -std=c++20) by tests/_on_threads.py for the tests, never by the package.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define GPUSC_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define FULL_MASK 0xffffffffu
using std::isfinite;
using std::max;
using std::min;
using std::signbit;

struct dim3 { unsigned x = 0, y = 0, z = 0; };
inline dim3 blockDim, gridDim;
inline thread_local dim3 blockIdx, threadIdx;
alignas(16) inline unsigned char dynamic_smem[256 * 1024];  // the block's extern __shared__

struct Warp {
    std::barrier<> sync{32};
    long long word[32];  // what each lane puts in for a vote or a shuffle
    unsigned a[32][4], b[32][2];
};
inline std::unique_ptr<std::barrier<>> block_barrier;
inline bool copies_land_early = false;  // see copy16_async
inline std::vector<std::unique_ptr<Warp>> warps;

inline int my_thread() { return (int)(threadIdx.x + threadIdx.y * blockDim.x); }
inline Warp& my_warp() { return *warps[my_thread() / 32]; }
inline int my_lane() { return my_thread() % 32; }

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = FULL_MASK) { my_warp().sync.arrive_and_wait(); }

// Every lane puts in a word and gets all 32 back (full warps only, as the kernels use them).
template <typename T>
inline std::vector<T> exchange(T value) {
    static_assert(sizeof(T) <= sizeof(long long));
    Warp& w = my_warp();
    std::memcpy(&w.word[my_lane()], &value, sizeof(T));
    w.sync.arrive_and_wait();
    std::vector<T> all(32);
    for (int lane = 0; lane < 32; ++lane) std::memcpy(&all[lane], &w.word[lane], sizeof(T));
    w.sync.arrive_and_wait();  // every lane has read the words before they change
    return all;
}

inline bool __any_sync(unsigned, bool p) { auto v = exchange<int>(p); return std::any_of(v.begin(), v.end(), [](int x) { return x; }); }
inline bool __all_sync(unsigned, bool p) { auto v = exchange<int>(p); return std::all_of(v.begin(), v.end(), [](int x) { return x; }); }
inline unsigned __ballot_sync(unsigned, bool p) {
    auto v = exchange<int>(p);
    unsigned bits = 0;
    for (int lane = 0; lane < 32; ++lane) bits |= (v[lane] ? 1u : 0u) << lane;
    return bits;
}
inline int __reduce_add_sync(unsigned, int value) { auto v = exchange(value); int s = 0; for (int x : v) s += x; return s; }
template <typename T> inline T __shfl_sync(unsigned, T value, int src) { return exchange(value)[src & 31]; }
template <typename T> inline T __shfl_xor_sync(unsigned, T value, int mask) { return exchange(value)[(my_lane() ^ mask) & 31]; }
template <typename T> inline T __shfl_down_sync(unsigned, T value, int delta) {
    auto v = exchange(value);
    return my_lane() + delta < 32 ? v[my_lane() + delta] : value;
}
template <typename T> inline T __shfl_up_sync(unsigned, T value, int delta) {
    auto v = exchange(value);
    return my_lane() >= delta ? v[my_lane() - delta] : value;
}
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }

template <typename T>
inline T atomicAdd(T* address, T value) { return std::atomic_ref<T>(*address).fetch_add(value); }
template <typename T>
inline T atomicOr(T* address, T value) { return std::atomic_ref<T>(*address).fetch_or(value); }
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {  // returns the old value, as CUDA's
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
    return compare;
}

inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, g = lane / 4, t = lane % 4:
// A a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); B b0 (k = t, n = g),
// b1 (k = t + 4, n = g); C c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1).
// Operands are read as TF32 (the low 13 bits ignored); products summed in float.
inline void mma_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    Warp& w = my_warp();
    const int lane = my_lane();
    for (int r = 0; r < 4; ++r) w.a[lane][r] = a[r];
    w.b[lane][0] = b0;
    w.b[lane][1] = b1;
    w.sync.arrive_and_wait();
    float A[16][8], B[8][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        A[g][t] = __uint_as_float(w.a[l][0] & 0xffffe000u);
        A[g + 8][t] = __uint_as_float(w.a[l][1] & 0xffffe000u);
        A[g][t + 4] = __uint_as_float(w.a[l][2] & 0xffffe000u);
        A[g + 8][t + 4] = __uint_as_float(w.a[l][3] & 0xffffe000u);
        B[t][g] = __uint_as_float(w.b[l][0] & 0xffffe000u);
        B[t + 4][g] = __uint_as_float(w.b[l][1] & 0xffffe000u);
    }
    w.sync.arrive_and_wait();  // every lane has read the fragments before they change
    const int g = lane / 4, t = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int c = 0; c < 4; ++c)
        for (int k = 0; k < 8; ++k) d[c] += A[rows[c]][k] * B[k][cols[c]];
    // With copies landing early, odd warps lag behind: a stage refilled while a slower warp
    // still multiplies it then shows in the results.
    if (copies_land_early && my_thread() / 32 % 2) std::this_thread::sleep_for(std::chrono::microseconds(20));
}

// cp.async: a copy lands at the latest when a wait releases its group. copies_land_early
// picks the other end of what the hardware may do: land at once, when issued. The first
// finds reads before the wait, the second refills of a stage that another warp still reads.
struct Copy { void* dst; const void* src; };
inline thread_local std::vector<std::vector<Copy>> copy_groups{{}};

inline void copy16_async(void* shared, const void* global) {
    if (copies_land_early) std::memcpy(shared, global, 16);
    else copy_groups.back().push_back({shared, global});
}
inline void copy_async_commit() { copy_groups.emplace_back(); }

template <int pending>
inline void copy_async_wait() {
    const int committed = (int)copy_groups.size() - 1;  // the last group is still open
    for (int group = 0; group < committed - pending; ++group)
        for (const Copy& c : copy_groups[group]) std::memcpy(c.dst, c.src, 16);
    if (committed > pending) copy_groups.erase(copy_groups.begin(), copy_groups.begin() + (committed - pending));
}
