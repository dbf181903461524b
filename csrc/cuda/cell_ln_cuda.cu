// CUDA kernels of fastrnn's own cells (cell_ln.h): one block per row, its threads striding over the row and
// summing through shared memory. fp32 and fp64 (the driver computes 16-bit calls in fp32). Like cell_cuda.cu,
// only c10 headers, no ATen.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "cell/dispatch.h"
#include "cuda/row_block.cuh"

namespace fastrnn {
namespace {

// Launch bounds name one block per SM as enough: without a minimum, ptxas held GRU's fp32 backward to 48
// registers and spilled (sm_80); with it every kernel here fits in at most 128 and none spills.
//
// p: one step's rows; block b takes rows b, b + gridDim.x, ... (backward: gridDim.x = the slots in use, so a
// block owns its slot's partial sums).
template <class Op, typename T>
__global__ void __launch_bounds__(kRowThreads, 1) ext_fwd_kernel(const ExtParams p) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) ext_fwd_row<Op, RowBlock, T>(RowBlock{}, p, r);
}

template <class Op, typename T>
__global__ void __launch_bounds__(kRowThreads, 1) ext_bwd_kernel(const ExtGradParams p) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) ext_bwd_row<Op, RowBlock, T>(RowBlock{}, p, r);
}

// p: all rows of the input projection.
template <typename T>
__global__ void __launch_bounds__(kRowThreads, 1) ln_rows_kernel(const LnRowsParams p) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) ln_rows_row<RowBlock, T>(RowBlock{}, p, r);
}

// A grid of `rows` blocks, capped: the kernels loop over the rest.
unsigned grid(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, 1 << 20)); }

template <class Launch>
void by_dtype(Dtype d, Launch&& launch) {
  switch (d) {
    case Dtype::F32: return launch(float{});
    case Dtype::F64: return launch(double{});
    default: TORCH_CHECK(false, "fastrnn: the CUDA kernels of fastrnn's cells take float32 and float64 only");
  }
}

}  // namespace

void ext_cuda(Mode m, Dtype d, const ExtParams& p, void* stream) {
  if (p.rows == 0) return;
  visit_ext(m, [&](auto op) {
    by_dtype(d, [&](auto t) {
      ext_fwd_kernel<decltype(op), decltype(t)>
          <<<grid(p.rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ext_cuda(Mode m, Dtype d, const ExtGradParams& p, void* stream) {
  if (p.rows == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min(p.rows, p.slots));
  visit_ext(m, [&](auto op) {
    by_dtype(d, [&](auto t) {
      ext_bwd_kernel<decltype(op), decltype(t)><<<blocks, kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ln_rows_cuda(Dtype d, const LnRowsParams& p, void* stream) {
  if (p.rows == 0) return;
  by_dtype(d, [&](auto t) {
    ln_rows_kernel<decltype(t)><<<grid(p.rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastrnn
