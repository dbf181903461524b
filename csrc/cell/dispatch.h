// The seam between the device-agnostic sequence driver (rnn.cpp) and the per-device pointwise kernels.
// Kept free of ATen so that nvcc compiles the CUDA kernels without torch's heavy headers.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <string>

#include "cell.h"
#include "cell_ln.h"

namespace fastrnn {

template <>
struct AccType<c10::Half> {
  using type = float;
};
template <>
struct AccType<c10::BFloat16> {
  using type = float;
};

enum class Mode : int { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };
enum class Dtype : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Calls f with a default-constructed op struct for the mode, one of the four given in Mode's order.
template <class Lstm, class Gru, class Tanh, class Relu, class F>
void visit(Mode m, F&& f) {
  switch (m) {
    case Mode::LSTM: return f(Lstm{});
    case Mode::GRU: return f(Gru{});
    case Mode::RNN_TANH: return f(Tanh{});
    case Mode::RNN_RELU: return f(Relu{});
  }
}

// The op structs of cell.h (plain cells) and cell_ln.h (fastrnn's own cells).
template <class F>
void visit_fwd(Mode m, F&& f) {
  visit<LstmFwd, GruFwd, RnnFwd<false>, RnnFwd<true>>(m, f);
}
template <class F>
void visit_bwd(Mode m, F&& f) {
  visit<LstmBwd, GruBwd, RnnBwd<false>, RnnBwd<true>>(m, f);
}
template <class F>
void visit_ext(Mode m, F&& f) {
  visit<LstmExt, GruExt, RnnExt<false>, RnnExt<true>>(m, f);
}

// CPU: fp32 (compiled per ISA level, run at isa_level()) and fp64; parallel over rows x hidden.
void cell_cpu(Mode m, Dtype d, const CellParams& p);
void cell_cpu(Mode m, Dtype d, const CellGradParams& p);
// CPU, on the calling thread only (the engine's threads each run their own unit block): rows [0, p.rows) x
// units [0, units) with every pointer already offset to the block. d is the sequence tensors' dtype, F32 or
// BF16; the workspaces are fp32.
void cell_cpu_block(Mode m, Dtype d, const CellParams& p, int64_t units);
void cell_cpu_block(Mode m, Dtype d, const CellGradParams& p, int64_t units);
// CPU, fastrnn's own cells (cell_ln.h), fp32 and fp64: forward parallel over rows, backward over the
// LayerNorm gradient slots (p.slots, at most the thread count), the input LayerNorm over all rows.
void ext_cpu(Mode m, Dtype d, const ExtParams& p);
void ext_cpu(Mode m, Dtype d, const ExtGradParams& p);
void ln_rows_cpu(Dtype d, const LnRowsParams& p);
// The same on the calling thread only, tasks [begin, end): forward rows, backward slots (a thread of a team
// that owns slot s runs [s, s + 1)).
void ext_cpu_tasks(Mode m, Dtype d, const ExtParams& p, int64_t begin, int64_t end);
void ext_cpu_tasks(Mode m, Dtype d, const ExtGradParams& p, int64_t begin, int64_t end);
// The x86-64 level fastrnn's CPU code runs at: the CPU's, or less where FASTRNN_CPU_ISA=avx512|avx2|baseline
// caps it (an unknown value throws, naming it). Fixed for the process: the CPU engine's weight layout follows it,
// and a backward must find the layout its forward saved.
enum class Isa { Baseline, V3, V4 };
Isa isa_level();
// isa_level() in words, with the cap where one applies, for build_info()
std::string cpu_isa();

// The most LayerNorm gradient slots (blocks) a CUDA backward step uses; each is a partial sum of 4*G*H + 2*H.
constexpr int64_t kCudaLnSlots = 128;

#ifdef FASTRNN_WITH_CUDA
// CUDA: all four dtypes, launched on `stream` (a cudaStream_t) of the current device.
void cell_cuda(Mode m, Dtype d, const CellParams& p, void* stream);
void cell_cuda(Mode m, Dtype d, const CellGradParams& p, void* stream);
// CUDA, fastrnn's own cells, fp32 and fp64: one block per row (backward: per LayerNorm gradient slot).
void ext_cuda(Mode m, Dtype d, const ExtParams& p, void* stream);
void ext_cuda(Mode m, Dtype d, const ExtGradParams& p, void* stream);
void ln_rows_cuda(Dtype d, const LnRowsParams& p, void* stream);
// Touches the CUDA runtime (device count, one tiny kernel); throws c10::Error on any CUDA error.
int cuda_probe();
#endif

}  // namespace fastrnn
