// Gram matrix XᵀX of a CSR matrix (upper triangle) and its column sums, for PCA.
#include "_common.cuh"

#define GRAM_TILE 64        // output tile: GRAM_TILE × GRAM_TILE entries of XᵀX per block
#define GRAM_ROWS 32        // rows of X staged densely in shared memory per step
#define GRAM_THREADS 256    // 16 × 16 threads, each owns 4 × 4 outputs of the tile
#define GRAM_WARPS (GRAM_THREADS / 32)

// Grid: blockIdx.x = one upper-triangle output tile (tile_a[k] <= tile_b[k], in tiles),
// blockIdx.y = one slice of the rows; a block stages GRAM_ROWS rows at a time as two dense
// GRAM_ROWS × GRAM_TILE panels (the tile's column ranges; one warp per row, lanes stride its
// non-zeros) and each thread multiplies them into 16 double accumulators. Every output is
// written by exactly one thread of one block per slice, rows in order: deterministic, no
// atomics into global memory. The caller sums the slices' partial Grams in a fixed order.
// Diagonal tiles (tile_a == tile_b) also write the slice's column sums.
// Values in one row and column add up in shared memory (duplicate entries allowed; the
// caller canonicalises so that the order of those additions cannot matter).
// Two blocks per SM: lets ptxas use up to 128 registers (16 double accumulators + panel
// reads); with the default bound it capped the int32-index variants at 64 and spilled.
template <typename T, typename I>
__global__ void __launch_bounds__(GRAM_THREADS, 2)
gram_csr(const T* data, const I* indices, const I* indptr, long long n_rows, long long n_cols,
         const int* tile_a, const int* tile_b, int n_slices,
         double* partial_gram, double* partial_sums) {
    __shared__ double panel_a[GRAM_ROWS][GRAM_TILE];
    __shared__ double panel_b[GRAM_ROWS][GRAM_TILE];

    const long long a0 = (long long)tile_a[blockIdx.x] * GRAM_TILE;
    const long long b0 = (long long)tile_b[blockIdx.x] * GRAM_TILE;
    const bool diagonal = a0 == b0;
    const int slice = blockIdx.y;
    const long long row_begin = n_rows * slice / n_slices;
    const long long row_end = n_rows * (slice + 1) / n_slices;

    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    double acc[4][4];
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int n = 0; n < 4; ++n) acc[m][n] = 0.0;
    double col_sum = 0.0;  // threads below GRAM_TILE: column a0 + threadIdx.x (diagonal tiles)

    for (long long r0 = row_begin; r0 < row_end; r0 += GRAM_ROWS) {
        for (int i = threadIdx.x; i < GRAM_ROWS * GRAM_TILE; i += GRAM_THREADS) {
            (&panel_a[0][0])[i] = 0.0;
            (&panel_b[0][0])[i] = 0.0;
        }
        __syncthreads();
        for (int r = warp; r < GRAM_ROWS; r += GRAM_WARPS) {
            const long long row = r0 + r;
            if (row >= row_end) break;
            const long long e = (long long)indptr[row + 1];
            for (long long j = (long long)indptr[row] + lane; j < e; j += 32) {
                const long long col = (long long)indices[j];
                if (col >= a0 && col < a0 + GRAM_TILE)
                    atomicAdd(&panel_a[r][col - a0], (double)data[j]);
                if (!diagonal && col >= b0 && col < b0 + GRAM_TILE)
                    atomicAdd(&panel_b[r][col - b0], (double)data[j]);
            }
        }
        __syncthreads();
        double (*panel_right)[GRAM_TILE] = diagonal ? panel_a : panel_b;
#pragma unroll 4
        for (int r = 0; r < GRAM_ROWS; ++r) {
            double left[4], right[4];
#pragma unroll
            for (int m = 0; m < 4; ++m) left[m] = panel_a[r][ty + 16 * m];
#pragma unroll
            for (int n = 0; n < 4; ++n) right[n] = panel_right[r][tx + 16 * n];
#pragma unroll
            for (int m = 0; m < 4; ++m)
#pragma unroll
                for (int n = 0; n < 4; ++n) acc[m][n] = fma(left[m], right[n], acc[m][n]);
        }
        if (diagonal && threadIdx.x < GRAM_TILE)
            for (int r = 0; r < GRAM_ROWS; ++r) col_sum += panel_a[r][threadIdx.x];
        __syncthreads();  // the panels are refilled next step
    }

    double* out = partial_gram + (long long)slice * n_cols * n_cols;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const long long a = a0 + ty + 16 * m;
        if (a >= n_cols) continue;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
            const long long b = b0 + tx + 16 * n;
            if (b < n_cols) out[a * n_cols + b] = acc[m][n];
        }
    }
    if (diagonal && threadIdx.x < GRAM_TILE && a0 + threadIdx.x < n_cols)
        partial_sums[(long long)slice * n_cols + a0 + threadIdx.x] = col_sum;
}
