// Harmony's per-cell steps (launchers and numba twins: gpusc._kernels.harmony). Soft
// assignments R and distances are cells x clusters, row-major, float. Per-batch sums of R are
// kept in fixed point (value * 2^32, rounded, as unsigned 64-bit integers): exact and the same
// in any order of the atomic additions. The cells of a pass come in tiles of consecutive
// cells, the tiles in the order of tile_at, a seeded bijection that the host computes the
// same way.
#include "_common.cuh"

#define HARMONY_FIXED_SCALE 4294967296.0

// lowbias32: a 32-bit integer hash.
__device__ __forceinline__ unsigned int mix32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// The splitmix64 finaliser.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Cells are visited in tiles of HARMONY_TILE consecutive cells, the tiles in a seeded order.
#define HARMONY_TILE 16

// The tile visited at `position` of a pass: a 4-round Feistel network on 2 * half bits
// (half <= 16), cycle-walked back into 0..n-1, so positions 0..n-1 give every tile once.
// half == 0: the identity.
__device__ __forceinline__ long long tile_at(long long position, long long n, int half,
                                             unsigned int k0, unsigned int k1, unsigned int k2,
                                             unsigned int k3) {
    if (half == 0) return position;
    const unsigned int mask = (1u << half) - 1u;
    unsigned long long x = (unsigned long long)position;
    do {
        unsigned int left = (unsigned int)(x >> half), right = (unsigned int)(x & mask), t;
        t = right; right = left ^ (mix32(right ^ k0) & mask); left = t;
        t = right; right = left ^ (mix32(right ^ k1) & mask); left = t;
        t = right; right = left ^ (mix32(right ^ k2) & mask); left = t;
        t = right; right = left ^ (mix32(right ^ k3) & mask); left = t;
        x = ((unsigned long long)left << half) | right;
    } while (x >= (unsigned long long)n);
    return (long long)x;
}

// The cell at `slot` of the tiles from position first_tile on (>= n_cells past the last cell).
__device__ __forceinline__ long long slot_cell(long long slot, long long first_tile, long long n_tiles,
                                               int half, unsigned int k0, unsigned int k1,
                                               unsigned int k2, unsigned int k3) {
    const long long tile = tile_at(first_tile + slot / HARMONY_TILE, n_tiles, half, k0, k1, k2, k3);
    return tile * HARMONY_TILE + slot % HARMONY_TILE;
}

template <typename T>
__device__ __forceinline__ T warp_all_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_all_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Adds value (in fixed point) to row b of each of the cell's batches, column k. Row n_batches
// (all cells) is left to the launcher: the batch rows add up to n_cov times it, exactly.
__device__ __forceinline__ void add_fixed(unsigned long long* sums, const int* batches, int n_cov,
                                          int n_clusters, int k, float value) {
    const unsigned long long fixed = (unsigned long long)((double)value * HARMONY_FIXED_SCALE + 0.5);
    for (int v = 0; v < n_cov; ++v) atomicAdd(&sums[(long long)batches[v] * n_clusters + k], fixed);
}

// The block's (n_batches + 1) x n_clusters sums: in shared memory when use_shared (zeroed
// here), else the global ones.
extern __shared__ __align__(8) unsigned char harmony_smem[];

__device__ __forceinline__ unsigned long long* start_sums(unsigned long long* global, int use_shared,
                                                          long long size) {
    if (!use_shared) return global;
    unsigned long long* local = reinterpret_cast<unsigned long long*>(harmony_smem);
    for (long long i = threadIdx.x; i < size; i += blockDim.x) local[i] = 0ull;
    __syncthreads();
    return local;
}

__device__ __forceinline__ void finish_sums(unsigned long long* global, const unsigned long long* local,
                                            int use_shared, long long size) {
    if (!use_shared) return;
    __syncthreads();
    for (long long i = threadIdx.x; i < size; i += blockDim.x)
        if (local[i]) atomicAdd(&global[i], local[i]);
}

// One warp per row: out = x / |x| (squares summed in double); a zero row is copied.
template <typename T>
__global__ void unit_rows(const T* x, T* out, long long n, int d) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n) return;  // the whole warp leaves together
    const T* in = x + row * d;
    T* to = out + row * d;
    double total = 0.0;
    for (int a = lane; a < d; a += 32) total += (double)in[a] * (double)in[a];
    total = warp_all_sum(total);
    const T norm = total == 0.0 ? T(1) : (T)sqrt(total);
    for (int a = lane; a < d; a += 32) to[a] = total == 0.0 ? in[a] : in[a] / norm;
}

// One warp per cell slot of the pass (grid-strided over the n_slots slots of the tiles from
// first_tile on); lanes stride the clusters: the fixed-point per-batch sums of the cell's
// current R row.
template <typename T>
__global__ void batch_sums(const T* r, const int* cell_batches, int n_cov, int n_batches,
                           int n_clusters, long long first_tile, long long n_slots, long long n_tiles,
                           long long n_cells, int half, unsigned int k0, unsigned int k1,
                           unsigned int k2, unsigned int k3, unsigned long long* sums,
                           int use_shared) {
    const long long size = (long long)(n_batches + 1) * n_clusters;
    unsigned long long* acc = start_sums(sums, use_shared, size);
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long i = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); i < n_slots; i += warps) {
        const long long cell = slot_cell(i, first_tile, n_tiles, half, k0, k1, k2, k3);
        if (cell >= n_cells) continue;  // the whole warp
        const T* row = r + cell * n_clusters;
        const int* batches = cell_batches + cell * n_cov;
        for (int k = lane; k < n_clusters; k += 32)
            add_fixed(acc, batches, n_cov, n_clusters, k, (float)row[k]);
    }
    finish_sums(sums, acc, use_shared, size);
}

// One warp per cell slot of the pass (as batch_sums); lanes stride the clusters. The cell's
// soft assignment: logits -dist * inv_sigma (with similarity, dist first holds cosine similarities and
// becomes 2 (1 - s) in place), plus log_div of each of the cell's batches when log_div is
// given; a softmax shifted by the largest logit, written to R; its fixed-point per-batch sums;
// and the objective terms sum(p dist) and sum(sigma p log p) = (sum sigma e s - log(total)
// sum sigma e) / total (e = exp(s), s the shifted logit), summed per block in a fixed tree into
// terms[2 * block] and terms[2 * block + 1].
template <typename T>
__global__ void assign_cells(T* dist, const T* sigma, const T* inv_sigma, const T* log_div,
                             const int* cell_batches, int n_cov, int n_batches, T* r, int n_clusters,
                             int similarity, long long first_tile, long long n_slots, long long n_tiles,
                             long long n_cells, int half, unsigned int k0, unsigned int k1,
                             unsigned int k2, unsigned int k3, unsigned long long* sums,
                             int use_shared, double* terms) {
    __shared__ double scratch[32];
    const long long size = (long long)(n_batches + 1) * n_clusters;
    unsigned long long* acc = start_sums(sums, use_shared, size);
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    double error = 0.0, entropy = 0.0;  // the warp's cells, in lane 0
    for (long long i = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); i < n_slots; i += warps) {
        const long long cell = slot_cell(i, first_tile, n_tiles, half, k0, k1, k2, k3);
        if (cell >= n_cells) continue;  // the whole warp
        T* d = dist + cell * n_clusters;
        T* p = r + cell * n_clusters;
        const int* batches = cell_batches + cell * n_cov;
        float largest = __int_as_float(0xff800000);  // -inf
        for (int k = lane; k < n_clusters; k += 32) {
            if (similarity) d[k] = T(2) * (T(1) - d[k]);
            float v = -d[k] * inv_sigma[k];
            if (log_div)
                for (int b = 0; b < n_cov; ++b) v += log_div[(long long)batches[b] * n_clusters + k];
            p[k] = v;
            largest = fmaxf(largest, v);
        }
        largest = warp_all_max(largest);
        double total = 0.0, weighted = 0.0, weighted_shifted = 0.0;
        for (int k = lane; k < n_clusters; k += 32) {
            const float s = (float)p[k] - largest;
            const float e = expf(s);
            p[k] = e;
            total += e;
            weighted += (double)sigma[k] * e;
            weighted_shifted += (double)sigma[k] * e * s;
        }
        total = warp_all_sum(total);
        weighted = warp_all_sum(weighted);
        weighted_shifted = warp_all_sum(weighted_shifted);
        double cell_error = 0.0;
        for (int k = lane; k < n_clusters; k += 32) {
            const float value = (float)((double)p[k] / total);
            p[k] = value;
            cell_error += (double)value * (double)d[k];
            add_fixed(acc, batches, n_cov, n_clusters, k, value);
        }
        cell_error = warp_all_sum(cell_error);
        if (lane == 0) {
            error += cell_error;
            entropy += (weighted_shifted - log(total) * weighted) / total;
        }
    }
    finish_sums(sums, acc, use_shared, size);
    error = block_sum(error, scratch);
    if (threadIdx.x == 0) terms[2 * (long long)blockIdx.x] = error;
    entropy = block_sum(entropy, scratch);
    if (threadIdx.x == 0) terms[2 * (long long)blockIdx.x + 1] = entropy;
}

// One thread per (batch b, cluster k): the log diversity penalty
// theta_b (log(2 E + 1) - log(O + E + 1)) with O = the batch's sum of R and E = share_b times
// the sum over all cells (row n_batches), both less the cells being reassigned (`removed`,
// may be null), from the fixed-point sums.
__global__ void log_diversity(const long long* o_sums, const long long* removed, const double* share,
                              const double* theta, int n_batches, int n_clusters, double scale,
                              float* out) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_batches * n_clusters) return;
    const int b = (int)(t / n_clusters), k = (int)(t % n_clusters);
    const long long all = (long long)n_batches * n_clusters + k;
    const double o = (double)(o_sums[t] - (removed ? removed[t] : 0ll)) / scale;
    const double total = (double)(o_sums[all] - (removed ? removed[all] : 0ll)) / scale;
    const double e = share[b] * total;
    out[t] = (float)(theta[b] * (log(2.0 * e + 1.0) - log(o + e + 1.0)));
}

// One thread per entry: o_sums += added - removed (exact integers).
__global__ void apply_delta(long long* o_sums, const long long* removed, const long long* added,
                            long long size) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < size) o_sums[t] += added[t] - removed[t];
}

// One thread per (cell i, column k) of the k-means start: the race key -log(u) / (|2 (1 - s)| +
// 1e-10) in place of the similarity s, with u uniform in (0, 1) from a hash of
// (seed, i * n_cols + k); the smallest key of a column picks a cell with probability
// proportional to its distance.
template <typename T>
__global__ void race_keys(T* sim, long long n, int n_cols, unsigned long long seed) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n * n_cols) return;
    const unsigned long long z = mix64(seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(t + 1));
    const float u = ((float)(z >> 40) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
    const float distance = fabsf(T(2) * (T(1) - sim[t]));
    sim[t] = -logf(u) / (distance + 1e-10f);
}
