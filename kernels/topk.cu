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
// by counting, write the k first with the metric's distance, and certify the row: no
// point outside the list can be nearer than its k-th (list's worst key minus err).
template <typename T, typename G>
__global__ void rerank(const T* __restrict__ x, long long n, long long dim, int metric,
                       const long long* __restrict__ rows, long long n_q,
                       const G* __restrict__ cand_key, const long long* __restrict__ cand_idx,
                       int K, int k, const double* __restrict__ err,
                       long long* __restrict__ out_idx, double* __restrict__ out_dist,
                       int* __restrict__ certified) {
    __shared__ double s_key[WARPS_PER_BLOCK][TOPK_MAX];
    __shared__ long long s_idx[WARPS_PER_BLOCK][TOPK_MAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long q = (long long)blockIdx.x * WARPS_PER_BLOCK + warp;
    if (q >= n_q) return;
    const long long self = rows[q];
    double* keys = s_key[warp];
    long long* idx = s_idx[warp];
    bool has_self = false;
    for (int c = lane; c < K; c += 32) {
        const long long j = cand_idx[q * K + c];
        const bool valid = j >= 0 && j < n;
        idx[c] = j;
        keys[c] = valid ? exact_key(x, dim, self, j, metric) : __longlong_as_double(0x7ff0000000000000LL);
        has_self |= j == self;
    }
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
    if (lane == 0) {
        const double worst = (double)cand_key[q * K + K - 1];
        certified[q] = (K == n || kth <= worst - err[q]) ? 1 : 0;
    }
}
