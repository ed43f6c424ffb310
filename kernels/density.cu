// Gaussian kernel sums of tl.embedding_density: for every point j of a set of n points in 2-D
// (already whitened by the KDE's Cholesky factor, so the kernel is exp(-|u_i - u_j|^2 / 2)),
// sums[j] = sum over the points i with |u_i - u_j|^2 <= cutoff_sq of exp(-|u_i - u_j|^2 / 2).
// The cut-off leaves out terms below exp(-cutoff_sq / 2) each (the host twin's grid drops the
// same ones); the self term is 1, so n such terms change a sum by at most n * that, relative.
// No n x n matrix: the points stream through shared memory tile by tile.
#include "_common.cuh"

#define DENSITY_TILE 256  // points per shared-memory tile; the launcher's block size

// One thread per evaluation point j; the block loads the points in tiles of DENSITY_TILE into
// shared memory and every thread adds its kernel values over the tile, in index order (a fixed
// order: the same sums run to run). Coordinates and sums in double, as scipy's gaussian_kde.
__global__ void kde_sums(const double* __restrict__ x, const double* __restrict__ y, long long n,
                         double cutoff_sq, double* __restrict__ sums) {
    __shared__ double tile_x[DENSITY_TILE];
    __shared__ double tile_y[DENSITY_TILE];
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = j < n;
    const double xj = active ? x[j] : 0.0, yj = active ? y[j] : 0.0;
    double acc = 0.0;
    for (long long start = 0; start < n; start += DENSITY_TILE) {
        const long long i = start + threadIdx.x;
        __syncthreads();  // the previous tile is no longer read
        tile_x[threadIdx.x] = i < n ? x[i] : 0.0;
        tile_y[threadIdx.x] = i < n ? y[i] : 0.0;
        __syncthreads();
        const int in_tile = (int)min((long long)DENSITY_TILE, n - start);
        for (int t = 0; t < in_tile; ++t) {
            const double dx = tile_x[t] - xj, dy = tile_y[t] - yj;
            const double r2 = dx * dx + dy * dy;
            if (r2 <= cutoff_sq) acc += exp(-0.5 * r2);
        }
    }
    if (active) sums[j] = acc;
}
