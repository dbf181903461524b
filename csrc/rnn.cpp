// API layer and device-agnostic sequence driver of the "cpp" backend (see fastrnn/ops/__init__.py for the
// contract). Per layer: one input-projection GEMM for all steps; per step one recurrent GEMM into a
// preallocated buffer (MKL/oneDNN on CPU, cuBLAS on CUDA) and one fused pointwise kernel (cell.h). The time
// loop allocates no memory, runs no Python and never syncs with the device: batch_sizes lives on the CPU.
//
// Shapes: N rows of x (time-major, step t owns rows [off_t, off_t + b_t)), B batch, I input, H hidden,
// Hout = proj_size or H, G gates (4 LSTM, 3 GRU, 1 RNN).
#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/profiler/api.h>

#ifdef FASTRNN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <array>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "seq.h"

namespace fastrnn {
namespace {

using at::Tensor;

template <class P>
void run_cell(const Problem& pr, const Tensor& like, const P& params) {
  if (like.is_cuda()) {
#ifdef FASTRNN_WITH_CUDA
    cell_cuda(pr.mode, dtype_of(like), params, c10::cuda::getCurrentCUDAStream(like.device().index()).stream());
#endif
  } else {
    cell_cpu(pr.mode, dtype_of(like), params);
  }
}

// 16-bit on the CPU where the engine does not take the problem (proj_size, odd H, no bf16 ukernel, fp16) and the
// persistent engine's emulator does not either (test hook): the fp32 computation, rounding only what is returned.
bool cpu_16bit_fallback(const Problem& pr, const Tensor& x, bool training) {
  return x.is_cpu() && at::isReducedFloatingType(x.scalar_type()) && !engine_takes(pr, x, training) &&
         persist::plan_for(pr, x).scheme == persist::kNone;
}

// The path layer_fwd (cells: layer_ext_fwd; pair: layer_pair_fwd, for a direction of a bidirectional layer) takes
// for these inputs, in words, from the same decisions in the same order, with `training` as its `save`: the path,
// and why the CPU engine or the persistent one declined it ("" where neither did or was asked).
std::pair<std::string, std::string> path_of(const Problem& pr, const Tensor& x, bool cells, bool pair,
                                            bool training) {
  const std::string gemm = x.is_cpu() ? "at::mm" : "cuBLAS GEMM";
  const bool widen = cells ? at::isReducedFloatingType(x.scalar_type()) : cpu_16bit_fallback(pr, x, training);
  const Tensor like = widen ? at::empty({0}, x.options().dtype(at::kFloat)) : x;
  const std::string pre = widen ? "computed in fp32, rounding what is returned; " : "";
  if (cells) {
    const persist::Plan plan = persist::plan_for(pr, like, true);
    if (plan.scheme != persist::kNone) {
      return {pre + "persistent engine, one launch per direction, the fused row kernel's rows in it: " + plan.why, ""};
    }
    const bool team = !pr.proj && StepGemm::takes(like);
    return {pre + "per step one fused row kernel after the recurrent GEMM, " +
                (team ? "on the CPU engine's threads and brgemm ukernel" : gemm),
            ""};
  }
  const persist::Plan plan = pair ? persist::pair_plan_for(pr, like) : persist::plan_for(pr, like);
  if (plan.scheme != persist::kNone) {
    return {pre + (plan.dirs == 2 ? "persistent engine, both directions in one launch: " : "persistent engine, one launch per direction: ") + plan.why +
                (plan.mma ? x.scalar_type() == at::kFloat
                                ? "; its GEMMs on tensor cores in TF32 (torch allows TF32 for cuDNN's RNN)"
                                : "; its GEMMs on tensor cores (mma.sync, fp32 accumulation)"
                          : ""),
            ""};
  }
  if (engine_takes(pr, like, training)) {
    const int in_place = engine_in_place(pr, like);
    const char* x_side = engine_projects_in_step(pr, like) ? "; x . W_ih^T in the step" : "; x . W_ih^T up front";
    return {pre + "fused CPU engine (oneDNN brgemm ukernel + cell per step and thread" +
                std::array<const char*, 3>{
                    "", "; h . W_hh^T a matrix-vector product on W_hh in place: one row per step",
                    "; h . W_hh^T and x . W_ih^T matrix-vector products on W_hh and W_ih in place: one row per step"}
                    [in_place] +
                (in_place == 2 ? "" : x_side) + ")",
            ""};
  }
  const std::string why = x.is_cpu() ? "CPU engine: " + engine_refusal(pr, like, training) : std::string(plan.why);
  return {pre + "per step " + gemm + " and the fused cell kernel", why};
}

std::string with_reason(const std::pair<std::string, std::string>& p) {
  return p.second.empty() ? p.first : p.first + " (" + p.second + ")";
}

// What fastrnn.explain reports: the path of a call without gradients, and a training call's where it differs.
std::string layer_path(const std::string& mode, const Tensor& x, const OptTensor& batch_sizes, const Tensor& h0,
                       const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                       const OptTensor& b_hh, const OptTensor& w_hr, bool /*reverse*/, bool cells, bool pair) {
  const Problem pr = check_inputs(parse_mode(mode), x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, true);
  const auto inference = path_of(pr, x, cells, pair, false), training = path_of(pr, x, cells, pair, true);
  const std::string said = with_reason(inference);
  return training.first == inference.first ? said : said + "; in training (with gradients): " + with_reason(training);
}

// Biases are added in the pointwise kernel: addmm would first broadcast-copy them over all N x G*H rows.
// b_hh joins b_ih except GRU's b_hn, which sits inside r * (W_hn h + b_hn). Returns (bias [G*H], b_hn [H] or
// undefined).
std::pair<Tensor, Tensor> cell_biases(const Problem& pr, const OptTensor& b_ih, const OptTensor& b_hh,
                                      const at::TensorOptions& opts) {
  const int64_t H = pr.H, GH = pr.G * H;
  Tensor bias;
  if (b_ih && b_hh && !pr.gru) {
    bias = at::add(*b_ih, *b_hh);  // one op: at one step of a small cell each op is a visible share of the call
  } else {
    bias = b_ih ? b_ih->clone(at::MemoryFormat::Contiguous) : at::zeros({GH}, opts);
    if (b_hh) bias.narrow(0, 0, pr.gru ? 2 * H : GH).add_(b_hh->narrow(0, 0, pr.gru ? 2 * H : GH));
  }
  Tensor b_hn;
  if (pr.gru) b_hn = b_hh ? b_hh->narrow(0, 2 * H, H).contiguous() : at::zeros({H}, opts);
  return {bias, b_hn};
}

// Forward of one layer in one direction. Returns y [N, Hout], h_n [B, Hout], c_n [B, H] (LSTM, else [0]) and
// what backward needs when `save`: gates [N, G*H] (activated, LSTM/GRU), c [N, H] (LSTM), hn [N, H] (GRU:
// W_hn h + b_hn); each is [0] when not saved or not needed (RNN saves nothing, it reuses y).
std::vector<Tensor> layer_fwd(const std::string& mode, const Tensor& x_in, const OptTensor& batch_sizes,
                              const Tensor& h0, const OptTensor& c0, const Tensor& w_ih_in, const Tensor& w_hh_in,
                              const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr_in, bool reverse,
                              bool save) {
  const Problem pr =
      check_inputs(parse_mode(mode), x_in, batch_sizes, h0, c0, w_ih_in, w_hh_in, b_ih, b_hh, w_hr_in, true);
  const c10::DeviceGuard guard(x_in.device());
  const NoAutocast no_autocast;
  if (cpu_16bit_fallback(pr, x_in, save)) {
    auto out = layer_fwd(mode, x_in.to(at::kFloat), batch_sizes, h0.to(at::kFloat), as_float(c0),
                         w_ih_in.to(at::kFloat), w_hh_in.to(at::kFloat), as_float(b_ih), as_float(b_hh),
                         as_float(w_hr_in), reverse, save);
    for (int i = 0; i < 3; ++i) out[i] = out[i].to(x_in.scalar_type());
    return out;
  }
  const Tensor x = x_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor w_hr = contig(w_hr_in);
  const auto opts = x.options();
  const int64_t H = pr.H, GH = pr.G * H, Hout = pr.Hout;

  const auto [bias, b_hn] = cell_biases(pr, b_ih, b_hh, opts);
  const persist::Plan plan = persist::plan_for(pr, x);
  if (plan.scheme != persist::kNone) {
    return persist::fwd(pr, plan, x, {{h0.contiguous(), contig(c0), w_ih, w_hh, bias, b_hn, reverse}}, save)[0];
  }
  if (engine_takes(pr, x, save)) {
    return engine_fwd(pr, x, h0.contiguous(), contig(c0), w_ih, w_hh, bias, b_hn, reverse, save);
  }
  Tensor gates = gemm(x, w_ih.t());

  // Where the first step updates every row, it reads h0 in place and writes hs whole: no copy of h0 (a reverse
  // packed layer's first step has the fewest rows and finds the others' h0 in hs)
  const Tensor h0c = h0.contiguous();
  const bool h0_in_place = pr.T > 0 && pr.size[reverse ? pr.T - 1 : 0] == pr.B;
  Tensor hs = h0_in_place ? ws_empty({pr.B, Hout}, opts) : h0c.clone();
  Tensor cs = pr.lstm ? c0->clone(at::MemoryFormat::Contiguous) : empty0(x);
  Tensor y = ws_empty({pr.N, Hout}, opts);
  Tensor hg = ws_empty({pr.B, GH}, opts);
  const bool save_c = save && pr.lstm, save_hn = save && pr.gru;
  Tensor c_save = save_c ? ws_empty({pr.N, H}, opts) : empty0(x);
  Tensor hn_save = save_hn ? ws_empty({pr.N, H}, opts) : empty0(x);
  Tensor hr = pr.proj ? ws_empty({pr.B, H}, opts) : Tensor();
  const Tensor w_hh_t = w_hh.t();

  for (int64_t k = 0; k < pr.T; ++k) {
    const int64_t t = reverse ? pr.T - 1 - k : k, b = pr.size[t], o = pr.off[t];
    const Tensor& h_in = k == 0 && h0_in_place ? h0c : hs;
    const auto rows = [b, &pr](const Tensor& m) { return b == pr.B ? m : m.narrow(0, 0, b); };
    Tensor hg_b = rows(hg);
    at::mm_out(hg_b, rows(h_in), w_hh_t);
    CellParams p{};
    p.rows = b;
    p.H = H;
    p.gw = H;
    p.gs = GH;
    p.hg_stride = GH;
    p.gates = row_ptr(gates, o, GH);
    p.hg = hg.data_ptr();
    p.bias = bias.data_ptr();
    p.b_hn = pr.gru ? b_hn.data_ptr() : nullptr;
    // with a projection the cell's h is o*tanh(c), the input of the per-step projection GEMM
    p.h = pr.proj ? hr.data_ptr() : hs.data_ptr();
    p.h_prev = pr.proj ? p.h : h_in.data_ptr();
    p.h_stride = H;
    p.y = pr.proj ? hr.data_ptr() : row_ptr(y, o, Hout);
    p.y_stride = H;
    if (pr.lstm) {
      p.c = cs.data_ptr();
      p.c_save = save_c ? row_ptr(c_save, o, H) : p.c;
    }
    if (pr.gru) {
      // unsaved, W_hn h + b_hn goes back into hg's n block, which this step owns anyway
      p.hn_save = save_hn ? row_ptr(hn_save, o, H) : static_cast<char*>(hg.data_ptr()) + 2 * H * hg.element_size();
      p.hn_stride = save_hn ? H : GH;
    }
    run_cell(pr, x, p);
    if (pr.proj) {
      Tensor h_b = rows(hs);
      at::mm_out(h_b, rows(hr), w_hr.t());
      y.narrow(0, o, b).copy_(h_b);
    }
  }
  const bool save_gates = save && (pr.lstm || pr.gru);
  return {y, hs, cs, save_gates ? gates : empty0(x), c_save, hn_save};
}

// What layer_fwd saved, as layer_bwd gets it back (`suffix`: which direction's, in the pair's messages). The
// persistent engine (`own_dtype`) saves in x's dtype, CPU or not.
void check_saved(const Problem& pr, const Tensor& x, bool own_dtype, const Tensor& gates, const Tensor& c_save,
                 const Tensor& hn_save, const std::string& suffix) {
  const Tensor ws = at::empty({0}, x.options().dtype(own_dtype ? x.scalar_type() : ws_dtype(x)));
  const char* ws_name = "the workspace dtype of x";
  const int64_t N = pr.N, H = pr.H;
  if (pr.lstm || pr.gru) check_like(gates, ("saved gates" + suffix).c_str(), ws, {N, pr.G * H}, ws_name);
  if (pr.lstm) check_like(c_save, ("saved c" + suffix).c_str(), ws, {N, H}, ws_name);
  if (pr.gru) check_like(hn_save, ("saved hn" + suffix).c_str(), ws, {N, H}, ws_name);
}

// The reverse direction of a pair has the forward one's sizes (a bidirectional layer's two directions).
void check_pair(const Problem& pr, const Problem& rev) {
  TORCH_CHECK(rev.H == pr.H && rev.Hout == pr.Hout && rev.B == pr.B && rev.proj == pr.proj,
              "fastrnn: the reverse direction must have the forward one's sizes: H ", pr.H, ", Hout ", pr.Hout,
              ", B ", pr.B, (pr.proj ? " with" : " without"), " w_hr; got H ", rev.H, ", Hout ", rev.Hout, ", B ",
              rev.B, (rev.proj ? " with" : " without"), " w_hr_r");
}

// Backward of layer_fwd. dy [N, Hout], dh_n [B, Hout], dc_n [B, H] (LSTM). Returns dx, dh0, dc0, dw_ih, dw_hh,
// db_ih, db_hh, dw_hr; an input that is absent gets a [0] gradient, and so does x unless need_dx (a first
// layer fed with data skips one of the backward's four big GEMMs). Without need_dh0 the per-step path skips the
// last step's dh . W_hh, whose only use is dh0 (a quarter of a one-step call's products), and dh0 is undefined.
std::vector<Tensor> layer_bwd(const std::string& mode, const Tensor& x_in, const OptTensor& batch_sizes,
                              const Tensor& h0_in, const OptTensor& c0_in, const Tensor& w_ih_in,
                              const Tensor& w_hh_in, const OptTensor& b_ih, const OptTensor& b_hh,
                              const OptTensor& w_hr_in, bool reverse, const Tensor& y_in, const Tensor& gates_in,
                              const Tensor& c_save_in, const Tensor& hn_save_in, const Tensor& dy_in,
                              const Tensor& dh_n, const OptTensor& dc_n, bool need_dx, bool need_dh0) {
  const Problem pr =
      check_inputs(parse_mode(mode), x_in, batch_sizes, h0_in, c0_in, w_ih_in, w_hh_in, b_ih, b_hh, w_hr_in, false);
  const c10::DeviceGuard guard(x_in.device());
  const NoAutocast no_autocast;
  const int64_t H = pr.H, GH = pr.G * H, Hout = pr.Hout;
  check_grad_outputs(pr, x_in, y_in, dy_in, dh_n, dc_n);
  const persist::Plan plan = persist::plan_for(pr, x_in);
  check_saved(pr, x_in, plan.scheme != persist::kNone, gates_in, c_save_in, hn_save_in, "");
  if (cpu_16bit_fallback(pr, x_in, true)) {
    auto grads = layer_bwd(mode, x_in.to(at::kFloat), batch_sizes, h0_in.to(at::kFloat), as_float(c0_in),
                           w_ih_in.to(at::kFloat), w_hh_in.to(at::kFloat), as_float(b_ih), as_float(b_hh),
                           as_float(w_hr_in), reverse, y_in.to(at::kFloat), gates_in, c_save_in, hn_save_in,
                           dy_in.to(at::kFloat), dh_n.to(at::kFloat), as_float(dc_n), need_dx, need_dh0);
    for (Tensor& g : grads) {
      if (g.defined()) g = g.to(x_in.scalar_type());
    }
    return grads;
  }

  const Tensor x = x_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor h0 = h0_in.contiguous(), c0 = contig(c0_in), w_hr = contig(w_hr_in);
  const Tensor y = y_in.contiguous(), gates = gates_in.contiguous(), dy = dy_in.contiguous();
  const Tensor c_save = c_save_in.contiguous(), hn_save = hn_save_in.contiguous();
  const auto opts = x.options();
  if (plan.scheme != persist::kNone) {
    return persist::bwd(pr, plan, x,
                        {{h0, c0, w_ih, w_hh, b_ih.has_value(), b_hh.has_value(), reverse, y, gates, c_save, hn_save,
                          dy, dh_n.contiguous(), contig(dc_n)}},
                        need_dx)[0];
  }
  if (engine_takes(pr, x, true)) {
    return engine_bwd(pr, x, h0, c0, w_ih, w_hh, b_ih.has_value(), b_hh.has_value(), reverse, y, gates, c_save,
                      hn_save, dy, dh_n.contiguous(), contig(dc_n), need_dx);
  }

  const Chunks chunks = backward_chunks(pr, at::isReducedFloatingType(x.scalar_type()));
  const int64_t rmax = chunks.rmax;

  Tensor dhs = dh_n.clone(at::MemoryFormat::Contiguous);
  Tensor dcs = pr.lstm ? dc_n->clone(at::MemoryFormat::Contiguous) : empty0(x);
  Tensor dgx = ws_empty({rmax, GH}, opts);
  Tensor dgh = pr.gru ? ws_empty({rmax, GH}, opts) : dgx;
  Tensor hprev = pr.packed ? ws_empty({rmax, Hout}, opts) : Tensor();
  const ProjGrad proj(pr, rmax, opts);
  GradSums sums = grad_sums(pr, x, w_ih, w_hh, b_ih.has_value(), b_hh.has_value(), need_dx, rmax);
  Tensor dw_hr = pr.proj ? at::zeros_like(w_hr) : empty0(x);
  // LSTM's pointwise backward needs c_prev, GRU's h_prev: the previous step's saved rows or the initial state
  const Tensor& prev_src = pr.lstm ? c_save : y;
  const Tensor& init = pr.lstm ? c0 : h0;

  auto step = [&](int64_t t, int64_t local) {
    const int64_t b = pr.size[t], o = pr.off[t];
    const PrevStep prev = prev_step(pr, t, reverse);
    Tensor dh_b = dhs.narrow(0, 0, b);
    CellGradParams p{};
    p.rows = b;
    p.H = H;
    p.gw = H;
    p.gs = GH;
    p.gates = pr.lstm || pr.gru ? row_ptr(gates, o, GH) : nullptr;
    p.c = pr.lstm ? row_ptr(c_save, o, H) : nullptr;
    p.hn = pr.gru ? row_ptr(hn_save, o, H) : nullptr;
    p.out = row_ptr(y, o, Hout);
    p.out_stride = Hout;
    if (pr.lstm || pr.gru) {
      p.init = init.data_ptr();
      p.prev = prev.rows > 0 ? row_ptr(prev_src, pr.off[prev.t], H) : p.init;
      p.prev_stride = H;
      p.n_prev = prev.rows;
    }
    if (pr.proj) {
      proj.to_cell(p, proj.total(local, dh_b, dy.narrow(0, o, b)), w_hr);
    } else {
      p.dh = dhs.data_ptr();
      p.dh_stride = Hout;
      p.dy = row_ptr(dy, o, Hout);
      p.dy_stride = Hout;
    }
    p.dc = pr.lstm ? dcs.data_ptr() : nullptr;
    p.dgx = row_ptr(dgx, local, GH);
    p.dgh = row_ptr(dgh, local, GH);
    p.dh_prev = dhs.data_ptr();
    run_cell(pr, x, p);
    if (pr.packed) gather_hprev(pr, prev, y, h0, hprev.narrow(0, local, b));
    // the last step of the backward starts every row it has from h0 (in either direction, packed or not)
    if (!need_dh0 && t == (reverse ? pr.T - 1 : 0)) return;
    const Tensor dgh_b = dgh.narrow(0, local, b);
    if (pr.gru) {
      dh_b.addmm_(dgh_b, w_hh);  // dh_b holds the direct z*dh term
    } else {
      at::mm_out(dh_b, dgh_b, w_hh);
    }
  };

  backward_steps(pr, chunks, reverse, step, [&](int64_t lo, int64_t R) {
    flush_chunk(pr, reverse, lo, R, dgx.narrow(0, 0, R), dgh.narrow(0, 0, R), x, y, h0, hprev, w_ih, sums);
    if (pr.proj) {
      // o * tanh(c) was not saved: recomputing it here costs one pass over R x H instead of N x H memory
      Tensor hr_r = proj.hr.narrow(0, 0, R);
      at::tanh_out(hr_r, c_save.narrow(0, lo, R));
      hr_r.mul_(gates.narrow(0, lo, R).narrow(1, 3 * H, H));
      gemm(dw_hr, proj.dtot.narrow(0, 0, R).t(), hr_r, true);
    }
  });
  const auto [db_ih, db_hh] = bias_grads(sums, b_ih.has_value(), b_hh.has_value(), pr.gru, x);
  return {sums.dx, need_dh0 ? dhs : Tensor(), dcs, sums.dw_ih, sums.dw_hh, db_ih, db_hh, dw_hr};
}

// Both directions of a bidirectional layer, the reverse one's arguments suffixed _r: one persistent launch for the
// two where persist::pair_plan_for plans it, else layer_fwd / layer_bwd for each. Forward returns layer_fwd's six
// for the forward direction, then the reverse's; backward layer_bwd's eight for each (dx of each direction:
// the caller sums them).
std::vector<Tensor> layer_pair_fwd(const std::string& mode, const Tensor& x, const OptTensor& batch_sizes,
                                   const Tensor& h0, const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                                   const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                                   const Tensor& h0_r, const OptTensor& c0_r, const Tensor& w_ih_r,
                                   const Tensor& w_hh_r, const OptTensor& b_ih_r, const OptTensor& b_hh_r,
                                   const OptTensor& w_hr_r, bool save) {
  const Mode m = parse_mode(mode);
  const Problem pr = check_inputs(m, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, true);
  check_pair(pr, check_inputs(m, x, batch_sizes, h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, true));
  const persist::Plan plan = persist::pair_plan_for(pr, x);
  if (plan.dirs != 2) {
    std::vector<Tensor> out = layer_fwd(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, false, save);
    const std::vector<Tensor> rev =
        layer_fwd(mode, x, batch_sizes, h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, true, save);
    out.insert(out.end(), rev.begin(), rev.end());
    return out;
  }
  const c10::DeviceGuard guard(x.device());
  const NoAutocast no_autocast;
  const Tensor xc = x.contiguous();
  auto dir = [&](const Tensor& h, const OptTensor& c, const Tensor& wi, const Tensor& wh, const OptTensor& bi,
                 const OptTensor& bh, bool reverse) {
    const auto biases = cell_biases(pr, bi, bh, xc.options());
    return persist::FwdDir{h.contiguous(), contig(c), wi.contiguous(), wh.contiguous(), biases.first,
                           biases.second, reverse};
  };
  const auto outs = persist::fwd(
      pr, plan, xc, {dir(h0, c0, w_ih, w_hh, b_ih, b_hh, false), dir(h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, true)},
      save);
  std::vector<Tensor> out = outs[0];
  out.insert(out.end(), outs[1].begin(), outs[1].end());
  return out;
}

std::vector<Tensor> layer_pair_bwd(const std::string& mode, const Tensor& x, const OptTensor& batch_sizes,
                                   const Tensor& h0, const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                                   const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                                   const Tensor& h0_r, const OptTensor& c0_r, const Tensor& w_ih_r,
                                   const Tensor& w_hh_r, const OptTensor& b_ih_r, const OptTensor& b_hh_r,
                                   const OptTensor& w_hr_r, const Tensor& y, const Tensor& gates, const Tensor& c_save,
                                   const Tensor& hn_save, const Tensor& y_r, const Tensor& gates_r,
                                   const Tensor& c_save_r, const Tensor& hn_save_r, const Tensor& dy,
                                   const Tensor& dh_n, const OptTensor& dc_n, const Tensor& dy_r,
                                   const Tensor& dh_n_r, const OptTensor& dc_n_r, bool need_dx) {
  const Mode m = parse_mode(mode);
  const Problem pr = check_inputs(m, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, false);
  check_pair(pr, check_inputs(m, x, batch_sizes, h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, false));
  const persist::Plan plan = persist::pair_plan_for(pr, x);
  if (plan.dirs != 2) {
    // the reverse direction first: its activations were the forward's last written, so the likelier in cache
    const std::vector<Tensor> rev = layer_bwd(mode, x, batch_sizes, h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
                                              w_hr_r, true, y_r, gates_r, c_save_r, hn_save_r, dy_r, dh_n_r, dc_n_r,
                                              need_dx, true);
    std::vector<Tensor> out = layer_bwd(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, false, y, gates,
                                        c_save, hn_save, dy, dh_n, dc_n, need_dx, true);
    out.insert(out.end(), rev.begin(), rev.end());
    return out;
  }
  const c10::DeviceGuard guard(x.device());
  const NoAutocast no_autocast;
  check_grad_outputs(pr, x, y, dy, dh_n, dc_n);
  check_grad_outputs(pr, x, y_r, dy_r, dh_n_r, dc_n_r);
  check_saved(pr, x, true, gates, c_save, hn_save, "");
  check_saved(pr, x, true, gates_r, c_save_r, hn_save_r, " (reverse)");
  auto dir = [&](const Tensor& h, const OptTensor& c, const Tensor& wi, const Tensor& wh, bool has_bi, bool has_bh,
                 bool reverse, const Tensor& yy, const Tensor& g, const Tensor& cs, const Tensor& hn,
                 const Tensor& d_y, const Tensor& d_h, const OptTensor& d_c) {
    return persist::BwdDir{h.contiguous(), contig(c),        wi.contiguous(),  wh.contiguous(), has_bi,
                           has_bh,         reverse,          yy.contiguous(),  g.contiguous(),  cs.contiguous(),
                           hn.contiguous(), d_y.contiguous(), d_h.contiguous(), contig(d_c)};
  };
  const auto outs = persist::bwd(pr, plan, x.contiguous(),
                                 {dir(h0, c0, w_ih, w_hh, b_ih.has_value(), b_hh.has_value(), false, y, gates, c_save,
                                      hn_save, dy, dh_n, dc_n),
                                  dir(h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r.has_value(), b_hh_r.has_value(), true, y_r,
                                      gates_r, c_save_r, hn_save_r, dy_r, dh_n_r, dc_n_r)},
                                 need_dx);
  std::vector<Tensor> out = outs[0];
  out.insert(out.end(), outs[1].begin(), outs[1].end());
  return out;
}

// Python's half of the nodes' backward (fastrnn/ops/cpp.py `_node_grad`: the op's autograd formula), set once at
// import. Leaked on purpose: a py::object destroyed after the interpreter would crash the exit.
pybind11::object* g_node_grad = nullptr;

void set_node_grad(pybind11::object f) { g_node_grad = new pybind11::object(std::move(f)); }

// A gradient the kernels cannot read: a vmap's batched view (autograd.grad(..., is_grads_batched=True),
// torch.func over a backward) has no storage of its own, and a tensor subclass (a backward hook may return one)
// has its own dispatch.
bool foreign(const Tensor& t) {
  constexpr c10::DispatchKeySet kForeign({c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                                          c10::DispatchKey::Batched, c10::DispatchKey::BatchedNestedTensor,
                                          c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot});
  return t.defined() && t.key_set().has_any(kForeign);
}

using torch::autograd::AutogradContext;

Tensor value_or_undefined(const OptTensor& t) { return t ? *t : Tensor(); }

OptTensor present(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// layer_bwd's eight gradients (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) as node arguments: a node's arguments
// are mode, x, batch_sizes, then each direction's h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr (LayerNode: then reverse)
constexpr std::array<int, 8> kForwardGrads{1, 3, 4, 5, 6, 7, 8, 9};
constexpr std::array<int, 8> kReverseGrads{1, 10, 11, 12, 13, 14, 15, 16};

// What the nodes below share. A node returns y, h_n and (LSTM) c_n per direction: an output that is always empty
// would need mark_non_differentiable, which compiled autograd refuses (torch's CppNode::compiled_args asserts that
// a node marked none). It saves the op's saved tensors: its
// n_inputs tensor arguments in argument order from x (an absent optional one undefined), then per direction y,
// gates, c, hn.
struct NodeIo {
  const std::vector<Tensor> s;
  std::vector<bool> needs;  // per node argument, tensor or not
  const bool lstm;

  NodeIo(AutogradContext* ctx, size_t n_inputs, size_t n_args)
      : s(ctx->get_saved_variables()), needs(n_args, false), lstm(s[3].defined()) {
    // needs_input_grad counts the tensor arguments present, in argument order; argument 0 is the mode
    size_t edge = 0;
    for (size_t i = 0; i < n_inputs; ++i) {
      if (s[i].defined()) needs[i + 1] = ctx->needs_input_grad(edge++);
    }
  }

  // Where the op's formula decides: a backward that builds a graph (create_graph), gradients the kernels cannot
  // read, or a mode or the profiler watching the backward; both paths then give the same gradients from one
  // formula.
  static bool formula_decides(const std::vector<Tensor>& grads) {
    if (at::GradMode::is_enabled() || c10::impl::TorchDispatchModeTLS::any_modes_set() ||
        at::impl::torch_function_mode_enabled() || torch::profiler::impl::profilerEnabled()) {
      return true;
    }
    return std::any_of(grads.begin(), grads.end(), foreign);
  }

  // The formula's gradients, one per node argument (`pair`: PairNode's), from the output gradients as the op's
  // formula takes them: y, h_n, c_n (None unless LSTM) per direction.
  std::vector<Tensor> formula(AutogradContext* ctx, bool pair, bool reverse, const std::vector<Tensor>& grads) const {
    TORCH_CHECK(g_node_grad != nullptr, "fastrnn: the nodes' formula is not registered (import fastrnn.ops.cpp)");
    std::vector<Tensor> per_direction;
    for (size_t d = 0; d < (pair ? 2u : 1u); ++d) {
      const Tensor* g = direction(grads, d);
      per_direction.insert(per_direction.end(), {g[0], g[1], lstm ? g[2] : Tensor()});
    }
    pybind11::gil_scoped_acquire gil;
    const auto got = (*g_node_grad)(ctx->saved_data["mode"].toStringRef(), pair, reverse, s, needs, per_direction)
                         .cast<std::vector<OptTensor>>();
    std::vector<Tensor> out;
    for (const OptTensor& t : got) out.push_back(value_or_undefined(t));
    return out;
  }

  // Direction d's output gradients among a node's.
  const Tensor* direction(const std::vector<Tensor>& grads, size_t d) const {
    return grads.data() + d * (lstm ? 3 : 2);
  }

  // Direction d's output gradients with zeros for those autograd has none of (y [N, Hout], h0 [B, Hout], c0).
  std::array<OptTensor, 3> filled(const std::vector<Tensor>& grads, size_t d, const Tensor& y, const Tensor& h0,
                                  const Tensor& c0) const {
    const Tensor* g = direction(grads, d);
    const auto fill = [](const Tensor& grad, const Tensor& like) {
      return grad.defined() ? grad : at::zeros_like(like);
    };
    return {fill(g[0], y), fill(g[1], h0), lstm ? OptTensor(fill(g[2], c0)) : std::nullopt};
  }

  // A direction's eight gradients from layer_bwd into `out` at `args`, where needed and given.
  void place(std::vector<Tensor>& out, std::vector<Tensor>::iterator g, const std::array<int, 8>& args) const {
    for (size_t k = 0; k < args.size(); ++k, ++g) {
      if (needs[args[k]] && g->defined()) out[args[k]] = std::move(*g);
    }
  }

  static std::vector<Tensor> outputs(const std::vector<Tensor>& out, size_t d, bool lstm) {
    return lstm ? std::vector<Tensor>{out[6 * d], out[6 * d + 1], out[6 * d + 2]}
                : std::vector<Tensor>{out[6 * d], out[6 * d + 1]};
  }
};

// A training call of one plain layer in one direction as a C++ autograd node (fastrnn/ops/cpp.py
// `layer_forward`): layer_fwd saving, then layer_bwd, with no Python between the user's call and the kernels.
// The op path's Python (the contract's checks, torch.autograd.Function, the formula) cost ~80 µs a call forward
// and ~120 backward on a Zen 4, where a step of a small cell computes in 20: cells stepped in a training loop ran
// at 0.4-0.8x torch.nn. Where the op's formula must decide (NodeIo::formula_decides) the backward hands the
// node's saved tensors to it.
struct LayerNode : torch::autograd::Function<LayerNode> {
  static std::vector<Tensor> forward(AutogradContext* ctx, const std::string& mode, const Tensor& x,
                                     const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                     const OptTensor& b_hh, const OptTensor& w_hr, bool reverse) {
    std::vector<Tensor> out = layer_fwd(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, true);
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["reverse"] = reverse;
    const auto v = value_or_undefined;
    ctx->save_for_backward({x, v(batch_sizes), h0, v(c0), w_ih, w_hh, v(b_ih), v(b_hh), v(w_hr), out[0], out[3],
                            out[4], out[5]});
    ctx->set_materialize_grads(false);
    return NodeIo::outputs(out, 0, c0.has_value());
  }

  static std::vector<Tensor> backward(AutogradContext* ctx, std::vector<Tensor> grads) {
    const NodeIo io(ctx, 9, 11);
    const bool reverse = ctx->saved_data["reverse"].toBool();
    if (io.formula_decides(grads)) return io.formula(ctx, false, reverse, grads);
    const std::vector<Tensor>& s = io.s;
    const auto [dy, dh_n, dc_n] = io.filled(grads, 0, s[9], s[2], s[3]);
    std::vector<Tensor> g =
        layer_bwd(ctx->saved_data["mode"].toStringRef(), s[0], present(s[1]), s[2], present(s[3]), s[4], s[5],
                  present(s[6]), present(s[7]), present(s[8]), reverse, s[9], s[10], s[11], s[12], *dy, *dh_n, dc_n,
                  io.needs[1], io.needs[3]);
    std::vector<Tensor> out(11);
    io.place(out, g.begin(), kForwardGrads);
    return out;
  }
};

// Both directions of a bidirectional layer as one node (fastrnn/ops/cpp.py `pair_forward`): layer_pair_fwd and
// layer_pair_bwd, as LayerNode for one direction; the forward direction's outputs, then the reverse's.
struct PairNode : torch::autograd::Function<PairNode> {
  static std::vector<Tensor> forward(AutogradContext* ctx, const std::string& mode, const Tensor& x,
                                     const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                     const OptTensor& b_hh, const OptTensor& w_hr, const Tensor& h0_r,
                                     const OptTensor& c0_r, const Tensor& w_ih_r, const Tensor& w_hh_r,
                                     const OptTensor& b_ih_r, const OptTensor& b_hh_r, const OptTensor& w_hr_r) {
    std::vector<Tensor> out = layer_pair_fwd(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, h0_r, c0_r,
                                             w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, true);
    ctx->saved_data["mode"] = mode;
    const auto v = value_or_undefined;
    ctx->save_for_backward({x, v(batch_sizes), h0, v(c0), w_ih, w_hh, v(b_ih), v(b_hh), v(w_hr), h0_r, v(c0_r), w_ih_r,
                            w_hh_r, v(b_ih_r), v(b_hh_r), v(w_hr_r), out[0], out[3], out[4], out[5], out[6], out[9],
                            out[10], out[11]});
    ctx->set_materialize_grads(false);
    std::vector<Tensor> both = NodeIo::outputs(out, 0, c0.has_value());
    const std::vector<Tensor> rev = NodeIo::outputs(out, 1, c0.has_value());
    both.insert(both.end(), rev.begin(), rev.end());
    return both;
  }

  static std::vector<Tensor> backward(AutogradContext* ctx, std::vector<Tensor> grads) {
    const NodeIo io(ctx, 16, 17);
    if (io.formula_decides(grads)) return io.formula(ctx, true, false, grads);
    const std::vector<Tensor>& s = io.s;
    const auto [dy, dh_n, dc_n] = io.filled(grads, 0, s[16], s[2], s[3]);
    const auto [dy_r, dh_n_r, dc_n_r] = io.filled(grads, 1, s[20], s[9], s[10]);
    std::vector<Tensor> g = layer_pair_bwd(
        ctx->saved_data["mode"].toStringRef(), s[0], present(s[1]), s[2], present(s[3]), s[4], s[5], present(s[6]),
        present(s[7]), present(s[8]), s[9], present(s[10]), s[11], s[12], present(s[13]), present(s[14]),
        present(s[15]), s[16], s[17], s[18], s[19], s[20], s[21], s[22], s[23], *dy, *dh_n, dc_n, *dy_r, *dh_n_r,
        dc_n_r, io.needs[1]);
    if (io.needs[1]) {
      g[0].add_(g[8]);  // x feeds both directions
      g[8] = Tensor();
    }
    std::vector<Tensor> out(17);
    io.place(out, g.begin(), kForwardGrads);
    io.place(out, g.begin() + 8, kReverseGrads);
    return out;
  }
};

std::vector<Tensor> layer_node(const std::string& mode, const Tensor& x, const OptTensor& batch_sizes,
                               const Tensor& h0, const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, bool reverse) {
  return LayerNode::apply(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
}

std::vector<Tensor> layer_pair_node(const std::string& mode, const Tensor& x, const OptTensor& batch_sizes,
                                    const Tensor& h0, const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                                    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                                    const Tensor& h0_r, const OptTensor& c0_r, const Tensor& w_ih_r,
                                    const Tensor& w_hh_r, const OptTensor& b_ih_r, const OptTensor& b_hh_r,
                                    const OptTensor& w_hr_r) {
  return PairNode::apply(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, h0_r, c0_r, w_ih_r, w_hh_r,
                         b_ih_r, b_hh_r, w_hr_r);
}

// Whether a layer call on these tensors keeps what a backward needs: gradients on, and one of them requires them
// (fastrnn/ops/glue.py `saving`, the per-layer path's test).
bool wants_grad(const Tensor& t) { return t.requires_grad(); }
bool wants_grad(const OptTensor& t) { return t && t->requires_grad(); }
template <class... Ts>
bool saving(const Ts&... ts) {
  return at::GradMode::is_enabled() && (wants_grad(ts) || ...);
}

// One call of a torch.nn-style *Cell (fastrnn/modules.py `_CellBase._step`) in one entry, as torch.nn's
// `_VF.*_cell`: the Python of the checked path (~13 µs a call) cost more than a step of a small cell computes.
// input: [B, I] or unbatched [I]; hx, cx: [B, H] or [H] as the input, both absent for zeros (cx: LSTM only).
// A LayerNode where gradients are needed, else layer_fwd. Returns h' (LSTM: h', c') in the input's form. Any
// other input fails here, and the Python path then raises torch.nn's error for it.
std::vector<Tensor> cell_call(const std::string& mode, const Tensor& input, const OptTensor& hx, const OptTensor& cx,
                              const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  const bool lstm = parse_mode(mode) == Mode::LSTM;
  const int64_t dim = input.dim();
  TORCH_CHECK((dim == 1 || dim == 2) && w_hh.dim() == 2, "fastrnn: input must be 1-D or 2-D and w_hh 2-D");
  TORCH_CHECK(cx.has_value() == (lstm && hx.has_value()), "fastrnn: cx goes with hx, and only for LSTM");
  const auto batched = [dim](const Tensor& t) {
    TORCH_CHECK(t.dim() == dim, "fastrnn: a state must have the input's dimensions");
    return dim == 2 ? t : t.unsqueeze(0);
  };
  const Tensor x = batched(input);
  const Tensor h0 = hx ? batched(*hx) : at::zeros({x.size(0), w_hh.size(1)}, x.options());
  const OptTensor c0 = !lstm ? OptTensor() : cx ? batched(*cx) : OptTensor(at::zeros_like(h0));
  std::vector<Tensor> out = saving(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
                                ? LayerNode::apply(mode, x, std::nullopt, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                   std::nullopt, false)
                                : layer_fwd(mode, x, std::nullopt, h0, c0, w_ih, w_hh, b_ih, b_hh, std::nullopt, false,
                                            false);
  const auto form = [dim](const Tensor& t) { return dim == 2 ? t : t.squeeze(0); };
  return lstm ? std::vector<Tensor>{form(out[0]), form(out[2])} : std::vector<Tensor>{form(out[0])};
}

// A module's layers in one call, as torch.nn's `_VF.rnn_*`: at one step the Python between a module's layers
// cost more than the layers (fastrnn/modules.py `_run_at_once`, `_run_layers_at_once`). Each layer's y is the next
// one's x, after dropout with probability `dropout` (the caller passes 0 outside training). A layer whose inputs
// need gradients runs in its autograd node (LayerNode; both directions of a bidirectional layer in a PairNode
// where both need them or neither, as the modules' per-layer path decides), else the kernels alone, so that
// either path gives the same bits. weights: torch.nn's `_flat_weights` order, per layer and direction w_ih, w_hh,
// then b_ih, b_hh with `bias`, then w_hr with `proj`. hx: [L*D, B, Hout]; cx: [L*D, B, H] (LSTM). Returns y
// [N, D*Hout], h_n [L*D, B, Hout] and c_n [L*D, B, H] (LSTM, else [0]).
std::vector<Tensor> stack_fwd(const std::string& mode, const Tensor& x, const OptTensor& batch_sizes,
                              const Tensor& hx, const OptTensor& cx, const std::vector<Tensor>& weights,
                              int64_t num_layers, bool bidirectional, bool bias, bool proj, double dropout) {
  const bool lstm = parse_mode(mode) == Mode::LSTM;
  const int64_t D = bidirectional ? 2 : 1, per = 2 + (bias ? 2 : 0) + (proj ? 1 : 0), n = num_layers * D;
  TORCH_CHECK(num_layers >= 1 && static_cast<int64_t>(weights.size()) == n * per, "fastrnn: weights must hold ",
              num_layers, " layers x ", D, " directions x ", per, " tensors, got ", weights.size(), " tensors for ",
              num_layers, " layers");
  TORCH_CHECK(hx.dim() == 3 && hx.size(0) == n, "fastrnn: hx must be [", n, ", B, Hout], got ",
              shape_str(hx.sizes()));
  TORCH_CHECK(lstm == cx.has_value(), "fastrnn: cx is ", lstm ? "required for LSTM" : "only for LSTM");
  TORCH_CHECK(!cx || (cx->dim() == 3 && cx->size(0) == n), "fastrnn: cx must be [", n, ", B, H], got ",
              shape_str(cx->sizes()));
  struct Dir {
    Tensor h0;
    OptTensor c0, b_ih, b_hh, w_hr;
    const Tensor &w_ih, &w_hh;
  };
  auto dir = [&](int64_t k) {
    const Tensor* w = &weights[k * per];
    // w[i] only where present: past the last direction's tensors there is nothing to refer to
    const auto opt = [w](bool present, int64_t i) { return present ? OptTensor(w[i]) : std::nullopt; };
    return Dir{hx.select(0, k), cx ? OptTensor(cx->select(0, k)) : std::nullopt, opt(bias, 2), opt(bias, 3),
               opt(proj, per - 1), w[0], w[1]};
  };
  const auto saves = [](const Tensor& rows, const Dir& d) {
    return saving(rows, d.h0, d.c0, d.w_ih, d.w_hh, d.b_ih, d.b_hh, d.w_hr);
  };
  const size_t per_dir = lstm ? 3 : 2;
  // a direction's y, h_n and c_n (LSTM): the first of `out` from `at` (a node returns just those, the kernels six)
  const auto take = [per_dir](std::vector<Tensor>& into, const std::vector<Tensor>& out, size_t at) {
    into.insert(into.end(), out.begin() + at, out.begin() + at + per_dir);
  };
  const auto one = [&](const Tensor& rows, const Dir& d, bool reverse, std::vector<Tensor>& into) {
    take(into,
         saves(rows, d) ? LayerNode::apply(mode, rows, batch_sizes, d.h0, d.c0, d.w_ih, d.w_hh, d.b_ih, d.b_hh,
                                           d.w_hr, reverse)
                        : layer_fwd(mode, rows, batch_sizes, d.h0, d.c0, d.w_ih, d.w_hh, d.b_ih, d.b_hh, d.w_hr,
                                    reverse, false),
         0);
  };
  Tensor rows = x;
  std::vector<Tensor> h_n, c_n;
  for (int64_t l = 0; l < num_layers; ++l) {
    const Dir f = dir(l * D);
    std::vector<Tensor> outs;  // per direction y, h_n, c_n (LSTM)
    if (!bidirectional) {
      one(rows, f, false, outs);
    } else {
      const Dir r = dir(l * D + 1);
      const bool save = saves(rows, f);
      if (save != saves(rows, r)) {
        one(rows, f, false, outs);
        one(rows, r, true, outs);
      } else if (save) {
        outs = PairNode::apply(mode, rows, batch_sizes, f.h0, f.c0, f.w_ih, f.w_hh, f.b_ih, f.b_hh, f.w_hr, r.h0,
                               r.c0, r.w_ih, r.w_hh, r.b_ih, r.b_hh, r.w_hr);
      } else {
        const std::vector<Tensor> out = layer_pair_fwd(mode, rows, batch_sizes, f.h0, f.c0, f.w_ih, f.w_hh, f.b_ih,
                                                       f.b_hh, f.w_hr, r.h0, r.c0, r.w_ih, r.w_hh, r.b_ih, r.b_hh,
                                                       r.w_hr, false);
        take(outs, out, 0);
        take(outs, out, 6);
      }
    }
    for (size_t d = 0; d < outs.size(); d += per_dir) {
      h_n.push_back(outs[d + 1]);
      if (lstm) c_n.push_back(outs[d + 2]);
    }
    rows = bidirectional ? at::cat({outs[0], outs[per_dir]}, 1) : outs[0];
    if (dropout > 0 && l + 1 < num_layers) rows = at::dropout(rows, dropout, true);
  }
  return {rows, at::stack(h_n), lstm ? at::stack(c_n) : empty0(x)};
}

// A module's call on a dense input in one entry (fastrnn/modules.py `_RNNBase._run_at_once`): the input and state
// forms torch.nn's modules take, around stack_fwd (gradients through its nodes, `dropout` between layers). The
// checked path's Python took ~19 µs a call without gradients (torch.nn's ~12) and ~70 with them, where a small
// module computes a step in ~75 (RNN (1,64,256,256,1) on the Xeon). input: [T, B, I], [B, T, I] with
// `batch_first`, or unbatched [T, I]; hx: [L*D, B, Hout] ([L*D, Hout] unbatched), cx: [L*D, B, H] (LSTM), both
// absent for zeros. Returns y in the input's form, h_n and (LSTM) c_n. Any other input fails here, and the Python
// path then takes the call (and raises torch.nn's errors).
std::vector<Tensor> module_call(const std::string& mode, const Tensor& input, const OptTensor& hx,
                                const OptTensor& cx, const std::vector<Tensor>& weights, int64_t num_layers,
                                bool bidirectional, bool bias, int64_t proj_size, bool batch_first, double dropout) {
  const Mode m = parse_mode(mode);
  const bool lstm = m == Mode::LSTM;
  const int64_t dim = input.dim(), D = bidirectional ? 2 : 1;
  TORCH_CHECK((dim == 2 || dim == 3) && weights.size() >= 2 && weights[1].dim() == 2,
              "fastrnn: input must be 2-D or 3-D and w_hh 2-D");
  TORCH_CHECK(cx.has_value() == (lstm && hx.has_value()), "fastrnn: cx goes with hx, and only for LSTM");
  const Tensor x = dim == 2 ? input.unsqueeze(1) : batch_first ? input.transpose(0, 1) : input;
  const int64_t T = x.size(0), B = x.size(1), H = weights[1].size(0) / gates_of(m), Hout = proj_size ? proj_size : H;
  TORCH_CHECK(T > 0, "fastrnn: no steps");
  const auto state = [&](const OptTensor& s, int64_t width) {
    if (!s) return at::zeros({num_layers * D, B, width}, x.options());
    TORCH_CHECK(s->dim() == dim, "fastrnn: a state must have the input's dimensions");
    return dim == 2 ? s->unsqueeze(1) : *s;
  };
  const OptTensor c0 = lstm ? OptTensor(state(cx, H)) : std::nullopt;
  std::vector<Tensor> out = stack_fwd(mode, x.reshape({T * B, x.size(2)}), std::nullopt, state(hx, Hout), c0,
                                      weights, num_layers, bidirectional, bias, proj_size != 0, dropout);
  Tensor y = out[0].view({T, B, out[0].size(1)});
  if (dim == 2) return {y.squeeze(1), out[1].squeeze(1), lstm ? out[2].squeeze(1) : out[2]};
  return {batch_first ? y.transpose(0, 1) : y, out[1], out[2]};
}

#define FRNN_STR2(x) #x
#define FRNN_STR(x) FRNN_STR2(x)

pybind11::dict build_info() {
  pybind11::dict d;
  std::vector<int> archs;
#ifdef FASTRNN_WITH_CUDA
  d["with_cuda"] = true;
  archs = {FASTRNN_CUDA_ARCHS};
  // an arch-specific target (sm_90a) counts as its base arch above but embeds no PTX for newer GPUs to run
  d["cuda_ptx"] = FASTRNN_CUDA_PTX ? pybind11::object(pybind11::int_(FASTRNN_CUDA_PTX)) : pybind11::none();
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
  d["with_cuda"] = false;
  d["cuda_ptx"] = pybind11::none();
  d["cuda_version"] = pybind11::none();
#endif
  d["cuda_archs"] = archs;
  d["cpu_isa"] = cpu_isa();
  d["cpu_vectorisation"] = "fp32 kernels compiled for x86-64-v4/v3/baseline, run at cpu_isa; fp64 baseline";
  d["cpu_engine"] = engine_machine();
  pybind11::dict gemm;
  for (const auto& [dtype, engine] : engine_report()) gemm[dtype.c_str()] = engine;
  d["cpu_gemm"] = gemm;
  pybind11::dict cxx;
  cxx["compiler"] = __VERSION__;
  cxx["cxx_opt"] = FRNN_STR(FASTRNN_CXX_OPT);
#ifdef __FAST_MATH__
  cxx["fast_math"] = true;
#else
  cxx["fast_math"] = false;
#endif
#ifdef _OPENMP
  cxx["openmp"] = _OPENMP;
#endif
  d["compiler"] = cxx;
  return d;
}

// The persistent engine's plan for G gates, batch B, hidden H, storage element size esize (8: fp64), with or
// without proj_size, plain cells or fastrnn's own (`cells`), one direction or both of a bidirectional layer
// (`pair`: "dirs" 2 where they share a launch; "blocks" counts both), on a device with `sms` SMs, `smem` bytes of shared
// memory per block, cooperative launch or not, thread-block clusters of up to `cluster` blocks (0: none) and
// `clusters_at_once` of each size (persist::plan_with, what a call on such a device takes).
const char* scheme_name(int scheme) {
  static const char* names[] = {"per-step", "block", "grid", "cluster"};
  return names[scheme];
}

pybind11::dict plan_dict(const persist::Plan& p);

pybind11::dict persist_plan(int64_t G, int64_t B, int64_t H, int64_t esize, int64_t sms, int64_t smem,
                            bool cooperative, bool proj, bool cells, int64_t cluster, bool mma, bool tf32, bool pair,
                            bool pad, const std::map<std::string, int64_t>& costs,
                            const std::map<int64_t, int64_t>& clusters_at_once) {
  persist::Limits lim{sms, smem, cooperative, cluster, mma, tf32, pad};
  persist::set_clusters_at_once(lim, clusters_at_once);
  // prices other than persist.h's (a calibration's), by name; an unknown name is refused
  for (const auto& [name, value] : costs) {
    int64_t* slot = name == "grid_sync" ? &lim.costs.grid_sync
                  : name == "grid_sync_member" ? &lim.costs.grid_sync_member
                  : name == "cluster_sync" ? &lim.costs.cluster_sync
                  : name == "stage" ? &lim.costs.stage : name == "mma" ? &lim.costs.mma
                  : name == "exchange" ? &lim.costs.exchange : nullptr;
    TORCH_CHECK(slot != nullptr, "fastrnn: costs: known prices are grid_sync, grid_sync_member, cluster_sync, stage, "
                "mma and exchange, got ", name);
    TORCH_CHECK(value >= 0, "fastrnn: costs: ", name, " must be at least 0, got ", value);
    *slot = value;
  }
  return plan_dict(persist::plan_with(lim, G, B, H, esize, proj, cells, pair));
}

pybind11::dict plan_dict(const persist::Plan& p) {
  pybind11::dict d;
  d["scheme"] = scheme_name(p.scheme);
  d["units"] = p.units;
  d["slices"] = p.slices;
  d["batch_tile"] = p.bt;
  d["tiles"] = p.tiles;
  d["mma"] = p.mma;
  d["padded"] = p.pad;
  d["chunks"] = pybind11::make_tuple(p.kc[0], p.kc[1]);
  d["push"] = pybind11::make_tuple(p.push[0], p.push[1]);
  d["dirs"] = p.dirs;
  d["blocks"] = p.dirs * p.tiles * p.slices;
  d["cost"] = p.cost;
  d["smem"] = p.smem;
  d["why"] = p.why;
  return d;
}

pybind11::list persist_clocks(bool on) {
  pybind11::list out;
  for (const persist::ClockRecord& r : persist::clocks(on)) {
    pybind11::dict d;
    d["launch"] = r.launch;
    d["mode"] = mode_name(r.mode);
    d["T"] = r.T;
    d["plan"] = plan_dict(r.plan);
    d["clocks"] = r.clocks;
    out.append(d);
  }
  return out;
}

pybind11::dict gemm_price(int64_t K, int64_t R, int64_t bt, bool mma, int64_t es, int64_t kc, bool pad,
                          int64_t stages, bool exchange) {
  const persist::GemmPrice p = persist::gemm_price(K, R, bt, mma, es, kc, pad, stages, exchange);
  pybind11::dict d, model;
  d["units"] = p.units;
  d["steps"] = p.steps;
  d["chunks"] = p.chunks;
  d["exchanged"] = p.exchanged;
  d["smem"] = p.smem;
  d["fits"] = p.fits;
  const persist::Costs c;
  model["grid_sync"] = c.grid_sync;
  model["grid_sync_member"] = c.grid_sync_member;
  model["cluster_sync"] = c.cluster_sync;
  model["stage"] = c.stage;
  model["mma"] = c.mma;
  model["exchange"] = c.exchange;
  model["simt_step"] = persist::kTile;
  d["model"] = model;  // the constants it priced with
  return d;
}

pybind11::dict persist_probe(int device, const std::string& scheme, int64_t blocks, int64_t cluster, int64_t K,
                             int64_t R, int64_t bt, bool mma, int64_t es, int64_t kc, bool pad, int64_t rows,
                             int64_t iters, bool exchange) {
  const persist::ProbeResult r = persist::probe(device, scheme, blocks, cluster, K, R, bt, mma, es, kc, pad, rows,
                                                iters, exchange);
  pybind11::dict d;
  d["cycles"] = r.cycles;
  d["ns"] = r.ns;
  d["scheme"] = scheme_name(r.scheme);
  return d;
}

// A device's limits as cuda_limits and _persist_emulated_limits report them: clusters held at once as the plan takes
// them (persist::clusters_at_once: SMs / size where the runtime did not say, which "clusters_measured" tells), so
// that the dict goes back into persist_plan's clusters_at_once as it is.
pybind11::dict limits_dict(const persist::Limits& l, bool tf32) {
  pybind11::dict d;
  d["sms"] = l.sms;
  d["smem"] = l.smem;
  d["cooperative"] = l.cooperative;
  d["cluster"] = l.cluster;
  pybind11::dict at_once;  // the sizes a plan may take, 2 to l.cluster
  bool measured = l.cluster >= 2;
  for (int64_t n = 2; n <= l.cluster; ++n) {
    at_once[pybind11::int_(n)] = persist::clusters_at_once(l, n);
    measured = measured && l.clusters_at_once[n] >= 0;
  }
  d["clusters_at_once"] = at_once;
  d["clusters_measured"] = measured;
  d["mma"] = l.mma;
  d["tf32"] = tf32;
  d["pad"] = l.pad;
  return d;
}

pybind11::dict cuda_limits(int device) {
#ifdef FASTRNN_WITH_CUDA
  return limits_dict(persist::limits(device), persist::tf32_allowed());
#else
  (void)device;
  TORCH_CHECK(false, "fastrnn: _C was built without CUDA");
#endif
}

int cuda_probe_py() {
#ifdef FASTRNN_WITH_CUDA
  return cuda_probe();
#else
  TORCH_CHECK(false, "fastrnn: _C was built without CUDA");
#endif
}

}  // namespace
}  // namespace fastrnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fastrnn fused RNN kernels (CPU and CUDA)";
  m.def("layer_fwd", &fastrnn::layer_fwd, py::arg("mode"), py::arg("x"), py::arg("batch_sizes"), py::arg("h0"),
        py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("w_hr"),
        py::arg("reverse"), py::arg("save"));
  m.def("layer_bwd", &fastrnn::layer_bwd, py::arg("mode"), py::arg("x"), py::arg("batch_sizes"), py::arg("h0"),
        py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("w_hr"),
        py::arg("reverse"), py::arg("y"), py::arg("gates"), py::arg("c"), py::arg("hn"), py::arg("dy"),
        py::arg("dh_n"), py::arg("dc_n"), py::arg("need_dx"), py::arg("need_dh0") = true);
  // the LayerArgs fields, then each function's own
  const auto dir_args = std::make_tuple(py::arg("mode"), py::arg("x"), py::arg("batch_sizes"), py::arg("h0"),
                                        py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"),
                                        py::arg("b_hh"), py::arg("w_hr"));
  const auto layer_args = std::tuple_cat(dir_args, std::make_tuple(py::arg("reverse")));
  const auto def = [&](const char* name, auto f, auto own) {
    std::apply([&](auto... a) { m.def(name, f, a...); }, std::tuple_cat(layer_args, own));
  };
  def("layer_node", &fastrnn::layer_node, std::make_tuple());
  m.def("_set_node_grad", &fastrnn::set_node_grad, "the op formula the nodes' backward defers to (set at import)");
  def("layer_path", &fastrnn::layer_path, std::make_tuple(py::arg("cells") = false, py::arg("pair") = false));
  // a pair: the forward direction's fields, then the reverse direction's
  const auto reverse_args = std::make_tuple(py::arg("h0_r"), py::arg("c0_r"), py::arg("w_ih_r"), py::arg("w_hh_r"),
                                            py::arg("b_ih_r"), py::arg("b_hh_r"), py::arg("w_hr_r"));
  const auto pair_args = std::tuple_cat(dir_args, reverse_args);
  const auto def_pair = [&](const char* name, auto f, auto own) {
    std::apply([&](auto... a) { m.def(name, f, a...); }, std::tuple_cat(pair_args, own));
  };
  def_pair("layer_pair_fwd", &fastrnn::layer_pair_fwd, std::make_tuple(py::arg("save")));
  def_pair("layer_pair_node", &fastrnn::layer_pair_node, std::make_tuple());
  def_pair("layer_pair_bwd", &fastrnn::layer_pair_bwd,
           std::make_tuple(py::arg("y"), py::arg("gates"), py::arg("c"), py::arg("hn"), py::arg("y_r"),
                           py::arg("gates_r"), py::arg("c_r"), py::arg("hn_r"), py::arg("dy"), py::arg("dh_n"),
                           py::arg("dc_n"), py::arg("dy_r"), py::arg("dh_n_r"), py::arg("dc_n_r"),
                           py::arg("need_dx")));
  def("layer_ext_fwd", &fastrnn::layer_ext_fwd, std::make_tuple(py::arg("ext"), py::arg("save")));
  def("layer_ext_bwd", &fastrnn::layer_ext_bwd,
      std::make_tuple(py::arg("ext"), py::arg("y"), py::arg("xs"), py::arg("hs"), py::arg("stats"), py::arg("c"),
                      py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("need_dx")));
  m.def("cell_call", &fastrnn::cell_call, py::arg("mode"), py::arg("input"), py::arg("hx"), py::arg("cx"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
        "one call of a torch.nn-style cell: h' (LSTM: h', c'), with gradients through a C++ autograd node");
  m.def("stack_fwd", &fastrnn::stack_fwd, py::arg("mode"), py::arg("x"), py::arg("batch_sizes"), py::arg("hx"),
        py::arg("cx"), py::arg("weights"), py::arg("num_layers"), py::arg("bidirectional"), py::arg("bias"),
        py::arg("proj"), py::arg("dropout"), "a module's layers in one call: (y, h_n, c_n)");
  m.def("module_call", &fastrnn::module_call, py::arg("mode"), py::arg("input"), py::arg("hx"), py::arg("cx"),
        py::arg("weights"), py::arg("num_layers"), py::arg("bidirectional"), py::arg("bias"), py::arg("proj_size"),
        py::arg("batch_first"), py::arg("dropout"), "a module's call on a dense input: (y, h_n, c_n)");
  m.def("build_info", &fastrnn::build_info, "how this extension was built: CUDA archs, compiler, CPU ISA");
  m.def("_set_nan_fill", &fastrnn::set_nan_fill, "test hook: NaN-fill every workspace and output at allocation");
  m.def("_set_chunk_rows", &fastrnn::set_chunk_rows, "test hook: backward chunk size in rows (0: default)");
  m.def("_set_engine_steps", &fastrnn::set_engine_steps,
        "test hook: steps from which a call takes the CPU engine, with gradients or without (0: default)");
  m.def("_set_intel_rules", &fastrnn::set_intel_rules,
        "test hook: 1 or 0 makes the CPU engine apply its Intel CPU rules or not (-1: by the CPU's vendor)");
  m.def("_set_in_place_share", &fastrnn::set_in_place_share,
        "test hook: W_hh bytes per thread from which a one-row CPU forward reads W_hh in place (0: default)");
  m.def("persist_plan", &fastrnn::persist_plan, py::arg("G"), py::arg("B"), py::arg("H"), py::arg("esize"),
        py::arg("sms"), py::arg("smem"), py::arg("cooperative") = true, py::arg("proj") = false,
        py::arg("cells") = false, py::arg("cluster") = 0, py::arg("mma") = false, py::arg("tf32") = false,
        py::arg("pair") = false, py::arg("pad") = true, py::arg("costs") = std::map<std::string, int64_t>{},
        py::arg("clusters_at_once") = std::map<int64_t, int64_t>{},
        "the persistent CUDA engine's plan for a problem on a device of these limits (and, with `costs`, the cost "
        "model's prices by name instead of persist.h's; with `clusters_at_once`, {blocks per cluster: clusters the "
        "GPU holds at once}, sizes left out taken as sms // size)");
  m.def("tf32_allowed", &fastrnn::persist::tf32_allowed,
        "whether torch now allows TF32 for cuDNN's RNN, which puts fp32 CUDA calls of the persistent engine on "
        "tensor cores in TF32");
  m.def("persistent_enabled", &fastrnn::persist::cuda_enabled,
        "whether CUDA calls now take the persistent engine where a plan fits (FASTRNN_PERSISTENT=1)");
  m.def("cuda_limits", &fastrnn::cuda_limits, py::arg("device"),
        "SM count, shared memory per block, cooperative launch, most blocks per thread-block cluster and the "
        "clusters of each size the GPU holds at once (as the plans take them: SMs / size where the runtime did not say, "
        "clusters_measured False), tensor cores, and whether torch now allows TF32 for cuDNN's RNN");
  m.def("_persist_bank_report", &fastrnn::persist::bank_report, py::arg("K"), py::arg("R"), py::arg("bt"),
        py::arg("es") = 4, py::arg("ldw") = 0, py::arg("lds") = 0, py::arg("ldr") = 0,
        "test hook: shared-memory wavefronts and instructions per phase of one K step of the SIMT block GEMM");
  m.def("_persist_gemm_price", &fastrnn::gemm_price, py::arg("K"), py::arg("R"), py::arg("bt"), py::arg("mma") = false,
        py::arg("es") = 4, py::arg("kc") = 64, py::arg("pad") = true, py::arg("stages") = 1,
        py::arg("exchange") = false,
        "calibration hook: the persistent engine's cost model's price of one block GEMM, and its constants");
  m.def("_persist_probe", &fastrnn::persist_probe, py::arg("device"), py::arg("scheme"), py::arg("blocks"),
        py::arg("cluster") = 0, py::arg("K") = 0, py::arg("R") = 0, py::arg("bt") = 0, py::arg("mma") = false,
        py::arg("es") = 4, py::arg("kc") = 64, py::arg("pad") = true, py::arg("rows") = 1, py::arg("iters") = 1000,
        py::arg("exchange") = false,
        "calibration hook: SM cycles and nanoseconds per block of `iters` steps of the persistent engine's barrier, "
        "each after a block GEMM where K > 0 (its operand kept in shared memory with `exchange`), on a CUDA device");
  m.def("_persist_clocks", &fastrnn::persist_clocks, py::arg("on"),
        "profiling hook: turns the persistent engine's phase clocks on or off and returns the records of the CUDA "
        "launches timed since they were last turned on (each kept until then): launch, mode, T, plan (its scheme "
        "the one that ran), clocks [blocks, slots] (SM cycles of W_hh's load, of each phase and of the barrier "
        "after it, summed over the steps; the launch's cycles and nanoseconds: _PERSIST_CLOCK_SLOTS)");
  {
    namespace ps = fastrnn::persist;
    py::dict slots;
    slots["load"] = static_cast<int>(ps::kClockLoad);
    slots["phase"] = static_cast<int>(ps::kClockPhase);
    slots["barrier"] = static_cast<int>(ps::kClockBarrier);
    slots["launch"] = static_cast<int>(ps::kClockLaunch);
    slots["ns"] = static_cast<int>(ps::kClockNs);
    slots["slots"] = static_cast<int>(ps::kClockSlots);
    slots["phases"] = ps::kMaxPhases;
    m.attr("_PERSIST_CLOCK_SLOTS") = slots;  // phase ph's slot is phase + 2 ph, its barrier's barrier + 2 ph
  }
  m.def("_set_persist_emulation", &fastrnn::persist::set_emulation, py::arg("sms"), py::arg("smem"),
        py::arg("cluster") = 0, py::arg("mma") = false, py::arg("tf32") = false, py::arg("clusters_fit") = true,
        py::arg("clusters_at_once") = std::map<int64_t, int64_t>{},
        "test hook: CPU fp32 and 16-bit calls run the persistent engine's block program as on a GPU of these "
        "limits (0: off); clusters_fit=False runs a planned cluster at the grid barrier, as a launch does where the "
        "GPU cannot place the clusters; clusters_at_once as persist_plan's");
  m.def("_persist_emulated_limits", [] { return fastrnn::limits_dict(fastrnn::persist::emulated_limits(),
                                                                    fastrnn::persist::emulated_limits().tf32); },
        "test hook: the limits _set_persist_emulation stands in for, as cuda_limits reports a GPU's (sms 0: off)");
  m.def("cuda_probe", &fastrnn::cuda_probe_py,
        "touches the CUDA runtime (device count, one tiny kernel); raises RuntimeError on any CUDA error");
}
