// t-SNE on the device (tl.tsne without cuML): the affinities' binary search, and the three
// per-point pieces of each gradient step (attraction over P's rows, the repulsion's charges
// spread onto a grid, the grid's potentials read back). The grid's convolution is cuFFT's
// (cupyx), the optimiser's update CuPy's element-wise arithmetic. 2-D embeddings, float64.
// gpusc/_kernels/tsne.py holds the numba twins and the method.

#define TSNE_FIXED_SCALE 16777216.0  // 2^24: the twin's FIXED_SCALE
#define TSNE_INFINITY __longlong_as_double(0x7ff0000000000000LL)  // NVRTC has no <cmath>

// sklearn's _binary_search_perplexity, one thread per row: the Gaussian's precision beta such
// that the row's conditional distribution over its n_neighbors has entropy log(perplexity)
// (within 1e-5, at most 100 halvings). Its constants are C floats there, so they are here.
__global__ void tsne_perplexity(const float* __restrict__ sqdist, long long n_rows,
                                int n_neighbors, float perplexity, double* __restrict__ p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows) return;
    const float* d = sqdist + i * n_neighbors;
    double* row = p + i * n_neighbors;
    const double desired_entropy = log((double)perplexity);
    const double tolerance = (double)1e-5f, tiny = (double)1e-8f;
    double beta = 1.0, beta_min = -TSNE_INFINITY, beta_max = TSNE_INFINITY;
    for (int step = 0; step < 100; ++step) {
        double sum_p = 0.0;
        for (int j = 0; j < n_neighbors; ++j) {
            row[j] = exp(-(double)d[j] * beta);
            sum_p += row[j];
        }
        if (sum_p == 0.0) sum_p = tiny;
        double sum_dp = 0.0;
        for (int j = 0; j < n_neighbors; ++j) {
            row[j] /= sum_p;
            sum_dp += (double)d[j] * row[j];
        }
        const double diff = log(sum_p) + beta * sum_dp - desired_entropy;
        if (fabs(diff) <= tolerance) break;
        if (diff > 0.0) {
            beta_min = beta;
            beta = beta_max == TSNE_INFINITY ? beta * 2.0 : (beta + beta_max) / 2.0;
        } else {
            beta_max = beta;
            beta = beta_min == -TSNE_INFINITY ? beta / 2.0 : (beta + beta_min) / 2.0;
        }
    }
}

// out[i] = sum over row i of P (CSR, symmetric) of p_ij w_ij (y_i - y_j), w = 1 / (1 + d^2);
// one thread per row, the row's entries in order.
__global__ void tsne_attract(const long long* __restrict__ indptr, const long long* __restrict__ indices,
                             const double* __restrict__ p, const double* __restrict__ y, long long n,
                             double* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const double yx = y[2 * i], yy = y[2 * i + 1];
    double fx = 0.0, fy = 0.0;
    for (long long e = indptr[i]; e < indptr[i + 1]; ++e) {
        const long long j = indices[e];
        const double dx = yx - y[2 * j], dy = yy - y[2 * j + 1];
        const double pw = p[e] / (1.0 + dx * dx + dy * dy);
        fx += pw * dx;
        fy += pw * dy;
    }
    out[2 * i] = fx;
    out[2 * i + 1] = fy;
}

// The nearest node m of coordinate u (in node units) and the quadratic Lagrange weights of
// nodes m - 1, m, m + 1.
__device__ __forceinline__ long long tsne_weights(double u, double* w) {
    const long long m = (long long)floor(u + 0.5);
    const double t = u - (double)m;
    w[0] = 0.5 * t * (t - 1.0);
    w[1] = (1.0 - t) * (1.0 + t);
    w[2] = 0.5 * t * (t + 1.0);
    return m;
}

// Point i's 3 x 3 stencil: the nodes (flat index in a nodes x nodes plane) and weights, in
// the order (x node, then y node) both kernels and the twins use.
__device__ __forceinline__ void tsne_stencil(const double* y, long long i, double x0, double y0,
                                             double spacing, long long nodes, long long* node,
                                             double* w) {
    double wx[3], wy[3];
    const long long mx = tsne_weights((y[2 * i] - x0) / spacing, wx);
    const long long my = tsne_weights((y[2 * i + 1] - y0) / spacing, wy);
    for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) {
            w[3 * a + b] = wx[a] * wy[b];
            node[3 * a + b] = (mx - 1 + a) * nodes + (my - 1 + b);
        }
}

// The thread's point i (false past the last one) and its stencil.
__device__ __forceinline__ bool tsne_thread_point(const double* y, long long n, double x0,
                                                  double y0, double spacing, long long nodes,
                                                  long long& i, long long* node, double* w) {
    i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return false;
    tsne_stencil(y, i, x0, y0, spacing, nodes, node, w);
    return true;
}

// charges (3, nodes, nodes) += each point's (1, y_x, y_y) times its 3 x 3 weights, in fixed
// point: integer additions, so the sums do not depend on the threads' order. One thread per
// point.
__global__ void tsne_spread(const double* __restrict__ y, long long n, double x0, double y0,
                            double spacing, long long nodes, unsigned long long* charges) {
    long long i, node[9];
    double w[9];
    if (!tsne_thread_point(y, n, x0, y0, spacing, nodes, i, node, w)) return;
    const long long plane = nodes * nodes;
    for (int s = 0; s < 9; ++s) {
        // two's complement: a negative fixed-point value adds as its unsigned image
        atomicAdd(charges + node[s], (unsigned long long)llrint(w[s] * TSNE_FIXED_SCALE));
        atomicAdd(charges + plane + node[s],
                  (unsigned long long)llrint(w[s] * y[2 * i] * TSNE_FIXED_SCALE));
        atomicAdd(charges + 2 * plane + node[s],
                  (unsigned long long)llrint(w[s] * y[2 * i + 1] * TSNE_FIXED_SCALE));
    }
}

// Each point's repulsion y phi1 - phiy and phiZ, read from the node potentials (4, nodes,
// nodes: phi1, phiy_x, phiy_y, phiZ) with the weights it spread with. One thread per point.
__global__ void tsne_gather(const double* __restrict__ y, long long n, double x0, double y0,
                            double spacing, long long nodes, const float* __restrict__ potentials,
                            double* __restrict__ repulsion, double* __restrict__ phi_z) {
    long long i, node[9];
    double w[9];
    if (!tsne_thread_point(y, n, x0, y0, spacing, nodes, i, node, w)) return;
    double phi[4] = {0.0, 0.0, 0.0, 0.0};
    const long long plane = nodes * nodes;
    for (int s = 0; s < 9; ++s)
        for (int c = 0; c < 4; ++c) phi[c] += w[s] * (double)potentials[c * plane + node[s]];
    repulsion[2 * i] = y[2 * i] * phi[0] - phi[1];
    repulsion[2 * i + 1] = y[2 * i + 1] * phi[0] - phi[2];
    phi_z[i] = phi[3];
}
