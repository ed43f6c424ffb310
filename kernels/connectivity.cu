// UMAP memberships: umap-learn's smooth_knn_dist (in float32, as umap-learn computes it)
// and the membership strength of each kNN edge.
#include "_common.cuh"

#define SMOOTH_K_TOLERANCE 1e-5
#define MIN_K_DIST_SCALE 1e-3
#define FLOAT32_MAX 3.4028234663852886e+38f

// One thread per point: rho from its positive distances (sorted ascending), a binary
// search for sigma, then its k memberships (0 for the point itself).
__global__ void umap_memberships(const long long* __restrict__ knn_idx,
                                 const float* __restrict__ knn_dist, long long n, int k,
                                 double target, float mean_all, float local_connectivity,
                                 int n_iter, float* __restrict__ sigmas,
                                 float* __restrict__ rhos, float* __restrict__ vals) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* row = knn_dist + i * k;
    // rho: the local_connectivity-th positive distance, interpolated towards the next
    const int index = (int)floorf(local_connectivity);
    const double interpolation = (double)local_connectivity - index;
    int n_pos = 0;
    float pos_before = 0.f, pos_at = 0.f, pos_first = 0.f, pos_max = 0.f;
    float row_sum = 0.f;  // umap-learn's np.mean: a float32 running sum
    for (int j = 0; j < k; ++j) {
        const float d = row[j];
        row_sum += d;
        if (d > 0.f) {
            if (n_pos == 0) pos_first = d;
            if (n_pos == index - 1) pos_before = d;
            if (n_pos == index) pos_at = d;
            pos_max = fmaxf(pos_max, d);
            ++n_pos;
        }
    }
    float rho = 0.f;
    if (n_pos >= local_connectivity) {
        if (index > 0) {
            rho = pos_before;
            if (interpolation > SMOOTH_K_TOLERANCE) rho = (float)(rho + interpolation * (pos_at - pos_before));
        } else {
            rho = (float)(interpolation * pos_first);
        }
    } else if (n_pos > 0) {
        rho = pos_max;
    }
    float lo = 0.f, hi = FLOAT32_MAX, mid = 1.f;
    for (int it = 0; it < n_iter; ++it) {
        float psum = 0.f;
        for (int j = 1; j < k; ++j) {
            const float d = row[j] - rho;
            psum += d > 0.f ? expf(-(d / mid)) : 1.f;
        }
        if (fabs((double)psum - target) < SMOOTH_K_TOLERANCE) break;
        if ((double)psum > target) {
            hi = mid;
            mid = (float)(((double)lo + (double)hi) / 2.0);
        } else {
            lo = mid;
            mid = hi >= FLOAT32_MAX ? mid * 2.f : (float)(((double)lo + (double)hi) / 2.0);
        }
    }
    float sigma = mid;
    const double mean_row = (double)(row_sum / (float)k);
    const double floor_ = MIN_K_DIST_SCALE * (rho > 0.f ? mean_row : (double)mean_all);
    if ((double)sigma < floor_) sigma = (float)floor_;
    sigmas[i] = sigma;
    rhos[i] = rho;
    for (int j = 0; j < k; ++j) {
        float v;
        if (knn_idx[i * k + j] == i) v = 0.f;
        else if (row[j] - rho <= 0.f || sigma == 0.f) v = 1.f;
        else v = expf(-((row[j] - rho) / sigma));
        vals[i * k + j] = v;
    }
}
