// cell_ln.h's executor on CUDA: one block's threads walk a row and sum through shared memory. The row kernels
// of fastrnn's cells (cell_ln_cuda.cu) run a block per row; the persistent engine (persist_cuda.cu) runs its
// row phase through it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cell/cell_ln.h"

namespace fastrnn {

constexpr int kRowThreads = 256;
constexpr int kWarps = kRowThreads / 32;

// cell_ln.h's executor for the block that owns a row. Host stubs only keep the host pass of these
// __host__ __device__ templates compiling; the kernels run the device branch.
struct RowBlock {
  using Math = Fused;
  template <class F>
  FRNN_HD void each(int64_t n, F&& f) const {
#if defined(__CUDA_ARCH__)
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) f(j);
#endif
  }

  // Warp shuffles, then every thread adds the kWarps warp sums in the same order: all threads get the same bits.
  template <int K, typename A>
  FRNN_HD void sum(A (&v)[K]) const {
#if defined(__CUDA_ARCH__)
    __shared__ A warp_sums[K][kWarps];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
      if (lane == 0) warp_sums[k][warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      A s = A(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += warp_sums[k][w];
      v[k] = s;
    }
    __syncthreads();  // warp_sums is reused by the row's next sum
#endif
  }

  template <int K, typename A, class F>
  FRNN_HD void reduce(int64_t n, A (&s)[K], F&& f) const {
    A acc[K] = {};
    each(n, [&](int64_t j) {
      A v[K];
      f(j, v);
#pragma unroll
      for (int k = 0; k < K; ++k) acc[k] += v[k];
    });
    sum(acc);
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] += acc[k];
  }

  FRNN_HD void sync() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }

  FRNN_HD bool leader() const {
#if defined(__CUDA_ARCH__)
    return threadIdx.x == 0;
#else
    return true;
#endif
  }
};

}  // namespace fastrnn
