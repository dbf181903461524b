// CUDA pointwise kernels: the cell.h ops over one time step. Only c10 headers are included, no ATen, to
// keep nvcc's compile time (two archs on a 2-core CI) short; all four storage dtypes live in this one file
// because each kernel is a few dozen instructions and instantiation, not parsing, is cheap.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "cell/dispatch.h"

namespace fastrnn {


namespace {

constexpr int kThreads = 256;

// p: a step's params (rows x H elements). Grid-stride with 64-bit indices: rows * gate width can pass 2^31.
template <class Op, typename T, class P>
__global__ void __launch_bounds__(kThreads) cell_kernel(const P p) {
  const int64_t n = p.rows * p.H;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / p.H;
    Op::template elem<T>(p, r, i - r * p.H);
  }
}

template <class Op, typename T, class P>
void launch(const P& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.H;
  if (n == 0) return;
  // enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65536);
  cell_kernel<Op, T, P><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Visit, class P>
void run_cuda(Mode m, Dtype d, const P& p, void* stream, Visit visit) {
  auto s = static_cast<cudaStream_t>(stream);
  visit(m, [&](auto op) {
    using Op = decltype(op);
    switch (d) {
      case Dtype::F32: return launch<Op, float>(p, s);
      case Dtype::F64: return launch<Op, double>(p, s);
      case Dtype::F16: return launch<Op, c10::Half>(p, s);
      case Dtype::BF16: return launch<Op, c10::BFloat16>(p, s);
    }
  });
}

__global__ void probe_kernel(int* out) { *out = 1; }

}  // namespace

void cell_cuda(Mode m, Dtype d, const CellParams& p, void* stream) {
  run_cuda(m, d, p, stream, [](Mode mm, auto&& f) { visit_fwd(mm, f); });
}

void cell_cuda(Mode m, Dtype d, const CellGradParams& p, void* stream) {
  run_cuda(m, d, p, stream, [](Mode mm, auto&& f) { visit_bwd(mm, f); });
}

int cuda_probe() {
  int count = 0;
  C10_CUDA_CHECK(cudaGetDeviceCount(&count));
  int* buf = nullptr;
  C10_CUDA_CHECK(cudaMalloc(&buf, sizeof(int)));
  probe_kernel<<<1, 1>>>(buf);
  const cudaError_t launched = cudaGetLastError();
  int host = 0;
  const cudaError_t copied = cudaMemcpy(&host, buf, sizeof(int), cudaMemcpyDeviceToHost);
  C10_CUDA_CHECK(cudaFree(buf));
  C10_CUDA_CHECK(launched);
  C10_CUDA_CHECK(copied);
  return host == 1 ? count : 0;
}

}  // namespace fastrnn
