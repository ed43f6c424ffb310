// Per-group medians of a sparse matrix's columns, with its implicit zeros (get.aggregate's
// "median"), as sklearn's csc_median_axis_0 computes them on each group's rows (scanpy's path).
// The caller hands over each (gene, group) segment's stored values sorted ascending, the segments
// laid out gene by gene (segment s = gene * n_groups + group covers
// sorted[seg_start[s]:seg_start[s+1]]), and each group's cell count; the zeros a group's cells do
// not store are counted, never materialised. Only the order this kernel reads matters: the
// negative values first, and at the median's ranks the values a sort puts there (the numba
// twin's caller selects just that; the device sorts fully).
#include "_common.cuh"

// One thread per (gene, group) segment, thread = gene * n_groups + group: the median of the
// segment's n_cells[group] values (its stored values plus n_cells - stored zeros), written to
// out[group * n_cols + gene]. Rank r of the values in order: a stored negative value while
// r < n_negative, then the implicit zeros, then the stored values from there on. An even count
// gives (a + b) / 2 in T (what sklearn computes on T scalars), an empty group NaN.
template <typename T>
__global__ void median_sorted(const T* sorted, const long long* seg_start,
                              const long long* n_cells, int n_groups, long long n_cols,
                              double* out) {
    const long long s = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= n_cols * n_groups) return;
    const long long gene = s / n_groups;
    const int group = (int)(s % n_groups);
    const long long lo = seg_start[s], n_stored = seg_start[s + 1] - lo;
    const long long n = n_cells[group];
    double* result = out + (long long)group * n_cols + gene;
    if (n == 0) {
        *result = nan("");
        return;
    }
    // n_negative: the first stored value >= 0 (binary search over the sorted segment)
    long long a = 0, b = n_stored;
    while (a < b) {
        const long long mid = a + (b - a) / 2;
        if (sorted[lo + mid] < T(0)) a = mid + 1; else b = mid;
    }
    const long long n_negative = a, n_zeros = n - n_stored;
    const long long middle = n / 2;
    auto at_rank = [&](long long r) -> T {
        if (r < n_negative) return sorted[lo + r];
        if (r - n_negative < n_zeros) return T(0);
        return sorted[lo + r - n_zeros];
    };
    if (n % 2 == 1) {
        *result = (double)at_rank(middle);
    } else {
        const T sum = at_rank(middle - 1) + at_rank(middle);
        *result = (double)(sum / T(2));
    }
}
