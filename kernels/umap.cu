// UMAP layout optimisation: umap-learn's edge-sampling SGD, one epoch per launch pair.
//
// Determinism: every epoch reads the embedding as it was at the start of the epoch and
// adds each move to a 64-bit fixed-point accumulator (2^-32 units) with integer atomics.
// Integer addition is associative, so the sum does not depend on the order in which
// threads arrive: the same input and seed give the identical embedding run to run.
// umap_apply then adds the accumulated moves to the float32 embedding and clears them.
#include "_common.cuh"

#define UMAP_FIXED_SCALE 4294967296.0  // 2^32: one accumulator unit is 2^-32
#define UMAP_CLIP 4.0

// splitmix64's finaliser: a bijective 64-bit mix.
__device__ __forceinline__ unsigned long long umap_mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The hash of (seed, epoch, edge) that an edge's negative samples of the epoch share.
__device__ __forceinline__ unsigned long long umap_edge_hash(unsigned long long seed, long long epoch,
                                                             long long edge) {
    return umap_mix64(umap_mix64(umap_mix64(seed) ^ (unsigned long long)epoch) ^ (unsigned long long)edge);
}

// The negative sample is a hash of (edge hash, sample): counter-based, no state. The top 32
// bits scaled to n (a multiply, not a division) while n < 2^32, else the hash modulo n.
__device__ __forceinline__ long long umap_negative_vertex(unsigned long long edge_hash, long long sample,
                                                          long long n_vertices) {
    const unsigned long long h = umap_mix64(edge_hash ^ (unsigned long long)sample);
    if (n_vertices < 4294967296ll) return (long long)(((h >> 32) * (unsigned long long)n_vertices) >> 32);
    return (long long)(h % (unsigned long long)n_vertices);
}

__device__ __forceinline__ float umap_clip(float v) {
    return v > (float)UMAP_CLIP ? (float)UMAP_CLIP : (v < -(float)UMAP_CLIP ? -(float)UMAP_CLIP : v);
}

__device__ __forceinline__ void umap_accumulate(long long* acc, long long at, double move) {
    const long long q = (long long)floor(move * UMAP_FIXED_SCALE + 0.5);
    atomicAdd(reinterpret_cast<unsigned long long*>(acc + at), (unsigned long long)q);
}

__device__ __forceinline__ float umap_rdist(const float* x, const float* y, int dim) {
    float d2 = 0.0f;
    for (int d = 0; d < dim; ++d) {
        const float diff = x[d] - y[d];
        d2 += diff * diff;
    }
    return d2;
}

// one thread per directed edge (head -> tail); an edge whose next sample is due this epoch
// pulls head and tail together and pushes head away from its negative samples. Distances and
// coefficients are float32 (powf: the numba twin's choice, for its speed on the CPU).
template <typename I>
__global__ void umap_epoch(const float* __restrict__ embedding, long long* __restrict__ acc,
                           const I* __restrict__ head, const I* __restrict__ tail,
                           long long n_edges, int dim, long long n_vertices,
                           const double* __restrict__ epochs_per_sample,
                           const double* __restrict__ epochs_per_negative_sample,
                           double* __restrict__ next_sample, double* __restrict__ next_negative,
                           double a, double b, double gamma, double alpha, long long epoch,
                           unsigned long long seed) {
    const long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (e >= n_edges) return;
    const double n = (double)epoch;
    if (next_sample[e] > n) return;
    const float a32 = (float)a, b32 = (float)b;
    const float attract = (float)(-2.0 * a * b), repulse = (float)(2.0 * gamma * b);
    const long long j = (long long)head[e];
    const long long k = (long long)tail[e];
    const float* current = embedding + j * dim;
    const float* other = embedding + k * dim;

    float d2 = umap_rdist(current, other, dim);
    float coeff = 0.0f;
    if (d2 > 0.0f) {
        const float power = powf(d2, b32 - 1.0f);  // d2^(b-1); d2^b is one product more, not a second powf
        coeff = attract * power / (a32 * (power * d2) + 1.0f);
    }
    for (int d = 0; d < dim; ++d) {
        const double g = (double)umap_clip(coeff * (current[d] - other[d])) * alpha;
        umap_accumulate(acc, j * dim + d, g);
        umap_accumulate(acc, k * dim + d, -g);
    }
    next_sample[e] += epochs_per_sample[e];

    const long long n_neg = (long long)((n - next_negative[e]) / epochs_per_negative_sample[e]);
    const unsigned long long edge_hash = umap_edge_hash(seed, epoch, e);
    for (long long p = 0; p < n_neg; ++p) {
        const long long kk = umap_negative_vertex(edge_hash, p, n_vertices);
        if (kk == j) continue;
        other = embedding + kk * dim;
        d2 = umap_rdist(current, other, dim);
        if (d2 <= 0.0f) continue;  // a coincident point: umap-learn's move is 0 too
        coeff = repulse / ((0.001f + d2) * (a32 * powf(d2, b32) + 1.0f));
        for (int d = 0; d < dim; ++d) {
            const double g = (double)umap_clip(coeff * (current[d] - other[d])) * alpha;
            umap_accumulate(acc, j * dim + d, g);
        }
    }
    next_negative[e] += (double)n_neg * epochs_per_negative_sample[e];
}

// one thread per embedding coordinate: add the epoch's accumulated move, clear the accumulator
__global__ void umap_apply(float* __restrict__ embedding, long long* __restrict__ acc,
                           long long size) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= size) return;
    const long long q = acc[i];
    if (q != 0) embedding[i] = (float)((double)embedding[i] + (double)q * (1.0 / UMAP_FIXED_SCALE));
    acc[i] = 0;
}

// ---------------------------------------------------------------- weak components
// The connectivity test before the spectral start, as a lock-free union-find: a root is
// its own parent, a link points a root at a smaller vertex (compare-and-swap), so parents
// only decrease and no cycle can form. After umap_link every edge's ends share a root, and
// the roots left are one per weakly connected component whatever order the threads ran in.

__device__ __forceinline__ int umap_swap_root(int* parent, int root, int below) {
    return atomicCAS(parent + root, root, below);
}

__device__ __forceinline__ long long umap_swap_root(long long* parent, long long root, long long below) {
    return (long long)atomicCAS(reinterpret_cast<unsigned long long*>(parent + root),
                                (unsigned long long)root, (unsigned long long)below);
}

// The root of v, halving the path on the way up: a parent may be replaced by any of its
// ancestors, so these writes may race with each other and with links.
template <typename I>
__device__ __forceinline__ I umap_root(I* parent, I v) {
    volatile I* up = parent;
    while (true) {
        const I p = up[v];
        if (p == v) return v;
        const I grand = up[p];
        if (grand != p) up[v] = grand;
        v = grand;
    }
}

// one thread per vertex: joins the trees of the vertex and of each of its neighbours
template <typename I>
__global__ void umap_link(const I* __restrict__ indptr, const I* __restrict__ indices,
                          long long n_vertices, I* parent) {
    const long long row = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (row >= n_vertices) return;
    for (I e = indptr[row]; e < indptr[row + 1]; ++e) {
        I a = umap_root(parent, (I)row);
        I b = umap_root(parent, indices[e]);
        while (a != b) {
            if (a < b) { const I t = a; a = b; b = t; }  // a: the larger root, linked under b
            const I seen = umap_swap_root(parent, a, b);
            if (seen == a) break;
            a = umap_root(parent, seen);  // a got a parent meanwhile: climb on from there
            b = umap_root(parent, b);
        }
    }
}
