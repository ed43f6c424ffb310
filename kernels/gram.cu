// Dense float64 row blocks of a CSR matrix, for pca's Gram matrix and projections.
//
// The device Gram XᵀX is a cuBLAS DGEMM over these blocks: at the ~10% density of
// log-normalised HVG data the FP64 tensor cores of a dense product should beat a sparse
// formulation (an estimate, not yet measured), and a block costs one write and one read
// of memory. The block
// is zeroed by the caller; duplicate entries are summed by the caller first (canonical
// CSR), so every output element is written by at most one thread: deterministic.

// Rows row0 .. row0 + n_rows - 1 into out (n_rows × n_out, row-major), gene c going to
// column col_map[c] (or nowhere when col_map[c] < 0: a gene mask costs no matrix copy).
// One warp per row; lanes stride the row's stored values.
template <typename T, typename I>
__global__ void csr_rows_to_dense(const T* data, const I* indices, const I* indptr,
                                  long long row0, long long n_rows, const int* col_map,
                                  long long n_out, double* out) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= n_rows) return;
    const long long row = row0 + warp;
    double* dst = out + warp * n_out;
    const long long end = (long long)indptr[row + 1];
    for (long long j = (long long)indptr[row] + lane; j < end; j += 32) {
        const int c = col_map[indices[j]];
        if (c >= 0) dst[c] = (double)data[j];
    }
}
