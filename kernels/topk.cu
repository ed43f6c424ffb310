// Exact brute-force kNN: running top-K lists over distance tiles, direct L1 tiles, and
// an exact float64 re-ranking of each row's candidates.
#include "_common.cuh"

#define TOPK_MAX 128        // the most candidates a row keeps (k + margin)
#define WARPS_PER_BLOCK 4
#define FULL_MASK 0xffffffffu
#define NO_INDEX 0x7fffffffffffffffLL

// (key, index) order: smaller key first, then smaller index, so the kept set is unique.
template <typename T>
__device__ __forceinline__ bool before(T d1, long long i1, T d2, long long i2) {
    return d1 < d2 || (d1 == d2 && i1 < i2);
}

// Put one candidate into a warp's ascending list in shared memory (K <= TOPK_MAX slots).
// Every lane calls this with the same (key, index); lanes own slots lane, lane + 32, ...
template <typename T>
__device__ __forceinline__ void warp_insert(T* keys, long long* idx, int K, T key, long long j) {
    const int lane = threadIdx.x & 31;
    int below = 0;
#pragma unroll
    for (int r = 0; r < TOPK_MAX / 32; ++r) {
        const int s = lane + 32 * r;
        if (s < K && before(keys[s], idx[s], key, j)) ++below;
    }
    const int pos = __reduce_add_sync(FULL_MASK, below);
    T moved_key[TOPK_MAX / 32];
    long long moved_idx[TOPK_MAX / 32];
#pragma unroll
    for (int r = 0; r < TOPK_MAX / 32; ++r) {
        const int s = lane + 32 * r;
        const bool shifts = s > pos && s < K;
        moved_key[r] = shifts ? keys[s - 1] : T(0);
        moved_idx[r] = shifts ? idx[s - 1] : 0;
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < TOPK_MAX / 32; ++r) {
        const int s = lane + 32 * r;
        if (s > pos && s < K) { keys[s] = moved_key[r]; idx[s] = moved_idx[r]; }
    }
    if (lane == 0) { keys[pos] = key; idx[pos] = j; }
    __syncwarp();
}

// One warp per query row; lanes stride the tile's columns 32 at a time and pass the
// values below the row's current K-th into its list (kept in global memory between tiles).
// With norms: key = q_norm + r_norm - 2 * tile (a product tile); without: key = tile.
template <typename T>
__global__ void topk_tile(const T* __restrict__ tile, long long n_q, long long n_r, long long ld,
                          const T* __restrict__ q_norms, const T* __restrict__ r_norms,
                          long long r_offset, T* __restrict__ best_key,
                          long long* __restrict__ best_idx, int K) {
    __shared__ T s_key[WARPS_PER_BLOCK][TOPK_MAX];
    __shared__ long long s_idx[WARPS_PER_BLOCK][TOPK_MAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long row = (long long)blockIdx.x * WARPS_PER_BLOCK + warp;
    if (row >= n_q) return;  // whole warps leave together
    T* keys = s_key[warp];
    long long* idx = s_idx[warp];
    for (int s = lane; s < K; s += 32) {
        keys[s] = best_key[row * K + s];
        idx[s] = best_idx[row * K + s];
    }
    __syncwarp();
    const T* tile_row = tile + row * ld;
    const T q_norm = q_norms ? q_norms[row] : T(0);
    for (long long c0 = 0; c0 < n_r; c0 += 32) {
        const long long c = c0 + lane;
        T key = T(0);
        long long j = NO_INDEX;
        if (c < n_r) {
            const T v = tile_row[c];
            key = q_norms ? q_norm + r_norms[c] - T(2) * v : v;
            j = r_offset + c;
        }
        unsigned pass = __ballot_sync(FULL_MASK, c < n_r && before(key, j, keys[K - 1], idx[K - 1]));
        while (pass) {
            const int src = __ffs(pass) - 1;
            pass &= pass - 1;
            const T cand_key = __shfl_sync(FULL_MASK, key, src);
            const long long cand_j = __shfl_sync(FULL_MASK, j, src);
            if (before(cand_key, cand_j, keys[K - 1], idx[K - 1]))  // the list moved on
                warp_insert(keys, idx, K, cand_key, cand_j);
        }
    }
    for (int s = lane; s < K; s += 32) {
        best_key[row * K + s] = keys[s];
        best_idx[row * K + s] = idx[s];
    }
}

// One thread per (query, reference) pair of a 16x16 tile; 16 rows of each side are
// staged through shared memory 32 features at a time. Sums in double.
template <typename T>
__global__ void manhattan_tile(const T* __restrict__ xq, long long n_q, const T* __restrict__ xr,
                               long long n_r, long long dim, double* __restrict__ out, long long ld) {
    __shared__ T sq[16][33];
    __shared__ T sr[16][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long q = (long long)blockIdx.y * 16 + ty, r = (long long)blockIdx.x * 16 + tx;
    const long long q_base = (long long)blockIdx.y * 16, r_base = (long long)blockIdx.x * 16;
    double acc = 0.0;
    for (long long f0 = 0; f0 < dim; f0 += 32) {
        // 256 threads load 16 x 32 values of each side: two per thread and side
        for (int t = ty * 16 + tx; t < 16 * 32; t += 256) {
            const int row = t / 32, col = t % 32;
            const long long f = f0 + col;
            sq[row][col] = (q_base + row < n_q && f < dim) ? xq[(q_base + row) * dim + f] : T(0);
            sr[row][col] = (r_base + row < n_r && f < dim) ? xr[(r_base + row) * dim + f] : T(0);
        }
        __syncthreads();
        const int width = (int)min((long long)32, dim - f0);
        for (int col = 0; col < width; ++col) acc += fabs((double)sq[ty][col] - (double)sr[tx][col]);
        __syncthreads();
    }
    if (q < n_q && r < n_r) out[q * ld + r] = acc;
}

// Exact key of rows i and j in double, on the candidates' scale: squared euclidean
// (metric 0, 1), 2 (1 - cos) (metric 2), the L1 sum (metric 3).
template <typename T>
__device__ double exact_key(const T* __restrict__ x, long long dim, long long i, long long j, int metric) {
    if (i == j) return 0.0;
    const T* a = x + i * dim;
    const T* b = x + j * dim;
    if (metric == 2) {
        double dot = 0.0, na = 0.0, nb = 0.0;
        for (long long f = 0; f < dim; ++f) {
            const double u = (double)a[f], v = (double)b[f];
            dot += u * v; na += u * u; nb += v * v;
        }
        if (na == 0.0 || nb == 0.0) return 2.0;
        return 2.0 * fmin(fmax(1.0 - dot / (sqrt(na) * sqrt(nb)), 0.0), 2.0);
    }
    double acc = 0.0;
    for (long long f = 0; f < dim; ++f) {
        const double diff = (double)a[f] - (double)b[f];
        acc += metric == 3 ? fabs(diff) : diff * diff;
    }
    return acc;
}

// (distance, the point itself first, index) order of the final neighbour lists.
__device__ __forceinline__ bool ranks_before(double d1, long long i1, double d2, long long i2, long long self) {
    if (d1 != d2) return d1 < d2;
    if ((i1 == self) != (i2 == self)) return i1 == self;
    return i1 < i2;
}

// One warp per query row: lanes take candidates, compute exact keys in double, rank them
// by counting, write the k first with the metric's distance and the row's exact k-th key,
// or +inf where some candidate's exact key is farther than err from its approximate one
// (no certificate). The launcher certifies rows from the k-th key (topk.certify).
template <typename T, typename G>
__global__ void rerank(const T* __restrict__ x, long long n, long long dim, int metric,
                       const long long* __restrict__ rows, long long n_q,
                       const G* __restrict__ cand_key, const long long* __restrict__ cand_idx,
                       int K, int k, const double* __restrict__ err,
                       long long* __restrict__ out_idx, double* __restrict__ out_dist,
                       double* __restrict__ kth_key) {
    __shared__ double s_key[WARPS_PER_BLOCK][TOPK_MAX];
    __shared__ long long s_idx[WARPS_PER_BLOCK][TOPK_MAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long q = (long long)blockIdx.x * WARPS_PER_BLOCK + warp;
    if (q >= n_q) return;
    const long long self = rows[q];
    double* keys = s_key[warp];
    long long* idx = s_idx[warp];
    bool has_self = false, consistent = true;
    for (int c = lane; c < K; c += 32) {
        const long long j = cand_idx[q * K + c];
        const bool valid = j >= 0 && j < n;
        idx[c] = j;
        keys[c] = valid ? exact_key(x, dim, self, j, metric) : __longlong_as_double(0x7ff0000000000000LL);
        has_self |= j == self;
        // the exact key within err of the approximate one (L1 keys are exact sums: no bound)
        if (valid && metric != 3 && !(fabs(keys[c] - (double)cand_key[q * K + c]) <= err[q])) consistent = false;
    }
    consistent = __all_sync(FULL_MASK, consistent);
    __syncwarp();
    // With many exact duplicates the point itself may be missing: it replaces the list's
    // last (approximately worst) candidate.
    if (!__any_sync(FULL_MASK, has_self)) {
        if (lane == 0) { idx[K - 1] = self; keys[K - 1] = 0.0; }
        __syncwarp();
    }
    double kth = 0.0;
    for (int c = lane; c < K; c += 32) {
        const double key = keys[c];
        const long long j = idx[c];
        int rank = 0;
        for (int o = 0; o < K; ++o) rank += ranks_before(keys[o], idx[o], key, j, self);
        if (rank < k) {
            double dist = key;
            if (metric == 0) dist = sqrt(key);
            else if (metric == 2) dist = 0.5 * key;
            out_idx[q * k + rank] = j;
            out_dist[q * k + rank] = dist;
            kth = fmax(kth, key);
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) kth = fmax(kth, __shfl_xor_sync(FULL_MASK, kth, offset));
    if (lane == 0) kth_key[q] = consistent ? kth : __longlong_as_double(0x7ff0000000000000LL);
}

// ---------------------------------------------------------------- fused TF32 candidate pass
// The K best candidates of every row among all rows, with the products on the tensor cores
// and the distances never leaving the chip: a block owns 256 query rows (8 warps x two m16
// tiles, their TF32 fragments held in registers for the whole run) and streams the
// reference rows through shared memory 64 at a time (cp.async, two stages). Each warp
// multiplies its 32 queries with the chunk (mma.sync m16n8k8, FP32 accumulators), turns the
// products into keys ||b||^2 - 2ab and passes those not after its row's current K-th into a
// per-row buffer; a full buffer is merged into the row's sorted list by the whole warp.
// The kept set is exactly the K smallest (key, index) pairs whatever the timing of the
// merges, so the result is deterministic. Vectors arrive rounded to TF32 (lower 13 bits
// zero) and padded: rows to a multiple of FUSED_QUERIES, features to a multiple of 8.
#define FUSED_WARPS 8
#define FUSED_QUERIES (FUSED_WARPS * 32)          // two m16 tiles per warp
#define FUSED_REFS 64                             // eight n8 tiles per chunk
#define FUSED_MAX_DIM 64                          // eight k8 steps
#define FUSED_STRIDE (FUSED_MAX_DIM + 4)          // shared row stride in floats: B fragments hit 32 banks
#define FUSED_BUF 16                              // pending candidates per query row
#define FUSED_MAX_K 64
#define FUSED_EMPTY_INDEX 0x7fffffff              // empty list slots: key +inf, indices below this
static_assert(FUSED_MAX_K + FUSED_BUF <= 96, "fused_merge holds three pairs per lane");
static_assert(FUSED_STRIDE % 4 == 0, "cp.async writes 16-byte pieces of each shared row");
static_assert(FUSED_REFS == 64, "a thread's 64 accumulators are numbered v = (mt * 8 + nt) * 4 + c");

// The four PTX instructions the fused pass uses. tests/cuda_on_threads.h supplies host
// versions of them (and of the CUDA built-ins), so that this file also runs on a CPU.
#ifndef GPUSC_HOST_EMULATION
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void copy16_async(void* shared, const void* global) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(global) : "memory");
}

__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most `pending` of this thread's committed copy groups are still in flight.
template <int pending>
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory"); }
#endif

__device__ __forceinline__ bool fused_before(float k1, int i1, float k2, int i2) {
    return k1 < k2 || (k1 == k2 && i1 < i2);
}

// Merge a row's buffer (m pending pairs) into its ascending list of K by the whole warp:
// the new rank of a list entry is its place plus the buffer pairs before it, that of a
// buffer pair the list entries before it (binary search) plus the buffer pairs before it.
__device__ void fused_merge(float* list_key, int* list_idx, const float* buf_key, const int* buf_idx,
                            int m, int K, float* thr_key, int* thr_idx) {
    const int lane = threadIdx.x & 31;
    float key[3];
    int idx[3], rank[3];
#pragma unroll
    for (int r = 0; r < 3; ++r) {  // K + m <= FUSED_MAX_K + FUSED_BUF = 80 pairs, three per lane
        const int s = lane + 32 * r;
        rank[r] = FUSED_MAX_K;  // dropped
        if (s < K + m) {
            const bool listed = s < K;
            key[r] = listed ? list_key[s] : buf_key[s - K];
            idx[r] = listed ? list_idx[s] : buf_idx[s - K];
            int place = s;
            if (!listed) {
                int lo = 0, hi = K;
                while (lo < hi) {
                    const int mid = (lo + hi) >> 1;
                    if (fused_before(list_key[mid], list_idx[mid], key[r], idx[r])) lo = mid + 1;
                    else hi = mid;
                }
                place = lo;
            }
            for (int o = 0; o < m; ++o) place += fused_before(buf_key[o], buf_idx[o], key[r], idx[r]);
            rank[r] = place;
        }
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < 3; ++r) {
        if (rank[r] < K) { list_key[rank[r]] = key[r]; list_idx[rank[r]] = idx[r]; }
        if (rank[r] == K - 1) { *thr_key = key[r]; *thr_idx = idx[r]; }
    }
    __syncwarp();
}

// Merge every row of this warp whose buffer is full (or, with all = true, not empty).
__device__ void fused_merge_rows(int row0, int K, bool all, float* s_list_key, int* s_list_idx,
                                 const float* s_buf_key, const int* s_buf_idx, int* s_count,
                                 float* s_thr_key, int* s_thr_idx) {
    for (int r = row0; r < row0 + 32; ++r) {
        const int count = s_count[r];  // the same in every lane: a uniform branch
        if (count >= FUSED_BUF || (all && count > 0)) {
            fused_merge(s_list_key + r * K, s_list_idx + r * K, s_buf_key + r * FUSED_BUF,
                        s_buf_idx + r * FUSED_BUF, min(count, FUSED_BUF), K, s_thr_key + r, s_thr_idx + r);
            if ((threadIdx.x & 31) == 0) s_count[r] = 0;
            __syncwarp();
        }
    }
}

// grid: (q_end - q_first) / FUSED_QUERIES blocks (rounded up) of FUSED_WARPS * 32 threads;
// dynamic shared memory as laid out below (fused_shared_bytes in the launcher).
// n < 2^31 - FUSED_MAX_K. Query rows [q_first, q_end) against all n references, q_first a
// multiple of FUSED_QUERIES (vecs is padded to whole blocks); row q's list lands at row
// q - q_first of cand_key/cand_idx, so one worker of several can take a block of queries.
__global__ void __launch_bounds__(FUSED_WARPS * 32, 1)
fused_candidates(const float* __restrict__ vecs, const float* __restrict__ norms, long long n,
                 int dim_pad, int K, long long q_first, long long q_end, float* __restrict__ cand_key,
                 long long* __restrict__ cand_idx) {
    extern __shared__ __align__(16) unsigned char smem[];
    float* s_ref = reinterpret_cast<float*>(smem);               // [2][FUSED_REFS][FUSED_STRIDE]
    float* s_norm = s_ref + 2 * FUSED_REFS * FUSED_STRIDE;        // [2][FUSED_REFS]
    float* s_list_key = s_norm + 2 * FUSED_REFS;                  // [FUSED_QUERIES][K], ascending
    int* s_list_idx = reinterpret_cast<int*>(s_list_key + FUSED_QUERIES * K);
    float* s_buf_key = reinterpret_cast<float*>(s_list_idx + FUSED_QUERIES * K);  // [FUSED_QUERIES][FUSED_BUF]
    int* s_buf_idx = reinterpret_cast<int*>(s_buf_key + FUSED_QUERIES * FUSED_BUF);
    int* s_count = s_buf_idx + FUSED_QUERIES * FUSED_BUF;         // [FUSED_QUERIES]
    float* s_thr_key = reinterpret_cast<float*>(s_count + FUSED_QUERIES);  // the list's K-th
    int* s_thr_idx = reinterpret_cast<int*>(s_thr_key + FUSED_QUERIES);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
    const int row0 = warp * 32;             // this warp's first query row in the block
    const long long q_block = q_first + (long long)blockIdx.x * FUSED_QUERIES;
    const int ksteps = dim_pad >> 3;
    const long long n_chunks = (n + FUSED_REFS - 1) / FUSED_REFS;

    for (int s = threadIdx.x; s < FUSED_QUERIES * K; s += blockDim.x) {
        const int slot = s % K;
        s_list_key[s] = __int_as_float(0x7f800000);
        s_list_idx[s] = FUSED_EMPTY_INDEX - (K - 1) + slot;  // distinct, ascending
    }
    for (int r = threadIdx.x; r < FUSED_QUERIES; r += blockDim.x) {
        s_count[r] = 0;
        s_thr_key[r] = __int_as_float(0x7f800000);
        s_thr_idx[r] = FUSED_EMPTY_INDEX;
    }

    // A fragments of the warp's two m16 tiles: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
    unsigned a_frag[2][FUSED_MAX_DIM / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
        const float* lo = vecs + (q_block + row0 + mt * 16 + g) * dim_pad;
        const float* hi = lo + 8 * (long long)dim_pad;
#pragma unroll
        for (int s = 0; s < FUSED_MAX_DIM / 8; ++s) {
            const bool used = s < ksteps;
            a_frag[mt][s][0] = used ? __float_as_uint(lo[s * 8 + t]) : 0u;
            a_frag[mt][s][1] = used ? __float_as_uint(hi[s * 8 + t]) : 0u;
            a_frag[mt][s][2] = used ? __float_as_uint(lo[s * 8 + t + 4]) : 0u;
            a_frag[mt][s][3] = used ? __float_as_uint(hi[s * 8 + t + 4]) : 0u;
        }
    }

    auto load_chunk = [&](int stage, long long chunk) {
        const long long r0 = chunk * FUSED_REFS;
        float* dst = s_ref + stage * FUSED_REFS * FUSED_STRIDE;
        const int pieces = dim_pad >> 2;  // 16-byte pieces per row
        for (int p = threadIdx.x; p < FUSED_REFS * pieces; p += blockDim.x) {
            const int r = p / pieces, c = (p - r * pieces) * 4;
            copy16_async(dst + r * FUSED_STRIDE + c, vecs + (r0 + r) * dim_pad + c);
        }
        if (threadIdx.x < FUSED_REFS / 4)
            copy16_async(s_norm + stage * FUSED_REFS + threadIdx.x * 4, norms + r0 + threadIdx.x * 4);
        copy_async_commit();
    };

    load_chunk(0, 0);
    for (long long chunk = 0; chunk < n_chunks; ++chunk) {
        const int stage = (int)(chunk & 1);
        if (chunk + 1 < n_chunks) {
            load_chunk(stage ^ 1, chunk + 1);
            copy_async_wait<1>();
        } else {
            copy_async_wait<0>();
        }
        __syncthreads();  // this chunk is in shared memory for every thread; lists initialised

        // acc[mt][nt]: c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1)
        float acc[2][FUSED_REFS / 8][4];
#pragma unroll
        for (int v = 0; v < 64; ++v) acc[v >> 5][(v >> 2) & 7][v & 3] = 0.0f;
        const float* ref = s_ref + stage * FUSED_REFS * FUSED_STRIDE;
#pragma unroll
        for (int s = 0; s < FUSED_MAX_DIM / 8; ++s) {
            if (s < ksteps) {
#pragma unroll
                for (int nt = 0; nt < FUSED_REFS / 8; ++nt) {
                    // b0 (k = t, n = g), b1 (k = t + 4, n = g): reference row nt * 8 + g
                    const float* b = ref + (nt * 8 + g) * FUSED_STRIDE + s * 8 + t;
                    const unsigned b0 = __float_as_uint(b[0]), b1 = __float_as_uint(b[4]);
                    mma_tf32(acc[0][nt], a_frag[0][s], b0, b1);
                    mma_tf32(acc[1][nt], a_frag[1][s], b0, b1);
                }
            }
        }

        const float* norm = s_norm + stage * FUSED_REFS;
        float ref_norm[FUSED_REFS / 8][2];
#pragma unroll
        for (int nt = 0; nt < FUSED_REFS / 8; ++nt) {
            ref_norm[nt][0] = norm[nt * 8 + 2 * t];
            ref_norm[nt][1] = norm[nt * 8 + 2 * t + 1];
        }
        // The four rows this thread serves: row0 + mt * 16 + h * 8 + g.
        float thr[2][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) thr[mt][h] = s_thr_key[row0 + mt * 16 + h * 8 + g];
        // Value v of the thread's 64 accumulators is acc[mt][nt][c] with mt = v / 32,
        // nt = v / 4 % 8, c = v % 4 (compile-time after unrolling); bit v of `pending`.
        // Fast test: key <= the row's K-th key (a superset of what may enter).
        unsigned long long pending = 0ull;
#pragma unroll
        for (int v = 0; v < 64; ++v) {
            const int mt = v >> 5, nt = (v >> 2) & 7, c = v & 3;
            const float key = fmaf(-2.0f, acc[mt][nt][c], ref_norm[nt][c & 1]);
            if (key <= thr[mt][c >> 1]) pending |= 1ull << v;
        }

        const long long r0 = chunk * FUSED_REFS;
        while (__any_sync(FULL_MASK, pending != 0ull)) {
            // Exact test against (K-th key, K-th index) and a place in the row's buffer.
#pragma unroll
            for (int v = 0; v < 64; ++v) {
                const int mt = v >> 5, nt = (v >> 2) & 7, c = v & 3;
                if (pending & (1ull << v)) {
                    const int row = row0 + mt * 16 + (c >> 1) * 8 + g;
                    const long long j = r0 + nt * 8 + 2 * t + (c & 1);
                    const float key = fmaf(-2.0f, acc[mt][nt][c], ref_norm[nt][c & 1]);
                    bool done = true;
                    if (j < n && fused_before(key, (int)j, s_thr_key[row], s_thr_idx[row])) {
                        const int pos = atomicAdd(s_count + row, 1);
                        if (pos < FUSED_BUF) {
                            s_buf_key[row * FUSED_BUF + pos] = key;
                            s_buf_idx[row * FUSED_BUF + pos] = (int)j;
                        } else {
                            done = false;  // the buffer is full: after the merge
                        }
                    }
                    if (done) pending &= ~(1ull << v);
                }
            }
            __syncwarp();
            if (!__any_sync(FULL_MASK, pending != 0ull)) break;
            fused_merge_rows(row0, K, false, s_list_key, s_list_idx, s_buf_key, s_buf_idx, s_count,
                             s_thr_key, s_thr_idx);
        }
        __syncthreads();  // the other stage may be refilled now
    }
    fused_merge_rows(row0, K, true, s_list_key, s_list_idx, s_buf_key, s_buf_idx, s_count, s_thr_key,
                     s_thr_idx);
    for (int r = row0; r < row0 + 32; ++r) {
        const long long q = q_block + r;
        if (q >= q_end) break;
        const float q_norm = norms[q];
        const long long out = q - q_first;
        for (int s = lane; s < K; s += 32) {
            cand_key[out * K + s] = s_list_key[r * K + s] + q_norm;
            cand_idx[out * K + s] = (long long)s_list_idx[r * K + s];
        }
    }
}
