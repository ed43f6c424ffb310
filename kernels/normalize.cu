// normalize_total and log1p: per-cell sums, the highly-expressed gene mask, row scaling.
#include "_common.cuh"

// One warp per row; lanes stride the row's values. Sums in double, reduced in a fixed
// order (deterministic). Genes with excluded[col] != 0 are left out of the sum.
template <typename T, class Rows>
__device__ __forceinline__ void row_sum(const Rows& rows, long long n_rows,
                                        const unsigned char* excluded, double* sums,
                                        int* flags) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= n_rows) return;
    const int lane = threadIdx.x & 31;
    const long long b = rows.begin(row), e = rows.end(row);
    double s = 0.0;
    int bad = 0;
    for (long long j = b + lane; j < e; j += 32) {
        const T v = rows.data[j];
        bad |= isfinite((double)v) ? 0 : GPUSC_FLAG_NONFINITE;
        if (excluded == nullptr || !excluded[rows.column(j, b)]) s += (double)v;
    }
    if (bad) atomicOr(flags, bad);
    s = warp_sum(s);
    if (lane == 0) sums[row] = s;
}

// One warp per row; lanes stride the row's values. A gene is highly expressed when it
// holds more than max_fraction of some cell's total; every writer stores 1, so the race is benign.
template <typename T, class Rows>
__device__ __forceinline__ void flag_high(const Rows& rows, long long n_rows, const double* sums,
                                          double max_fraction, unsigned char* excluded) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= n_rows) return;
    const long long b = rows.begin(row), e = rows.end(row);
    const double limit = max_fraction * sums[row];
    for (long long j = b + (threadIdx.x & 31); j < e; j += 32)
        if ((double)rows.data[j] > limit) excluded[rows.column(j, b)] = 1;
}

// One warp per row; lanes stride the row's values: x[row, :] /= divisor[row].
template <typename T, class Rows>
__device__ __forceinline__ void scale_row(const Rows& rows, long long n_rows,
                                          const double* divisor) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= n_rows) return;
    const double inverse = 1.0 / divisor[row];  // as the numba twin: one division per row
    for (long long j = rows.begin(row) + (threadIdx.x & 31); j < rows.end(row); j += 32)
        rows.data[j] = (T)((double)rows.data[j] * inverse);
}

template <typename T, typename I>
__global__ void row_sums_csr(const T* data, const I* indices, const I* indptr, long long n_rows,
                             const unsigned char* excluded, double* sums, int* flags) {
    row_sum<T>(CsrRows<T, I>{const_cast<T*>(data), indices, indptr}, n_rows, excluded, sums, flags);
}

template <typename T>
__global__ void row_sums_dense(const T* x, long long n_rows, long long n_cols,
                               const unsigned char* excluded, double* sums, int* flags) {
    row_sum<T>(DenseRows<T>{const_cast<T*>(x), n_cols}, n_rows, excluded, sums, flags);
}

template <typename T, typename I>
__global__ void flag_high_genes_csr(const T* data, const I* indices, const I* indptr,
                                    long long n_rows, const double* sums, double max_fraction,
                                    unsigned char* excluded) {
    flag_high<T>(CsrRows<T, I>{const_cast<T*>(data), indices, indptr}, n_rows, sums,
                 max_fraction, excluded);
}

template <typename T>
__global__ void flag_high_genes_dense(const T* x, long long n_rows, long long n_cols,
                                      const double* sums, double max_fraction,
                                      unsigned char* excluded) {
    flag_high<T>(DenseRows<T>{const_cast<T*>(x), n_cols}, n_rows, sums, max_fraction, excluded);
}

template <typename T, typename I>
__global__ void scale_rows_csr(T* data, const I* indptr, long long n_rows, const double* divisor) {
    scale_row<T>(CsrRows<T, I>{data, nullptr, indptr}, n_rows, divisor);
}

template <typename T>
__global__ void scale_rows_dense(T* x, long long n_rows, long long n_cols, const double* divisor) {
    scale_row<T>(DenseRows<T>{x, n_cols}, n_rows, divisor);
}

// Grid-stride over all values: x = log1p(x) * scale (scale = 1 / ln(base), or 1).
template <typename T>
__global__ void log1p_values(T* x, long long n, double scale) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] = scale == 1.0 ? (T)log1p((double)x[i]) : (T)(log1p((double)x[i]) * scale);
}
