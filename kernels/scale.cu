// scale, regress_out and Pearson residuals: scaling with clipping, and dense outputs written in
// one pass from sparse input. Their per-gene moments come from kernels/moments.cu.
#include "_common.cuh"

__device__ __forceinline__ double clamp(double v, double lo, double hi) {
    return v > hi ? hi : (v < lo ? lo : v);  // NaN stays NaN, as np.clip
}

// --- scaling --------------------------------------------------------------------------

// One warp per line; lanes stride the stored values: v = min(v / std[gene], hi), where gene
// is the column (CSR, by_line = 0) or the line itself (CSC, by_line = 1). CSR rows with
// row_mask == 0 are left alone.
template <typename T, typename I>
__global__ void scale_sparse_values(T* data, const I* indices, const I* indptr, long long n_lines,
                                    int by_line, const unsigned char* row_mask, const double* std,
                                    double hi) {
    const long long line = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (line >= n_lines) return;
    if (row_mask != nullptr && !row_mask[line]) return;
    for (long long j = (long long)indptr[line] + (threadIdx.x & 31); j < (long long)indptr[line + 1];
         j += 32) {
        const double s = std[by_line ? line : (long long)indices[j]];
        const double v = (double)data[j] / s;
        data[j] = (T)(v > hi ? hi : v);
    }
}

// Grid-stride over a C-ordered matrix, in place: x = clamp((x - mean[col]) / std[col], lo, hi);
// mean == nullptr: no centering.
template <typename T>
__global__ void scale_dense(T* x, long long n_rows, long long n_cols, const double* mean,
                            const double* std, double lo, double hi) {
    const long long n = n_rows * n_cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long col = i % n_cols;
        const double centered = mean == nullptr ? (double)x[i] : (double)x[i] - mean[col];
        x[i] = (T)clamp(centered / std[col], lo, hi);
    }
}

// One warp per row of a CSR matrix, writing its dense row of `out`: first every column's
// value for a zero, then (after __syncwarp) the stored columns, which are distinct (the
// caller sums duplicates first). f(value, row, col) gives the output value.
template <typename T, typename I, typename O, class F>
__device__ __forceinline__ void csr_row_to_dense(const T* data, const I* indices, const I* indptr,
                                                 long long n_rows, long long n_cols, const F& f,
                                                 O* out) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= n_rows) return;
    const int lane = threadIdx.x & 31;
    O* dst = out + row * n_cols;
    for (long long c = lane; c < n_cols; c += 32) dst[c] = (O)f(0.0, row, c);
    __syncwarp();
    for (long long j = (long long)indptr[row] + lane; j < (long long)indptr[row + 1]; j += 32) {
        const long long c = (long long)indices[j];
        dst[c] = (O)f((double)data[j], row, c);
    }
}

struct ScaleOp {
    const double* mean;
    const double* std;
    double lo, hi;
    __device__ double operator()(double v, long long, long long c) const {
        return clamp((v - mean[c]) / std[c], lo, hi);
    }
};

// Zero-centred scaling of CSR input into a dense C-ordered output (no densified copy).
template <typename T, typename I, typename O>
__global__ void scale_csr_to_dense(const T* data, const I* indices, const I* indptr,
                                   long long n_rows, long long n_cols, const double* mean,
                                   const double* std, double lo, double hi, O* out) {
    csr_row_to_dense<T, I, O>(data, indices, indptr, n_rows, n_cols, ScaleOp{mean, std, lo, hi}, out);
}

// --- analytic Pearson residuals ---------------------------------------------------------

struct PearsonOp {
    const double* cell_sums;
    const double* gene_sums;
    double total, theta, clip;
    __device__ double operator()(double v, long long r, long long c) const {
        const double mu = cell_sums[r] * gene_sums[c] / total;
        return clamp((v - mu) / sqrt(mu + mu * mu / theta), -clip, clip);
    }
};

// CSR counts -> dense C-ordered residuals; one warp per row (see csr_row_to_dense).
template <typename T, typename I, typename O>
__global__ void pearson_csr(const T* data, const I* indices, const I* indptr, long long n_rows,
                            long long n_cols, const double* cell_sums, const double* gene_sums,
                            double total, double theta, double clip, O* out) {
    csr_row_to_dense<T, I, O>(data, indices, indptr, n_rows, n_cols,
                              PearsonOp{cell_sums, gene_sums, total, theta, clip}, out);
}

// Dense C-ordered counts -> residuals; grid-stride over all values.
template <typename T, typename O>
__global__ void pearson_dense(const T* x, long long n_rows, long long n_cols,
                              const double* cell_sums, const double* gene_sums, double total,
                              double theta, double clip, O* out) {
    const PearsonOp f{cell_sums, gene_sums, total, theta, clip};
    const long long n = n_rows * n_cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = (O)f((double)x[i], i / n_cols, i % n_cols);
}
