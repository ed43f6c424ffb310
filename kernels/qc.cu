// Quality-control statistics in one pass over the matrix (scanpy's calculate_qc_metrics).
#include "_common.cuh"

#define QC_VARS_PER_PASS 4  // qc_vars summed in registers per launch; more run in further launches

// Order-preserving unsigned keys for non-negative values (negatives and NaN map to 0:
// they are flagged and rejected by the caller, so their rank does not matter).
template <typename T> struct Key;
template <> struct Key<float> {
    typedef unsigned int type;
    static const int bits = 32;
    __device__ static type of(float v) { return v > 0.f ? __float_as_uint(v) : 0u; }
    __device__ static float value(type k) { return __uint_as_float(k); }
};
template <> struct Key<double> {
    typedef unsigned long long type;
    static const int bits = 64;
    __device__ static type of(double v) {
        return v > 0.0 ? (unsigned long long)__double_as_longlong(v) : 0ull;
    }
    __device__ static double value(type k) { return __longlong_as_double((long long)k); }
};

// Per-block shared state of the top-k selection.
struct TopState {
    int hist[256];
    int count_above;
    int k_rest;  // how many values equal to the threshold still belong to the top k
    unsigned long long prefix;
};

// The k largest values of the row, in `top[0:k]`, sorted descending; `top` has `cap`
// slots (a power of two >= k) and is padded with zeros, the implicit entries of a sparse row.
template <typename T, class Rows>
__device__ __forceinline__ void row_top_values(const Rows& rows, long long b, long long e, int k, int cap,
                               T* top, TopState& st) {
    typedef typename Key<T>::type K;
    const long long len = e - b;
    if (len <= k) {
        for (int i = threadIdx.x; i < cap; i += blockDim.x) top[i] = i < len ? rows.data[b + i] : T(0);
    } else {
        // Radix select, 8 bits a pass from the top: find the key of the k-th largest value.
        if (threadIdx.x == 0) { st.prefix = 0; st.k_rest = k; }
        K mask = 0;
        for (int shift = Key<T>::bits - 8; shift >= 0; shift -= 8) {
            for (int i = threadIdx.x; i < 256; i += blockDim.x) st.hist[i] = 0;
            __syncthreads();
            const K prefix = (K)st.prefix;
            for (long long j = b + threadIdx.x; j < e; j += blockDim.x) {
                const K key = Key<T>::of(rows.data[j]);
                if ((key & mask) == prefix) atomicAdd(&st.hist[(key >> shift) & 255], 1);
            }
            __syncthreads();
            if (threadIdx.x < 32) {
                // lane l owns digits 255-8l .. 248-8l; an inclusive scan from the top digit down
                const int lane = threadIdx.x, top_digit = 255 - 8 * lane;
                int own = 0;
                for (int d = 0; d < 8; ++d) own += st.hist[top_digit - d];
                int incl = own;
                for (int off = 1; off < 32; off <<= 1) {
                    const int up = __shfl_up_sync(0xffffffffu, incl, off);
                    if (lane >= off) incl += up;
                }
                const int rest = st.k_rest, excl = incl - own;
                __syncwarp();  // every lane has read k_rest before the one that finds the digit writes it
                if (excl < rest && rest <= incl) {
                    int before = excl, d = 0;
                    while (before + st.hist[top_digit - d] < rest) before += st.hist[top_digit - d++];
                    st.prefix = (unsigned long long)(prefix | ((K)(top_digit - d) << shift));
                    st.k_rest = rest - before;
                }
            }
            mask |= (K)255 << shift;
            __syncthreads();
        }
        // Gather the values above the threshold, then pad with copies of the threshold.
        const K threshold = (K)st.prefix;
        const int above = k - st.k_rest;
        if (threadIdx.x == 0) st.count_above = 0;
        __syncthreads();
        for (long long j = b + threadIdx.x; j < e; j += blockDim.x) {
            const T v = rows.data[j];
            if (Key<T>::of(v) > threshold) top[atomicAdd(&st.count_above, 1)] = v;
        }
        for (int i = above + threadIdx.x; i < cap; i += blockDim.x)
            top[i] = i < k ? Key<T>::value(threshold) : T(0);
    }
    __syncthreads();
    // Bitonic sort, descending; the gather order above varies, the sorted result does not.
    for (int size = 2; size <= cap; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < cap; i += blockDim.x) {
                const int partner = i ^ stride;
                if (partner > i) {
                    const bool descending = (i & size) == 0;
                    const T a = top[i], c = top[partner];
                    if (descending ? a < c : a > c) { top[i] = c; top[partner] = a; }
                }
            }
            __syncthreads();
        }
    }
}

// One block per row; threads stride the row's values. Row sums, non-zero counts and qc_var
// sums reduce in a fixed tree (deterministic). The per-gene columns come from the moments
// family (kernels/moments.cu), which reads rows in slices: no atomic per stored value here.
template <typename T, class Rows>
__device__ __forceinline__ void qc_row(const Rows& rows, long long row, const unsigned* qc_bits, int n_qc,
                       const int* ns, int n_ns, int top_n, int cap, double* row_total,
                       long long* row_nnz, double* row_qc, double* row_top, int* flags) {
    extern __shared__ __align__(16) unsigned char shared[];
    T* top = reinterpret_cast<T*>(shared);
    TopState& st = *reinterpret_cast<TopState*>(shared + ((cap * sizeof(T) + 15) / 16) * 16);
    __shared__ double scratch[32];
    __shared__ long long scratch_n[32];

    const long long b = rows.begin(row), e = rows.end(row);
    double total = 0.0, qc[QC_VARS_PER_PASS] = {0.0, 0.0, 0.0, 0.0};
    long long nnz = 0;
    int bad = 0;
    for (long long j = b + threadIdx.x; j < e; j += blockDim.x) {
        const T v = rows.data[j];
        bad |= value_flags(v);
        total += (double)v;
        nnz += v != T(0);
        if (n_qc > 0) {
            const unsigned bits = qc_bits[rows.column(j, b)];
#pragma unroll
            for (int q = 0; q < QC_VARS_PER_PASS; ++q)
                if ((bits >> q) & 1u) qc[q] += (double)v;
        }
    }
    if (bad) atomicOr(flags, bad);
    if (row_total != nullptr) {
        total = block_sum(total, scratch);
        nnz = block_sum(nnz, scratch_n);
        if (threadIdx.x == 0) { row_total[row] = total; row_nnz[row] = nnz; }
    }
#pragma unroll
    for (int q = 0; q < QC_VARS_PER_PASS; ++q) {
        if (q < n_qc) {
            const double s = block_sum(qc[q], scratch);
            if (threadIdx.x == 0) row_qc[row * QC_VARS_PER_PASS + q] = s;
        }
    }
    if (n_ns == 0) return;
    row_top_values<T>(rows, b, e, top_n, cap, top, st);
    for (int m = 0; m < n_ns; ++m) {
        double s = 0.0;
        for (int i = threadIdx.x; i < ns[m]; i += blockDim.x) s += (double)top[i];
        s = block_sum(s, scratch);
        if (threadIdx.x == 0) row_top[row * n_ns + m] = s;
    }
}

template <typename T, typename I>
__global__ void
qc_csr(const T* data, const I* indices, const I* indptr, long long n_rows,
       const unsigned* qc_bits, int n_qc, const int* ns, int n_ns, int top_n, int cap,
       double* row_total, long long* row_nnz, double* row_qc, double* row_top, int* flags) {
    const CsrRows<T, I> rows = {const_cast<T*>(data), indices, indptr};
    qc_row<T>(rows, (long long)blockIdx.x, qc_bits, n_qc, ns, n_ns, top_n, cap, row_total,
              row_nnz, row_qc, row_top, flags);
}

template <typename T>
__global__ void
qc_dense(const T* x, long long n_rows, long long n_cols,
         const unsigned* qc_bits, int n_qc, const int* ns, int n_ns, int top_n, int cap,
         double* row_total, long long* row_nnz, double* row_qc, double* row_top, int* flags) {
    const DenseRows<T> rows = {const_cast<T*>(x), n_cols};
    qc_row<T>(rows, (long long)blockIdx.x, qc_bits, n_qc, ns, n_ns, top_n, cap, row_total,
              row_nnz, row_qc, row_top, flags);
}
