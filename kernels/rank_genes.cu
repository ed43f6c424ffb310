// Wilcoxon rank sums by group for every gene at once (rank_genes_groups' "wilcoxon").
//
// A gene's cells are ranked once, for all groups: the caller hands each gene's non-zero values
// sorted ascending (with each value's group code), and the implicit zeros of the gene are one
// tie block whose size per group is known (group size minus the group's non-zero values), so
// a gene costs its non-zeros, not its cells. Negative values rank below that zero block.
// Ties get the average of their ranks, as scipy.stats.rankdata; the tie correction term is
// the sum over tie blocks of t^3 - t, as scipy.stats.tiecorrect.
//
// Two comparisons (`reference` < 0, or the code of the reference group):
//   one group against the rest  every cell is ranked together (codes 0..n_groups-1; the cells
//     of no selected group have their own code); rank_sum[g] is group g's rank sum and
//     tie_sum[0] the one tie term of the gene.
//   a group against `reference`  group g is ranked together with the reference's cells only.
//     One walk over the sorted values serves every pair: in a tie block holding b_g cells of
//     g and b_r of the reference, g's cells rank below[g] + below[ref] + (b_g + b_r + 1) / 2,
//     below[] counting each group's cells in lower blocks. tie_sum[g] = sum over blocks of
//     f(b_g + b_r) = sum f(b_r) + sum over blocks holding g of f(b_g + b_r) - f(b_r).
// Rank sums are half-integers and tie terms integers, exact in double below 2^53: the result
// does not depend on the order of the additions.
#include "_common.cuh"

__device__ __forceinline__ double tie_term(long long t) {
    const double d = (double)t;
    return d * d * d - d;
}

// One thread per gene (thread = gene): the thread walks the gene's sorted values
// values[segment[j]:segment[j + 1]] in tie blocks. Per-group state lives at [g * n_cols + j]
// (neighbouring threads, neighbouring addresses): rank_sum, tie_sum (with a reference; else
// tie_sum[j]), and the scratch `count` (non-zero values per group), `block` (the group's
// values in the current tie block) and `below` (the group's values in lower blocks).
template <typename T>
__global__ void rank_sums(const T* values, const int* codes, const long long* segment,
                          long long n_cols, const long long* group_size, int n_groups,
                          int reference, double* rank_sum, double* tie_sum, long long* count,
                          long long* block, long long* below) {
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_cols) return;
    const long long lo = segment[j], hi = segment[j + 1];
    long long n_cells = 0;
    for (int g = 0; g < n_groups; ++g) {
        const long long at = (long long)g * n_cols + j;
        rank_sum[at] = 0.0;
        count[at] = 0;
        block[at] = 0;
        below[at] = 0;
        if (reference >= 0) tie_sum[at] = 0.0;
        n_cells += group_size[g];
    }
    bool zeros_done = false;
    long long i = lo;
    if (reference < 0) {
        long long ranked = 0;  // cells in lower tie blocks
        double ties = 0.0, zero_rank = 0.0;
        while (true) {
            if (!zeros_done && (i == hi || values[i] > T(0))) {
                const long long t = n_cells - (hi - lo);
                zero_rank = (double)ranked + 0.5 * (double)(t + 1);
                ties += tie_term(t);
                ranked += t;
                zeros_done = true;
                continue;
            }
            if (i == hi) break;
            long long e = i + 1;
            while (e < hi && values[e] == values[i]) ++e;
            const double rank = (double)ranked + 0.5 * (double)(e - i + 1);
            for (long long p = i; p < e; ++p) {
                const long long at = (long long)codes[p] * n_cols + j;
                rank_sum[at] += rank;
                count[at] += 1;
            }
            ties += tie_term(e - i);
            ranked += e - i;
            i = e;
        }
        for (int g = 0; g < n_groups; ++g) {
            const long long at = (long long)g * n_cols + j;
            rank_sum[at] += (double)(group_size[g] - count[at]) * zero_rank;
        }
        tie_sum[j] = ties;
        return;
    }
    // against the reference: the zero block's share of each group needs the counts first
    for (long long p = lo; p < hi; ++p) count[(long long)codes[p] * n_cols + j] += 1;
    const long long at_ref = (long long)reference * n_cols + j;
    long long ref_below = 0;
    double ref_ties = 0.0;  // sum over blocks of f(b_r)
    while (true) {
        if (!zeros_done && (i == hi || values[i] > T(0))) {
            const long long b_r = group_size[reference] - count[at_ref];
            for (int g = 0; g < n_groups; ++g) {
                const long long at = (long long)g * n_cols + j;
                const long long b = group_size[g] - count[at];
                if (g == reference || b == 0) continue;
                rank_sum[at] += (double)b * ((double)(below[at] + ref_below) + 0.5 * (double)(b + b_r + 1));
                tie_sum[at] += tie_term(b + b_r) - tie_term(b_r);
                below[at] += b;
            }
            ref_ties += tie_term(b_r);
            ref_below += b_r;
            zeros_done = true;
            continue;
        }
        if (i == hi) break;
        long long e = i + 1;
        while (e < hi && values[e] == values[i]) ++e;
        long long b_r = 0;
        for (long long p = i; p < e; ++p) {
            if (codes[p] == reference) ++b_r;
            else block[(long long)codes[p] * n_cols + j] += 1;
        }
        for (long long p = i; p < e; ++p) {  // each group once: its first value in the block
            const long long at = (long long)codes[p] * n_cols + j;
            const long long b = codes[p] == reference ? 0 : block[at];
            if (b == 0) continue;
            rank_sum[at] += (double)b * ((double)(below[at] + ref_below) + 0.5 * (double)(b + b_r + 1));
            tie_sum[at] += tie_term(b + b_r) - tie_term(b_r);
            below[at] += b;
            block[at] = 0;
        }
        ref_ties += tie_term(b_r);
        ref_below += b_r;
        i = e;
    }
    for (int g = 0; g < n_groups; ++g)
        if (g != reference) tie_sum[(long long)g * n_cols + j] += ref_ties;
}
