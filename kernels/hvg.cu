// highly_variable_genes: per-gene (and per-batch) sums, sums of squares and expressed-cell
// counts in one pass over the matrix, accumulated in double and reduced in a fixed order.
#include "_common.cuh"

#define HVG_FLAG_NONINTEGER 4  // beyond _common.cuh's flags: a value with a fractional part

// How a stored value enters the sums (HVG_* in gpusc/_kernels/hvg.py):
//   IDENTITY  the value (cell_ranger on log data, seurat_v3's first pass on counts)
//   EXPM1     expm1(value * scale) in the value's own precision, as scanpy does for seurat
//   CLIP      min(value, clip[batch, gene]) in double (seurat_v3's second pass)
#define HVG_IDENTITY 0
#define HVG_EXPM1 1
#define HVG_CLIP 2

__device__ __forceinline__ float expm1_of(float v) { return expm1f(v); }
__device__ __forceinline__ double expm1_of(double v) { return expm1(v); }

template <typename T>
__device__ __forceinline__ double hvg_value(T v, int mode, double scale, double clip) {
    if (mode == HVG_EXPM1) return (double)expm1_of((T)((double)v * scale));
    const double d = (double)v;
    return mode == HVG_CLIP ? fmin(d, clip) : d;
}

template <typename T>
__device__ __forceinline__ int hvg_flags(T v) {
    return value_flags(v) | (floor(v) != v && isfinite((double)v) ? HVG_FLAG_NONINTEGER : 0);
}

// First position in indices[lo:hi] (sorted) holding a row >= row.
template <typename I>
__device__ __forceinline__ long long lower_bound(const I* indices, long long lo, long long hi,
                                                 long long row) {
    while (lo < hi) {
        const long long mid = lo + ((hi - lo) >> 1);
        if ((long long)indices[mid] < row) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// One warp per (gene, batch), warp = gene * n_batches + batch; lanes stride that batch's
// stretch of the gene's column and reduce with warp_sum (deterministic, no atomics on sums).
// Batch b is the row range batch_start[b]..batch_start[b+1]; with more than one batch the
// caller has permuted rows so batches are contiguous and sorted each column's row indices,
// so the stretch is found by binary search. Outputs are (n_batches, n_cols), row-major.
template <typename T, typename I>
__global__ void moments_csc(const T* data, const I* indices, const I* indptr, long long n_cols,
                            int n_batches, const long long* batch_start, int mode, double scale,
                            const double* clip, double* sum, double* sum_sq, long long* n_pos,
                            int* flags) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= n_cols * n_batches) return;  // whole warps leave together (blockDim % 32 == 0)
    const int lane = threadIdx.x & 31;
    const long long col = warp / n_batches;
    const int b = (int)(warp % n_batches);
    long long lo = (long long)indptr[col], hi = (long long)indptr[col + 1];
    if (n_batches > 1) {
        lo = lower_bound(indices, lo, hi, batch_start[b]);
        hi = lower_bound(indices, lo, hi, batch_start[b + 1]);
    }
    const long long out = (long long)b * n_cols + col;
    const double c = clip != nullptr ? clip[out] : 0.0;
    double s = 0.0, s2 = 0.0;
    long long pos = 0;
    int bad = 0;
    for (long long j = lo + lane; j < hi; j += 32) {
        const T v = data[j];
        bad |= hvg_flags(v);
        const double f = hvg_value(v, mode, scale, c);
        s += f;
        s2 += f * f;
        pos += v > T(0);
    }
    if (bad) atomicOr(flags, bad);
    s = warp_sum(s);
    s2 = warp_sum(s2);
    pos = warp_sum(pos);
    if (lane == 0) { sum[out] = s; sum_sq[out] = s2; n_pos[out] = pos; }
}

// One thread per (gene, row chunk), block = chunk * n_col_tiles + tile: the thread walks its
// chunk's rows down one column of the C-ordered matrix, so neighbouring threads read
// neighbouring genes (coalesced). Chunk k covers rows[chunk_start[k]:chunk_start[k+1]] (rows
// null: the identity order), all in batch chunk_batch[k]; partial sums go to row k of the
// (n_chunks, n_cols) outputs and sum_chunks adds them per batch in chunk order.
template <typename T>
__global__ void moments_dense(const T* x, long long n_cols, const long long* rows,
                              const long long* chunk_start, const int* chunk_batch,
                              long long n_chunks, int mode, double scale, const double* clip,
                              double* part_sum, double* part_sum_sq, long long* part_pos,
                              int* flags) {
    const long long n_col_tiles = (n_cols + blockDim.x - 1) / blockDim.x;
    const long long chunk = (long long)blockIdx.x / n_col_tiles;
    const long long col = ((long long)blockIdx.x % n_col_tiles) * blockDim.x + threadIdx.x;
    if (chunk >= n_chunks || col >= n_cols) return;
    const double c = clip != nullptr ? clip[(long long)chunk_batch[chunk] * n_cols + col] : 0.0;
    double s = 0.0, s2 = 0.0;
    long long pos = 0;
    int bad = 0;
    for (long long k = chunk_start[chunk]; k < chunk_start[chunk + 1]; ++k) {
        const long long row = rows != nullptr ? rows[k] : k;
        const T v = x[row * n_cols + col];
        bad |= hvg_flags(v);
        const double f = hvg_value(v, mode, scale, c);
        s += f;
        s2 += f * f;
        pos += v > T(0);
    }
    if (bad) atomicOr(flags, bad);
    const long long out = chunk * n_cols + col;
    part_sum[out] = s;
    part_sum_sq[out] = s2;
    part_pos[out] = pos;
}

// One thread per (batch, gene), thread = batch * n_cols + gene: adds the batch's chunk
// partials batch_chunks[batch]..batch_chunks[batch+1] in chunk order (deterministic).
__global__ void sum_chunks(const double* part_sum, const double* part_sum_sq,
                           const long long* part_pos, const long long* batch_chunks,
                           int n_batches, long long n_cols, double* sum, double* sum_sq,
                           long long* n_pos) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_batches * n_cols) return;
    const long long b = i / n_cols, col = i % n_cols;
    double s = 0.0, s2 = 0.0;
    long long pos = 0;
    for (long long k = batch_chunks[b]; k < batch_chunks[b + 1]; ++k) {
        s += part_sum[k * n_cols + col];
        s2 += part_sum_sq[k * n_cols + col];
        pos += part_pos[k * n_cols + col];
    }
    sum[i] = s;
    sum_sq[i] = s2;
    n_pos[i] = pos;
}

// ---------------------------------------------------------------- flavor="pearson_residuals"
// Per (batch, gene) sums of the clipped analytic Pearson residuals and of their squares,
// without the dense residual matrix. A cell with total t and a gene with batch total s give
// mu = s * t / total; the residual of a count v is (v - mu) / sqrt(mu + mu^2 / theta),
// clipped to [-clip, clip]. Sparse matrices: pearson_dense with x == nullptr adds the
// residual of a zero for every (cell, gene) of the batch (dense, compute-bound work), then
// pearson_csc adds f(v) - f(0) and f(v)^2 - f(0)^2 for each stored value. Genes with s == 0
// in a batch are left at 0 (scanpy drops them from that batch).

// NaN (a cell without counts: mu = 0/0) passes the clip unchanged, as in scanpy.
__device__ __forceinline__ double pearson_residual(double v, double t, double s, double total,
                                                   double theta, double clip) {
    const double mu = s * t / total;
    const double r = (v - mu) / sqrt(mu + mu * mu / theta);
    return r < -clip ? -clip : (r > clip ? clip : r);
}

// One thread per (gene, row chunk), block = chunk * n_col_tiles + tile, as moments_dense:
// the thread walks its chunk's rows (rows[chunk_start[k]:chunk_start[k+1]], all in batch
// chunk_batch[k]; rows null: identity) down one column of the C-ordered counts x (null: every
// value is 0) and writes the chunk's partial sums to row k of part_sum / part_sum_sq.
// cell_sums is indexed by the matrix row; gene_sums is (n_batches, n_cols).
template <typename T>
__global__ void pearson_dense(const T* x, long long n_cols, const long long* rows,
                              const long long* chunk_start, const int* chunk_batch,
                              long long n_chunks, const double* cell_sums,
                              const double* gene_sums, const double* batch_totals, double theta,
                              double clip, double* part_sum, double* part_sum_sq) {
    const long long n_col_tiles = (n_cols + blockDim.x - 1) / blockDim.x;
    const long long chunk = (long long)blockIdx.x / n_col_tiles;
    const long long col = ((long long)blockIdx.x % n_col_tiles) * blockDim.x + threadIdx.x;
    if (chunk >= n_chunks || col >= n_cols) return;
    const int b = chunk_batch[chunk];
    const double s = gene_sums[(long long)b * n_cols + col];
    const double total = batch_totals[b];
    double acc = 0.0, acc2 = 0.0;
    if (s != 0.0) {
        for (long long k = chunk_start[chunk]; k < chunk_start[chunk + 1]; ++k) {
            const long long row = rows != nullptr ? rows[k] : k;
            const double v = x != nullptr ? (double)x[row * n_cols + col] : 0.0;
            const double r = pearson_residual(v, cell_sums[row], s, total, theta, clip);
            acc += r;
            acc2 += r * r;
        }
    }
    const long long out = chunk * n_cols + col;
    part_sum[out] = acc;
    part_sum_sq[out] = acc2;
}

// One warp per (gene, batch), warp = gene * n_batches + batch, as moments_csc: lanes stride
// the batch's stretch of the gene's column (batches are contiguous row ranges with sorted
// row indices when n_batches > 1) and add f(v) - f(0), f(v)^2 - f(0)^2 of each stored value;
// warp_sum reduces (no atomics). cell_sums is indexed by the matrix row; the matrix has no
// duplicate entries (the caller sums them). Outputs are (n_batches, n_cols).
template <typename T, typename I>
__global__ void pearson_csc(const T* data, const I* indices, const I* indptr, long long n_cols,
                            int n_batches, const long long* batch_start, const double* cell_sums,
                            const double* gene_sums, const double* batch_totals, double theta,
                            double clip, double* sum, double* sum_sq) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= n_cols * n_batches) return;  // whole warps leave together
    const int lane = threadIdx.x & 31;
    const long long col = warp / n_batches;
    const int b = (int)(warp % n_batches);
    const long long out = (long long)b * n_cols + col;
    const double s = gene_sums[out];
    const double total = batch_totals[b];
    long long lo = (long long)indptr[col], hi = (long long)indptr[col + 1];
    if (n_batches > 1) {
        lo = lower_bound(indices, lo, hi, batch_start[b]);
        hi = lower_bound(indices, lo, hi, batch_start[b + 1]);
    }
    double acc = 0.0, acc2 = 0.0;
    if (s != 0.0) {
        for (long long j = lo + lane; j < hi; j += 32) {
            const double t = cell_sums[(long long)indices[j]];
            const double r = pearson_residual((double)data[j], t, s, total, theta, clip);
            const double r0 = pearson_residual(0.0, t, s, total, theta, clip);
            acc += r - r0;
            acc2 += r * r - r0 * r0;
        }
    }
    acc = warp_sum(acc);
    acc2 = warp_sum(acc2);
    if (lane == 0) { sum[out] = acc; sum_sq[out] = acc2; }
}

// One thread per (batch, gene), thread = batch * n_cols + gene: adds the batch's chunk
// partials batch_chunks[batch]..batch_chunks[batch+1] in chunk order, then the stored-value
// corrections of pearson_csc when given (null for dense counts).
__global__ void pearson_sum_chunks(const double* part_sum, const double* part_sum_sq,
                                   const long long* batch_chunks, int n_batches,
                                   long long n_cols, const double* extra_sum,
                                   const double* extra_sum_sq, double* sum, double* sum_sq) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_batches * n_cols) return;
    const long long b = i / n_cols, col = i % n_cols;
    double s = 0.0, s2 = 0.0;
    for (long long k = batch_chunks[b]; k < batch_chunks[b + 1]; ++k) {
        s += part_sum[k * n_cols + col];
        s2 += part_sum_sq[k * n_cols + col];
    }
    if (extra_sum != nullptr) { s += extra_sum[i]; s2 += extra_sum_sq[i]; }
    sum[i] = s;
    sum_sq[i] = s2;
}

// ---------------------------------------------------------------- flavor="poisson_gene_selection"
// Expected fraction of zeros of each (batch, gene) under a Poisson model: the mean over the
// batch's cells c of exp(-scaled_mean[b, g] * total[c]). Cells with the same total give the
// same term, so the caller groups them: totals[k] for k in batch_start[b]..batch_start[b+1]
// are the batch's distinct cell totals and weights[k] how many cells have each (exact in
// double below 2^53).

// One thread per (batch, gene), thread = batch * n_cols + gene: the thread walks its batch's
// distinct totals in order (the same order as the numba twin; neighbouring threads read the
// same total, a broadcast) and writes the weighted mean to expected[batch, gene].
__global__ void poisson_expected_zeros(const double* scaled_means, const double* totals,
                                       const double* weights, const long long* batch_start,
                                       int n_batches, long long n_cols, double* expected) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_batches * n_cols) return;
    const long long b = i / n_cols;
    const double m = scaled_means[i];
    double acc = 0.0, n = 0.0;
    for (long long k = batch_start[b]; k < batch_start[b + 1]; ++k) {
        acc += weights[k] * exp(-m * totals[k]);
        n += weights[k];
    }
    expected[i] = acc / n;
}
