// highly_variable_genes: the loop of its flavors that kernels/moments.cu (every per-gene and
// per-batch sum) does not cover.

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
