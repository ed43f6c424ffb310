// Shared device helpers for every kernel family: warp and block reductions, flags.
#pragma once

// Bits a kernel sets in its `flags` word; the host turns them into clear errors.
#define GPUSC_FLAG_NONFINITE 1
#define GPUSC_FLAG_NEGATIVE 2

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;  // valid in lane 0
}

// Sum over the block in a fixed tree (deterministic); valid in thread 0.
// `scratch` holds one slot per warp; blockDim.x is a multiple of 32, at most 1024.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int n_warps = blockDim.x >> 5;
    v = (threadIdx.x < n_warps) ? scratch[threadIdx.x] : T(0);
    if (warp == 0) v = warp_sum(v);
    return v;
}

template <typename T>
__device__ __forceinline__ int value_flags(T v) {
    return (isfinite((double)v) ? 0 : GPUSC_FLAG_NONFINITE) | (v < T(0) ? GPUSC_FLAG_NEGATIVE : 0);
}

// Row access for CSR and C-ordered dense matrices, so one kernel body serves both.
// Offsets are 64-bit: nnz and n_rows * n_cols may pass 2^31.
template <typename T, typename I>
struct CsrRows {
    T* data;
    const I* indices;
    const I* indptr;
    __device__ long long begin(long long row) const { return (long long)indptr[row]; }
    __device__ long long end(long long row) const { return (long long)indptr[row + 1]; }
    __device__ long long column(long long j, long long) const { return (long long)indices[j]; }
};

template <typename T>
struct DenseRows {
    T* data;
    long long n_cols;
    __device__ long long begin(long long row) const { return row * n_cols; }
    __device__ long long end(long long row) const { return row * n_cols + n_cols; }
    __device__ long long column(long long j, long long row_begin) const { return j - row_begin; }
};
