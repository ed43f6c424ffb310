// Per-gene moments by group: for every group g and gene j, over the group's cells, the sum and
// the sum of squares of the (transformed) values and the number of counted values, in double,
// from CSR or C-ordered dense matrices read row by row (never transposed), and reduced in a fixed
// order (deterministic, no floating-point atomics). highly_variable_genes, scale, the Pearson
// residuals, calculate_qc_metrics' per-gene columns and the per-group statistics of
// rank_genes_groups and aggregate all come from here.
//
// Rows reach the kernels in slices: slice s covers rows[slice_start[s]:slice_start[s+1]] (rows
// null: the identity order), all in group slice_group[s]. Each slice is summed by one warp (CSR)
// or one thread per gene (dense) into its own part of `part`, laid out [slice][array][gene]; then
// sum_slices adds each group's slices in slice order. Implicit zeros add nothing to any sum (every
// transform maps 0 to 0; the Pearson pass adds the residual of a zero separately).
#include "_common.cuh"

#define MOMENTS_FLAG_NONINTEGER 4  // beyond _common.cuh's flags: a value with a fractional part

// How a stored value enters the sums (MODE_* in gpusc/_kernels/moments.py):
//   IDENTITY  the value
//   EXPM1     expm1(value * scale) in the value's own precision, as scanpy's seurat flavor does
//   CLIP      min(value, clip[group, gene]) in double (seurat_v3's clipped second moment)
#define MODE_IDENTITY 0
#define MODE_EXPM1 1
#define MODE_CLIP 2
// What the third array counts (COUNT_* in moments.py): nothing, values > 0, values != 0.
#define COUNT_NONE 0
#define COUNT_POSITIVE 1
#define COUNT_NONZERO 2

__device__ __forceinline__ float expm1_of(float v) { return expm1f(v); }
__device__ __forceinline__ double expm1_of(double v) { return expm1(v); }

template <typename T>
__device__ __forceinline__ double transformed(T v, int mode, double scale, double clip) {
    if (mode == MODE_EXPM1) return (double)expm1_of((T)((double)v * scale));
    const double d = (double)v;
    return mode == MODE_CLIP ? fmin(d, clip) : d;
}

// NaN/inf; a set sign bit (-0.0 too: scanpy's count check is np.signbit); a fractional part.
template <typename T>
__device__ __forceinline__ int moment_flags(T v) {
    const double d = (double)v;
    if (!isfinite(d)) return GPUSC_FLAG_NONFINITE;
    return (signbit(d) ? GPUSC_FLAG_NEGATIVE : 0) | (d != floor(d) ? MOMENTS_FLAG_NONINTEGER : 0);
}

__device__ __forceinline__ bool counted(double v, int count) {
    return count == COUNT_POSITIVE ? v > 0.0 : (count == COUNT_NONZERO && v != 0.0);
}

// A thread's running sums of one gene: the transformed values, their squares, the counted ones.
struct GeneSums {
    double sum = 0.0, sum_sq = 0.0, count = 0.0;
    int flags = 0;
    template <typename T>
    __device__ void add(T v, int mode, double scale, double clip, int count_mode) {
        flags |= moment_flags(v);
        const double f = transformed(v, mode, scale, clip);
        sum += f;
        sum_sq += f * f;
        count += counted((double)v, count_mode) ? 1.0 : 0.0;
    }
};

// One warp per slice: the warp walks its slice's rows in order and the lanes stride each row's
// stored values into the slice's own part (sum, then sum of squares when with_squares, then the
// count when count != COUNT_NONE). A row's columns are distinct (the caller sums duplicates
// first), so no two lanes touch one address between __syncwarp()s.
template <typename T, typename I>
__global__ void moments_csr(const T* data, const I* indices, const I* indptr, long long n_cols,
                            const long long* rows, const long long* slice_start,
                            const int* slice_group, long long n_slices, int mode, double scale,
                            const double* clip, int with_squares, int count, double* part,
                            int* flags) {
    const long long slice = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (slice >= n_slices) return;  // whole warps leave together (blockDim % 32 == 0)
    const int lane = threadIdx.x & 31;
    const int n_arrays = 1 + (with_squares != 0) + (count != COUNT_NONE);
    double* sums = part + slice * n_arrays * n_cols;
    double* squares = with_squares ? sums + n_cols : nullptr;
    double* counts = count != COUNT_NONE ? sums + (n_arrays - 1) * n_cols : nullptr;
    const double* clip_row = clip != nullptr ? clip + (long long)slice_group[slice] * n_cols : nullptr;
    int bad = 0;
    for (long long k = slice_start[slice]; k < slice_start[slice + 1]; ++k) {
        const long long r = rows != nullptr ? rows[k] : k;
        const long long e = (long long)indptr[r + 1];
        for (long long j = (long long)indptr[r] + lane; j < e; j += 32) {
            const T v = data[j];
            bad |= moment_flags(v);
            const long long c = (long long)indices[j];
            const double f = transformed(v, mode, scale, clip_row != nullptr ? clip_row[c] : 0.0);
            sums[c] += f;
            if (squares != nullptr) squares[c] += f * f;
            if (counts != nullptr && counted((double)v, count)) counts[c] += 1.0;
        }
        __syncwarp();  // orders this row's updates before the next row's
    }
    if (bad) atomicOr(flags, bad);
}

// One thread per (gene, slice), block = slice * n_col_tiles + tile: the thread walks its slice's
// rows down one column of the C-ordered matrix, so neighbouring threads read neighbouring genes
// (coalesced), and writes the slice's part of that gene.
template <typename T>
__global__ void moments_dense(const T* x, long long n_cols, const long long* rows,
                              const long long* slice_start, const int* slice_group,
                              long long n_slices, int mode, double scale, const double* clip,
                              int with_squares, int count, double* part, int* flags) {
    const long long n_col_tiles = (n_cols + blockDim.x - 1) / blockDim.x;
    const long long slice = (long long)blockIdx.x / n_col_tiles;
    const long long col = ((long long)blockIdx.x % n_col_tiles) * blockDim.x + threadIdx.x;
    if (slice >= n_slices || col >= n_cols) return;
    const double c = clip != nullptr ? clip[(long long)slice_group[slice] * n_cols + col] : 0.0;
    GeneSums g;
    for (long long k = slice_start[slice]; k < slice_start[slice + 1]; ++k) {
        const long long row = rows != nullptr ? rows[k] : k;
        g.add(x[row * n_cols + col], mode, scale, c, count);
    }
    if (g.flags) atomicOr(flags, g.flags);
    const int n_arrays = 1 + (with_squares != 0) + (count != COUNT_NONE);
    double* out = part + slice * n_arrays * n_cols + col;
    out[0] = g.sum;
    if (with_squares) out[n_cols] = g.sum_sq;
    if (count != COUNT_NONE) out[(n_arrays - 1) * n_cols] = g.count;
}

// CSC input in one group (no transpose needed): one warp per gene, warp = gene; the lanes stride
// the gene's stored values and warp_sum reduces in a fixed order. Writes out[array][0][gene].
template <typename T, typename I>
__global__ void moments_csc(const T* data, const I* indptr, long long n_cols, int mode,
                            double scale, const double* clip, int with_squares, int count,
                            double* out, int* flags) {
    const long long col = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (col >= n_cols) return;  // whole warps leave together
    const int lane = threadIdx.x & 31;
    const double c = clip != nullptr ? clip[col] : 0.0;
    GeneSums g;
    for (long long j = (long long)indptr[col] + lane; j < (long long)indptr[col + 1]; j += 32)
        g.add(data[j], mode, scale, c, count);
    if (g.flags) atomicOr(flags, g.flags);
    const double s = warp_sum(g.sum), s2 = warp_sum(g.sum_sq), n = warp_sum(g.count);
    if (lane == 0) {
        out[col] = s;
        int a = 1;
        if (with_squares) out[a++ * n_cols + col] = s2;
        if (count != COUNT_NONE) out[a * n_cols + col] = n;
    }
}

// One thread per (array, group, gene), thread = (array * n_groups + group) * n_cols + gene: adds
// the group's slices group_slices[group]..group_slices[group+1] in slice order (deterministic)
// into out[array][group][gene].
__global__ void sum_slices(const double* part, int n_arrays, const long long* group_slices,
                           int n_groups, long long n_cols, double* out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_arrays * n_groups * n_cols) return;
    const long long col = i % n_cols;
    const long long group = (i / n_cols) % n_groups;
    const long long array = i / (n_cols * n_groups);
    double s = 0.0;
    for (long long k = group_slices[group]; k < group_slices[group + 1]; ++k)
        s += part[(k * n_arrays + array) * n_cols + col];
    out[i] = s;
}

// ---------------------------------------------------------------- Pearson residual sums
// Per (group, gene) sums of the clipped analytic Pearson residuals r and of r^2 over the group's
// cells, without the residual matrix (highly_variable_genes' pearson_residuals flavor). A cell
// with total t and a gene with group total s give mu = s * t / total; the residual of a count v is
// (v - mu) / sqrt(mu + mu^2 / theta), clipped to [-clip, clip]. pearson_dense sums every value
// of a dense matrix, or with x null the residual of a zero for every (cell, gene) (dense,
// compute-bound, no matrix read); pearson_csr then adds f(v) - f(0) for each stored value. Genes
// with s == 0 in a group are left at 0 (scanpy drops them from that group). Same slices and
// layout as the moments ([slice][sum, sum of squares][gene]), reduced by sum_slices.

// NaN (a cell without counts: mu = 0/0) passes the clip unchanged, as in scanpy.
__device__ __forceinline__ double pearson_residual(double v, double t, double s, double total,
                                                   double theta, double clip) {
    const double mu = s * t / total;
    const double r = (v - mu) / sqrt(mu + mu * mu / theta);
    return r < -clip ? -clip : (r > clip ? clip : r);
}

// One thread per (gene, slice), as moments_dense; writes the slice's two sums of that gene.
// cell_sums is indexed by the matrix row; gene_sums is (n_groups, n_cols).
template <typename T>
__global__ void pearson_dense(const T* x, long long n_cols, const long long* rows,
                              const long long* slice_start, const int* slice_group,
                              long long n_slices, const double* cell_sums,
                              const double* gene_sums, const double* group_totals, double theta,
                              double clip, double* part) {
    const long long n_col_tiles = (n_cols + blockDim.x - 1) / blockDim.x;
    const long long slice = (long long)blockIdx.x / n_col_tiles;
    const long long col = ((long long)blockIdx.x % n_col_tiles) * blockDim.x + threadIdx.x;
    if (slice >= n_slices || col >= n_cols) return;
    const int g = slice_group[slice];
    const double s = gene_sums[(long long)g * n_cols + col];
    const double total = group_totals[g];
    double acc = 0.0, acc2 = 0.0;
    if (s != 0.0) {
        for (long long k = slice_start[slice]; k < slice_start[slice + 1]; ++k) {
            const long long row = rows != nullptr ? rows[k] : k;
            const double v = x != nullptr ? (double)x[row * n_cols + col] : 0.0;
            const double r = pearson_residual(v, cell_sums[row], s, total, theta, clip);
            acc += r;
            acc2 += r * r;
        }
    }
    double* out = part + slice * 2 * n_cols + col;
    out[0] = acc;
    out[n_cols] = acc2;
}

// One warp per slice, as moments_csr, after pearson_dense (x null) filled the same parts: the
// lanes add f(v) - f(0) and f(v)^2 - f(0)^2 of each stored value of the slice's rows.
template <typename T, typename I>
__global__ void pearson_csr(const T* data, const I* indices, const I* indptr, long long n_cols,
                            const long long* rows, const long long* slice_start,
                            const int* slice_group, long long n_slices, const double* cell_sums,
                            const double* gene_sums, const double* group_totals, double theta,
                            double clip, double* part) {
    const long long slice = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (slice >= n_slices) return;
    const int lane = threadIdx.x & 31;
    double* sums = part + slice * 2 * n_cols;
    double* squares = sums + n_cols;
    const int g = slice_group[slice];
    const double* group_gene_sums = gene_sums + (long long)g * n_cols;
    const double total = group_totals[g];
    for (long long k = slice_start[slice]; k < slice_start[slice + 1]; ++k) {
        const long long r = rows != nullptr ? rows[k] : k;
        const double t = cell_sums[r];
        const long long e = (long long)indptr[r + 1];
        for (long long j = (long long)indptr[r] + lane; j < e; j += 32) {
            const long long c = (long long)indices[j];
            const double s = group_gene_sums[c];
            if (s == 0.0) continue;
            const double f = pearson_residual((double)data[j], t, s, total, theta, clip);
            const double f0 = pearson_residual(0.0, t, s, total, theta, clip);
            sums[c] += f - f0;
            squares[c] += f * f - f0 * f0;
        }
        __syncwarp();
    }
}
