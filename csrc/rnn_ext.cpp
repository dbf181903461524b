// Sequence driver of fastrnn's own cells (LayerNorm, zoneout, recurrent dropout: CellExt in
// fastrnn/ops/__init__.py) on every device. Like rnn.cpp's plain path: one input-projection GEMM for all steps
// (and its LayerNorm over all rows); per step one recurrent GEMM and one fused row kernel (cell_ln.h) that
// normalises the recurrent projection while its row is in cache, runs the cell, LSTM's LayerNorm of c and
// zoneout, and writes the next step's masked GEMM operand. Backward mirrors it: per step one fused row kernel
// (zoneout, LayerNorm of c, cell, both projections' LayerNorm backward with per-slot parameter-gradient sums),
// then the recurrent GEMM; the weight gradients are seq.cpp's chunked big GEMMs.
//
// fp32 on the CPU without a projection runs on the CPU engine's team (StepGemm, engine_cpu.cpp): one OpenMP
// region per call (per chunk in backward), W_hh packed once, per step two phases with a barrier after each —
// forward: each thread's columns of the recurrent GEMM on the brgemm ukernel, then each thread's rows of the row
// kernel (a LayerNorm needs the whole row, so the GEMM must finish first); backward: each thread's LayerNorm
// slot of the row kernel, then its columns of dh_{t-1}. Where the persistent engine plans (CUDA with
// FASTRNN_PERSISTENT=1, no projection; its CPU emulator under the test hook) one launch per direction runs the
// same two phases for every step (persist.h). Elsewhere (fp64, a projection, CUDA) at::mm per step.
//
// Saved for backward (each [0] when not saving): xs, hs [N, G*H] the two projections, normalised with
// LayerNorm (raw without); stats [N, kStats] their rstd and LSTM's c mean and rstd (LayerNorm only); c [N, H]
// LSTM's state after each step. The gates, c before zoneout and LSTM's hr are recomputed.
//
// 16-bit calls are computed in fp32 on every device (the saved activations stay fp32), rounding what is
// returned.
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#ifdef FASTRNN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "seq.h"

namespace fastrnn {
namespace {

using at::Tensor;

// A call's CellExt, in its field order.
struct Ext {
  OptTensor ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, zh, zc, mask;

  static Ext of(const std::vector<OptTensor>& v) {
    TORCH_CHECK(v.size() == 9, "fastrnn: ext must hold the 9 CellExt fields (ln_ih_weight .. rec_mask), got ",
                v.size());
    return {v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]};
  }
  std::vector<OptTensor> list() const { return {ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, zh, zc, mask}; }

  bool ln() const { return ln_ih_w.has_value(); }

  Ext map(Tensor (*f)(const Tensor&)) const {
    auto g = [&](const OptTensor& t) { return t ? OptTensor(f(*t)) : std::nullopt; };
    return {g(ln_ih_w), g(ln_ih_b), g(ln_hh_w), g(ln_hh_b), g(ln_c_w), g(ln_c_b), g(zh), g(zc), g(mask)};
  }
};

Tensor to_float(const Tensor& t) { return t.to(at::kFloat); }
Tensor contiguous(const Tensor& t) { return t.contiguous(); }

const void* ptr(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

// Like fastrnn.ops.check_ext, for the CellExt of a checked call.
void check_ext(const Problem& pr, const Tensor& x, const Ext& e) {
  const int64_t GH = pr.G * pr.H;
  const std::pair<const OptTensor*, const char*> ln[] = {{&e.ln_ih_w, "ln_ih_weight"}, {&e.ln_ih_b, "ln_ih_bias"},
                                                         {&e.ln_hh_w, "ln_hh_weight"}, {&e.ln_hh_b, "ln_hh_bias"},
                                                         {&e.ln_c_w, "ln_c_weight"},   {&e.ln_c_b, "ln_c_bias"}};
  const int n_ln = pr.lstm ? 6 : 4;
  std::string all, given;
  int present = 0;
  for (int i = 0; i < n_ln; ++i) {
    all += std::string(i ? ", " : "") + ln[i].second;
    if (ln[i].first->has_value()) given += std::string(present++ ? ", " : "") + ln[i].second;
  }
  TORCH_CHECK(present == 0 || present == n_ln, "fastrnn: LayerNorm needs all of ", all, " or none, got ", given);
  if (!pr.lstm) {
    for (const auto& [t, name] : {std::pair{&e.ln_c_w, "ln_c_weight"}, std::pair{&e.ln_c_b, "ln_c_bias"},
                                  std::pair{&e.zc, "zoneout_c"}}) {
      TORCH_CHECK(!t->has_value(), "fastrnn: ", name, " is only for LSTM, got it for mode ",
                  pr.gru ? "GRU" : "RNN");
    }
  }
  TORCH_CHECK(!pr.lstm || e.zh.has_value() == e.zc.has_value(), "fastrnn: LSTM zoneout needs both zoneout_h and ",
              "zoneout_c");
  for (int i = 0; i < (present ? n_ln : 0); ++i) check_like(**ln[i].first, ln[i].second, x, {i < 4 ? GH : pr.H});
  if (e.zh) check_like(*e.zh, "zoneout_h", x, {pr.N, pr.Hout});
  if (e.zc) check_like(*e.zc, "zoneout_c", x, {pr.N, pr.H});
  if (e.mask) check_like(*e.mask, "rec_mask", x, {pr.B, pr.Hout});
}

// Every additive term of each pre-activation ([G*H]: LayerNorm shifts, b_ih, b_hh) and GRU's recurrent n block
// apart ([H], inside r * (...)).
std::pair<Tensor, Tensor> fold_bias(const Problem& pr, const Ext& e, const OptTensor& b_ih, const OptTensor& b_hh,
                                    const at::TensorOptions& opts) {
  const int64_t H = pr.H, GH = pr.G * H, shared = pr.gru ? 2 * H : GH;
  Tensor bias = at::zeros({GH}, opts);
  Tensor b_hn = pr.gru ? at::zeros({H}, opts) : Tensor();
  for (const OptTensor* t : {&b_ih, &e.ln_ih_b}) {
    if (*t) bias.add_(**t);
  }
  for (const OptTensor* t : {&b_hh, &e.ln_hh_b}) {
    if (!*t) continue;
    bias.narrow(0, 0, shared).add_((*t)->narrow(0, 0, shared));
    if (pr.gru) b_hn.add_((*t)->narrow(0, 2 * H, H));
  }
  return {bias, b_hn};
}

void* stream_of(const Tensor& like) {
#ifdef FASTRNN_WITH_CUDA
  return c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
#else
  (void)like;
  return nullptr;
#endif
}

template <class P>
void run_ext(const Problem& pr, const Tensor& like, const P& p) {
  if (like.is_cuda()) {
#ifdef FASTRNN_WITH_CUDA
    ext_cuda(pr.mode, dtype_of(like), p, stream_of(like));
#endif
  } else {
    ext_cpu(pr.mode, dtype_of(like), p);
  }
}

void ln_rows(const Tensor& like, const LnRowsParams& p) {
  if (like.is_cuda()) {
#ifdef FASTRNN_WITH_CUDA
    ln_rows_cuda(dtype_of(like), p, stream_of(like));
#endif
  } else {
    ln_rows_cpu(dtype_of(like), p);
  }
}

// The pointers both directions share: the gains and the folded biases.
template <class P>
void set_common(P& p, const Problem& pr, const Ext& e, const Tensor& bias, const Tensor& b_hn) {
  p.H = pr.H;
  p.GH = pr.G * pr.H;
  p.gain_x = ptr(e.ln_ih_w);
  p.gain_h = ptr(e.ln_hh_w);
  p.gain_c = ptr(e.ln_c_w);
  p.shift_c = ptr(e.ln_c_b);
  p.bias = bias.data_ptr();
  p.b_hn = pr.gru ? b_hn.data_ptr() : nullptr;
}

bool reduced(const Tensor& x) { return at::isReducedFloatingType(x.scalar_type()); }

}  // namespace

std::vector<Tensor> layer_ext_fwd(const std::string& mode, const Tensor& x_in, const OptTensor& batch_sizes,
                                  const Tensor& h0_in, const OptTensor& c0, const Tensor& w_ih_in,
                                  const Tensor& w_hh_in, const OptTensor& b_ih, const OptTensor& b_hh,
                                  const OptTensor& w_hr_in, bool reverse, const std::vector<OptTensor>& ext,
                                  bool save) {
  const Problem pr =
      check_inputs(parse_mode(mode), x_in, batch_sizes, h0_in, c0, w_ih_in, w_hh_in, b_ih, b_hh, w_hr_in, true);
  const Ext e_in = Ext::of(ext);
  check_ext(pr, x_in, e_in);
  const c10::DeviceGuard guard(x_in.device());
  const NoAutocast no_autocast;
  if (reduced(x_in)) {
    auto out = layer_ext_fwd(mode, x_in.to(at::kFloat), batch_sizes, h0_in.to(at::kFloat), as_float(c0),
                             w_ih_in.to(at::kFloat), w_hh_in.to(at::kFloat), as_float(b_ih), as_float(b_hh),
                             as_float(w_hr_in), reverse, e_in.map(to_float).list(), save);
    for (int i = 0; i < 3; ++i) out[i] = out[i].to(x_in.scalar_type());
    return out;
  }
  const Ext e = e_in.map(contiguous);
  const Tensor x = x_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor w_hr = contig(w_hr_in);
  const auto opts = x.options();
  const int64_t H = pr.H, GH = pr.G * H, Hout = pr.Hout, N = pr.N, B = pr.B;
  const bool ln = e.ln();

  Tensor xs = gemm(x, w_ih.t());
  Tensor stats = ln ? ws_empty({N, kStats}, opts) : empty0(x);
  if (ln) ln_rows(x, LnRowsParams{N, GH, xs.data_ptr(), stats.data_ptr()});
  const auto [bias, b_hn] = fold_bias(pr, e, b_ih, b_hh, opts);

  Tensor h = h0_in.clone(at::MemoryFormat::Contiguous);
  Tensor c = pr.lstm ? c0->clone(at::MemoryFormat::Contiguous) : empty0(x);
  Tensor hm = e.mask ? h * *e.mask : Tensor();
  Tensor y = ws_empty({N, Hout}, opts);
  Tensor hs = ws_empty({save ? N : B, GH}, opts);
  Tensor cn = pr.lstm ? ws_empty({B, H}, opts) : Tensor();
  Tensor c_save = save && pr.lstm ? ws_empty({N, H}, opts) : empty0(x);
  Tensor hr = pr.proj ? ws_empty({B, H}, opts) : Tensor();
  Tensor projected = pr.proj && e.zh ? ws_empty({B, Hout}, opts) : Tensor();

  ExtParams base{};  // at row 0 of the [N, .] tensors: ext_fwd_step moves it to a step's rows
  set_common(base, pr, e, bias, b_hn);
  base.xs = xs.data_ptr();
  base.hs = hs.data_ptr();
  base.stats = ln ? stats.data_ptr() : nullptr;
  if (pr.proj) {
    // the cell's h is o*tanh(.), the projection GEMM's input; zoneout and the mask follow the projection
    base.h = hr.data_ptr();
    base.h_stride = base.y_stride = H;
  } else {
    base.h = h.data_ptr();
    base.y = y.data_ptr();
    base.h_stride = base.y_stride = Hout;
    base.zh = ptr(e.zh);
    base.rec_mask = ptr(e.mask);
    base.hm = e.mask ? hm.data_ptr() : nullptr;
  }
  if (pr.lstm) {
    base.c = c.data_ptr();
    base.c_save = save ? c_save.data_ptr() : base.c;
    base.zc = ptr(e.zc);
    base.cn = cn.data_ptr();
  }
  const int64_t esize = x.element_size();
  auto params = [&](int64_t t) {
    ExtParams p = ext_fwd_step(base, pr.size[t], pr.off[t], save, esize);
    if (pr.proj) p.y = p.h;
    return p;
  };
  const Tensor& operand = e.mask ? hm : h;  // the recurrent GEMM's A: h_{t-1}, masked

  const persist::Plan plan = persist::plan_for(pr, x, /*cells=*/true);
  if (plan.scheme != persist::kNone) {
    persist::ext_fwd(pr, plan, x, base, save, w_hh, operand, reverse);
  } else if (!pr.proj && StepGemm::takes(x)) {
    // the team: phase 0 each thread's columns of the step's GEMM, phase 1 each thread's rows of the row kernel
    const StepGemm gemm(w_hh.t());
    const int nt = gemm.threads();
    gemm.steps(pr.T, 2, [&](int tid, int64_t k, int phase) {
      const int64_t t = reverse ? pr.T - 1 - k : k, b = pr.size[t];
      const ExtParams p = params(t);
      if (phase == 0) {
        gemm.run(tid, b, operand.data_ptr<float>(), Hout, static_cast<float*>(p.hs), GH, false, k % 2 == 1);
      } else {
        ext_cpu_tasks(pr.mode, Dtype::F32, p, b * tid / nt, b * (tid + 1) / nt);
      }
    });
  } else {
    const Tensor w_hh_t = w_hh.t();
    for (int64_t k = 0; k < pr.T; ++k) {
      const int64_t t = reverse ? pr.T - 1 - k : k, b = pr.size[t], o = pr.off[t];
      const ExtParams p = params(t);
      Tensor hs_b = hs.narrow(0, save ? o : 0, b);
      at::mm_out(hs_b, operand.narrow(0, 0, b), w_hh_t);
      run_ext(pr, x, p);
      if (!pr.proj) continue;
      Tensor h_b = h.narrow(0, 0, b);
      const Tensor hr_b = hr.narrow(0, 0, b);
      if (e.zh) {
        Tensor proj_b = projected.narrow(0, 0, b);
        at::mm_out(proj_b, hr_b, w_hr.t());
        at::lerp_out(h_b, proj_b, h_b, e.zh->narrow(0, o, b));
      } else {
        at::mm_out(h_b, hr_b, w_hr.t());
      }
      y.narrow(0, o, b).copy_(h_b);
      if (e.mask) {
        Tensor hm_b = hm.narrow(0, 0, b);
        at::mul_out(hm_b, h_b, e.mask->narrow(0, 0, b));
      }
    }
  }
  if (!save) return {y, h, c, empty0(x), empty0(x), empty0(x), empty0(x)};
  return {y, h, c, xs, hs, stats, c_save};
}

// Backward of layer_ext_fwd: dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr and the LayerNorm parameters'
// gradients in CellExt order (ln_ih_weight .. ln_c_bias); an absent input gets a [0] gradient, x too unless
// need_dx.
std::vector<Tensor> layer_ext_bwd(const std::string& mode, const Tensor& x_in, const OptTensor& batch_sizes,
                                  const Tensor& h0_in, const OptTensor& c0_in, const Tensor& w_ih_in,
                                  const Tensor& w_hh_in, const OptTensor& b_ih, const OptTensor& b_hh,
                                  const OptTensor& w_hr_in, bool reverse, const std::vector<OptTensor>& ext,
                                  const Tensor& y_in, const Tensor& xs_in, const Tensor& hs_in,
                                  const Tensor& stats_in, const Tensor& c_save_in, const Tensor& dy_in,
                                  const Tensor& dh_n, const OptTensor& dc_n, bool need_dx) {
  const Problem pr =
      check_inputs(parse_mode(mode), x_in, batch_sizes, h0_in, c0_in, w_ih_in, w_hh_in, b_ih, b_hh, w_hr_in, false);
  const Ext e_in = Ext::of(ext);
  const c10::DeviceGuard guard(x_in.device());
  const NoAutocast no_autocast;
  const int64_t H = pr.H, GH = pr.G * H, Hout = pr.Hout, N = pr.N, B = pr.B;
  const bool ln = e_in.ln();
  check_grad_outputs(pr, x_in, y_in, dy_in, dh_n, dc_n);
  const Tensor ws = at::empty({0}, x_in.options().dtype(reduced(x_in) ? at::kFloat : x_in.scalar_type()));
  const char* ws_name = "the workspace dtype of x";
  check_like(xs_in, "saved xs", ws, {N, GH}, ws_name);
  check_like(hs_in, "saved hs", ws, {N, GH}, ws_name);
  if (ln) check_like(stats_in, "saved stats", ws, {N, kStats}, ws_name);
  if (pr.lstm) check_like(c_save_in, "saved c", ws, {N, H}, ws_name);
  if (reduced(x_in)) {
    auto grads = layer_ext_bwd(mode, x_in.to(at::kFloat), batch_sizes, h0_in.to(at::kFloat), as_float(c0_in),
                               w_ih_in.to(at::kFloat), w_hh_in.to(at::kFloat), as_float(b_ih), as_float(b_hh),
                               as_float(w_hr_in), reverse, e_in.map(to_float).list(), y_in.to(at::kFloat), xs_in,
                               hs_in, stats_in, c_save_in, dy_in.to(at::kFloat), dh_n.to(at::kFloat),
                               as_float(dc_n), need_dx);
    for (Tensor& g : grads) g = g.to(x_in.scalar_type());
    return grads;
  }
  const Ext e = e_in.map(contiguous);
  const Tensor x = x_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor h0 = h0_in.contiguous(), c0 = contig(c0_in), w_hr = contig(w_hr_in);
  const Tensor y = y_in.contiguous(), xs = xs_in.contiguous(), hs = hs_in.contiguous(), dy = dy_in.contiguous();
  const Tensor stats = stats_in.contiguous(), c_save = c_save_in.contiguous();
  const auto opts = x.options();

  // the persistent engine runs every step in one launch: one chunk of all rows
  const persist::Plan plan = persist::plan_for(pr, x, /*cells=*/true);
  const bool persistent = plan.scheme != persist::kNone;
  const Chunks chunks = backward_chunks(pr, persistent);
  const int64_t rmax = chunks.rmax;
  Tensor dhs = dh_n.clone(at::MemoryFormat::Contiguous);
  Tensor dcs = pr.lstm ? dc_n->clone(at::MemoryFormat::Contiguous) : empty0(x);
  Tensor dgx = ws_empty({rmax, GH}, opts);
  Tensor dgh = ln || pr.gru ? ws_empty({rmax, GH}, opts) : dgx;
  // dW_hh's operand is h_{t-1} * rec_mask: gathered per chunk where it is not y shifted by a step
  Tensor hprev = pr.packed || e.mask ? ws_empty({rmax, Hout}, opts) : Tensor();
  Tensor dmasked = e.mask ? ws_empty({B, Hout}, opts) : Tensor();
  const ProjGrad proj(pr, rmax, opts);
  // With LayerNorm the biases' gradients are the shifts' (both are added after the normalisation), so the
  // chunks sum neither.
  GradSums sums = grad_sums(pr, x, w_ih, w_hh, b_ih.has_value() && !ln, b_hh.has_value() && !ln, need_dx, rmax);
  Tensor dw_hr = pr.proj ? at::zeros_like(w_hr) : empty0(x);
  // the team (fp32 CPU, no projection): per step phase 0 the row kernel, each thread a LayerNorm slot, phase 1
  // each thread's columns of dh_{t-1}
  const std::unique_ptr<StepGemm> team =
      !persistent && !pr.proj && StepGemm::takes(x) ? std::make_unique<StepGemm>(w_hh) : nullptr;
  const int64_t slots = !ln                    ? B
                        : persistent           ? plan.tiles * plan.slices
                        : x.is_cuda()          ? std::min(B, kCudaLnSlots)
                        : team                 ? team->threads()
                                               : at::get_num_threads();
  Tensor part = ln ? at::zeros({slots, part_width(GH, H)}, opts) : Tensor();
  const auto [bias, b_hn] = fold_bias(pr, e, b_ih, b_hh, opts);
  // LSTM's cell reads c_{t-1}, GRU's h_{t-1}: the previous step's saved rows or the initial state
  const Tensor& prev_src = pr.lstm ? c_save : y;
  const Tensor& init = pr.lstm ? c0 : h0;
  // the direct part of dh_{t-1} (zoneout, GRU's z*h), which the recurrent GEMM's term adds to
  const bool bypass = e.zh || pr.gru;

  ExtGradParams base{};  // at row 0 of the [N, .] tensors: ext_bwd_step moves it to a step's rows
  set_common(base, pr, e, bias, b_hn);
  base.xs = xs.data_ptr();
  base.hs = hs.data_ptr();
  base.stats = ln ? stats.data_ptr() : nullptr;
  if (pr.lstm || pr.gru) {
    base.init = init.data_ptr();
    base.prev = prev_src.data_ptr();
  }
  if (!pr.proj) {
    base.dh = dhs.data_ptr();
    base.dh_stride = base.dy_stride = Hout;
    base.dy = dy.data_ptr();
    base.zh = ptr(e.zh);
    base.dh_prev = bypass ? dhs.data_ptr() : nullptr;
  }
  if (pr.lstm) {
    base.dc = dcs.data_ptr();
    base.zc = ptr(e.zc);
  }
  base.dgx = dgx.data_ptr();
  base.dgh = dgh.data_ptr();
  base.part = ln ? part.data_ptr() : nullptr;
  base.slots = slots;
  const int64_t esize = x.element_size();
  // the row kernel's pointers for step t (with a projection this runs the projection's backward first)
  auto grad_params = [&](int64_t t, int64_t local) {
    const int64_t b = pr.size[t], o = pr.off[t];
    const PrevStep prev = prev_step(pr, t, reverse);
    ExtGradParams p = ext_bwd_step(base, b, o, local, prev.rows, prev.rows > 0 ? pr.off[prev.t] : 0, esize);
    if (pr.proj) {
      Tensor dh_b = dhs.narrow(0, 0, b);
      Tensor dt = proj.total(local, dh_b, dy.narrow(0, o, b));
      if (e.zh) {
        at::mul_out(dh_b, dt, e.zh->narrow(0, o, b));
        dt.sub_(dh_b);  // (1 - z) * dt: the projection's share
      }
      proj.to_cell(p, dt, w_hr);
      p.hr = row_ptr(proj.hr, local, H);
    }
    return p;
  };
  // dW_hh's operand where it is not y shifted by a step
  auto gather = [&](int64_t t, int64_t local) {
    if (!hprev.defined()) return;
    const int64_t b = pr.size[t];
    Tensor hp = hprev.narrow(0, local, b);
    gather_hprev(pr, prev_step(pr, t, reverse), y, h0, hp);
    if (e.mask) hp.mul_(e.mask->narrow(0, 0, b));
  };
  auto flush = [&](int64_t lo, int64_t R) {
    flush_chunk(pr, reverse, lo, R, dgx.narrow(0, 0, R), dgh.narrow(0, 0, R), x, y, h0, hprev, w_ih, sums);
    if (pr.proj) gemm(dw_hr, proj.dtot.narrow(0, 0, R).t(), proj.hr.narrow(0, 0, R), true);
  };

  if (persistent) {
    persist::ext_bwd(pr, plan, x, base, bypass, e.mask, w_hh, reverse);
    for (int64_t t = 0; t < pr.T; ++t) gather(t, pr.off[t]);
    flush(0, N);
  } else if (team) {
    const int nt = team->threads();
    for_each_chunk(pr, chunks, reverse, [&](int64_t ta, int64_t tb) {
      const int64_t lo = pr.off[ta];
      team->steps(tb - ta, 2, [&](int tid, int64_t s, int phase) {
        const int64_t t = reverse ? ta + s : tb - 1 - s, b = pr.size[t], local = pr.off[t] - lo;
        if (phase == 0) {
          const ExtGradParams p = grad_params(t, local);
          const int64_t tasks = std::min(b, p.slots);
          ext_cpu_tasks(pr.mode, Dtype::F32, p, tasks * tid / nt, tasks * (tid + 1) / nt);
          return;
        }
        float* dh = dhs.data_ptr<float>();
        const float* dg = dgh.data_ptr<float>() + local * GH;
        // odd steps walk the blocks last to first, as the forward does (engine_fwd): LayerNorm LSTM forward +
        // backward (100,1,128,512) 1.08x, (100,8,512,512) 1.04x on the Xeon, level at B = 64 (in-process)
        const bool backwards = t % 2 == 1;
        if (!e.mask) return team->run(tid, b, dg, GH, dh, Hout, bypass, backwards);
        float* dm = dmasked.data_ptr<float>();
        team->run(tid, b, dg, GH, dm, Hout, false, backwards);
        const float* mask = e.mask->data_ptr<float>();
        const auto [j0, j1] = team->cols(tid);
        for (int64_t r = 0; r < b; ++r) {
          for (int64_t i = r * Hout + j0; i < r * Hout + j1; ++i) dh[i] = (bypass ? dh[i] : 0.f) + dm[i] * mask[i];
        }
      });
      for (int64_t t = ta; t < tb; ++t) gather(t, pr.off[t] - lo);
      flush(lo, pr.off[tb] - lo);
    });
  } else {
    backward_steps(
        pr, chunks, reverse,
        [&](int64_t t, int64_t local) {
          const int64_t b = pr.size[t];
          run_ext(pr, x, grad_params(t, local));
          gather(t, local);
          Tensor dh_b = dhs.narrow(0, 0, b);
          const Tensor dgh_b = dgh.narrow(0, local, b);
          if (e.mask) {
            Tensor dm = dmasked.narrow(0, 0, b);
            at::mm_out(dm, dgh_b, w_hh);
            if (bypass) {
              dh_b.addcmul_(dm, e.mask->narrow(0, 0, b));
            } else {
              at::mul_out(dh_b, dm, e.mask->narrow(0, 0, b));
            }
          } else if (bypass) {
            dh_b.addmm_(dgh_b, w_hh);
          } else {
            at::mm_out(dh_b, dgh_b, w_hh);
          }
        },
        flush);
  }

  std::vector<Tensor> ln_grads;
  for (int i = 0; i < 6; ++i) ln_grads.push_back(empty0(x));  // distinct tensors: op outputs may not alias
  Tensor db_ih, db_hh;
  if (ln) {
    const Tensor total = part.sum(0);
    const int64_t n_ln = pr.lstm ? 6 : 4;
    for (int64_t i = 0; i < n_ln; ++i) {
      ln_grads[i] = total.narrow(0, i < 4 ? i * GH : 4 * GH + (i - 4) * H, i < 4 ? GH : H).clone();
    }
    // the biases are added beside the shifts (ln_grads[1], [3])
    db_ih = b_ih ? ln_grads[1].clone() : empty0(x);
    db_hh = b_hh ? ln_grads[3].clone() : empty0(x);
  } else {
    std::tie(db_ih, db_hh) = bias_grads(sums, b_ih.has_value(), b_hh.has_value(), pr.gru, x);
  }
  std::vector<Tensor> out = {sums.dx, dhs, dcs, sums.dw_ih, sums.dw_hh, db_ih, db_hh, dw_hr};
  out.insert(out.end(), ln_grads.begin(), ln_grads.end());
  return out;
}

}  // namespace fastrnn
