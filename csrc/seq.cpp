// The sequence driver's pieces shared by rnn.cpp (every device), rnn_ext.cpp (fastrnn's own cells) and
// engine_cpu.cpp (the CPU engine).
#include "seq.h"

#include <ATen/Config.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>

// oneDNN's matmul, declared in ATen/native/mkldnn/Matmul.h, which the wheels do not ship. Weak: a libtorch
// without it leaves the address null and the big GEMMs stay on at::mm.
namespace at::native {
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta,
                             float alpha) __attribute__((weak));
}

namespace fastrnn {
namespace {

// Rows of dgates the backward keeps before flushing them into dx/dW with big GEMMs: bounds the backward's
// workspace to O(chunk) instead of O(N) while each GEMM still has a thousand rows. The same on both ISA levels
// (Zen 4, two threads, forward + backward, chunks of 512 / 1024 / 2048 / 4096 rows, medians of 7, ms): AVX-512
// LSTM (T,B,I,H) = (100,64,512,512) 395 / 393 / 393 / 395, GRU (100,64,256,256) 82 / 81 / 82 / 82; capped to
// AVX2 437 / 435 / 438 / 463 and 88 / 89 / 90 / 94, LSTM (512,16,128,128) 43 / 44 / 44 / 46.
constexpr int64_t kChunkRows = 1024;
int64_t g_chunk_rows = kChunkRows;
bool g_nan_fill = false;

void check_absent(const OptTensor& t, const char* name, const char* why) {
  TORCH_CHECK(!t.has_value(), "fastrnn: ", name, " must be None ", why);
}

void check_dtype_device(const at::Tensor& x) {
  TORCH_CHECK(x.is_floating_point(), "fastrnn: x must be a floating-point tensor, got ", x.scalar_type());
  if (x.is_cuda()) {
#ifndef FASTRNN_WITH_CUDA
    TORCH_CHECK(false, "fastrnn: x is on ", x.device(), " but fastrnn._C was built without CUDA");
#endif
    dtype_of(x);
  } else {
    TORCH_CHECK(x.is_cpu(), "fastrnn: x must be on a CPU or CUDA device, got ", x.device());
    dtype_of(x);
    isa_level();  // throws for an unknown FASTRNN_CPU_ISA, before any CPU kernel runs
  }
}

}  // namespace

Mode parse_mode(const std::string& s) {
  if (s == "LSTM") return Mode::LSTM;
  if (s == "GRU") return Mode::GRU;
  if (s == "RNN_TANH") return Mode::RNN_TANH;
  if (s == "RNN_RELU") return Mode::RNN_RELU;
  TORCH_CHECK(false, "fastrnn: mode must be one of LSTM, GRU, RNN_TANH, RNN_RELU, got '", s, "'");
}

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::LSTM: return "LSTM";
    case Mode::GRU: return "GRU";
    case Mode::RNN_TANH: return "RNN_TANH";
    case Mode::RNN_RELU: return "RNN_RELU";
  }
  return "?";
}

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::F32;
    case at::kDouble: return Dtype::F64;
    case at::kHalf: return Dtype::F16;
    case at::kBFloat16: return Dtype::BF16;
    default: TORCH_CHECK(false, "fastrnn: unsupported dtype ", t.scalar_type());
  }
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& x, std::vector<int64_t> shape,
                const char* like) {
  TORCH_CHECK(t.device() == x.device(), "fastrnn: ", name, " must be on ", x.device(), " like ", like, ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastrnn: ", name, " must have dtype ", x.scalar_type(),
              " like ", like, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "fastrnn: ", name, " must have shape ", shape_str(shape),
              ", got ", shape_str(t.sizes()));
}

Problem check_inputs(Mode m, const at::Tensor& x, const OptTensor& batch_sizes, const at::Tensor& h0,
                     const OptTensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                     const OptTensor& b_hh, const OptTensor& w_hr, bool validate) {
  Problem p;
  p.mode = m;
  p.lstm = m == Mode::LSTM;
  p.gru = m == Mode::GRU;
  p.proj = w_hr.has_value();
  p.packed = batch_sizes.has_value();
  p.G = gates_of(m);
  TORCH_CHECK(x.dim() == 2, "fastrnn: x must be 2-D [N, I], got shape ", shape_str(x.sizes()));
  check_dtype_device(x);
  TORCH_CHECK(h0.dim() == 2, "fastrnn: h0 must be 2-D [B, Hout], got shape ", shape_str(h0.sizes()));
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) > 0 && w_hh.size(0) % p.G == 0, "fastrnn: w_hh must be 2-D [",
              p.G, "*H, Hout] for mode ", static_cast<int>(m), ", got shape ", shape_str(w_hh.sizes()));
  p.N = x.size(0);
  p.I = x.size(1);
  p.B = h0.size(0);
  p.H = w_hh.size(0) / p.G;
  p.Hout = p.H;
  const int64_t GH = p.G * p.H;
  if (p.proj) {
    TORCH_CHECK(p.lstm, "fastrnn: w_hr (proj_size) is only supported for LSTM");
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == p.H, "fastrnn: w_hr must have shape [Hout, H] with H = ",
                p.H, ", got ", shape_str(w_hr->sizes()));
    p.Hout = w_hr->size(0);
  }
  if (validate) {
    if (p.proj) check_like(*w_hr, "w_hr", x, {p.Hout, p.H});
    check_like(w_hh, "w_hh", x, {GH, p.Hout});
    check_like(w_ih, "w_ih", x, {GH, p.I});
    check_like(h0, "h0", x, {p.B, p.Hout});
    if (p.lstm) {
      TORCH_CHECK(c0.has_value(), "fastrnn: c0 is required for LSTM");
      check_like(*c0, "c0", x, {p.B, p.H});
    } else {
      check_absent(c0, "c0", "for GRU/RNN");
    }
    if (b_ih) check_like(*b_ih, "b_ih", x, {GH});
    if (b_hh) check_like(*b_hh, "b_hh", x, {GH});
  }

  if (p.packed) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.is_cpu(),
                "fastrnn: batch_sizes must be a 1-D int64 CPU tensor, got ", bs.scalar_type(), " on ", bs.device(),
                " with shape ", shape_str(bs.sizes()));
    const at::Tensor bsc = bs.contiguous();
    const int64_t* s = bsc.data_ptr<int64_t>();
    p.T = bs.size(0);
    p.size.assign(s, s + p.T);
  } else {
    TORCH_CHECK(p.B > 0 ? p.N % p.B == 0 : p.N == 0, "fastrnn: dense x must have T*B rows with B = h0.shape[0] = ",
                p.B, ", got ", p.N, " rows");
    p.T = p.B > 0 ? p.N / p.B : 0;
    p.size.assign(p.T, p.B);
  }
  p.off.assign(p.T + 1, 0);
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t b = p.size[t];
    TORCH_CHECK(b >= 1 && b <= p.B && (t == 0 || b <= p.size[t - 1]), "fastrnn: batch_sizes must be non-increasing",
                " and within [1, B = ", p.B, "], got batch_sizes[", t, "] = ", b);
    p.off[t + 1] = p.off[t] + b;
  }
  TORCH_CHECK(p.off[p.T] == p.N, "fastrnn: batch_sizes sum to ", p.off[p.T], " but x has ", p.N, " rows");
  return p;
}

void* row_ptr(const at::Tensor& t, int64_t row, int64_t width) {
  return static_cast<char*>(t.data_ptr()) + row * width * static_cast<int64_t>(t.element_size());
}

at::Tensor contig(const OptTensor& t) { return t ? t->contiguous() : at::Tensor(); }

OptTensor as_float(const OptTensor& t) { return t ? OptTensor(t->to(at::kFloat)) : std::nullopt; }

void set_nan_fill(bool on) { g_nan_fill = on; }

void set_chunk_rows(int64_t rows) { g_chunk_rows = rows > 0 ? rows : kChunkRows; }

namespace {
// set when oneDNN refuses an fp32 matmul (a torch whose mkldnn_matmul takes 16-bit only): at::mm from then on
std::atomic<bool> g_dnn_refused{false};

bool dnn_on() {
#if AT_MKLDNN_ENABLED()
  return &at::native::mkldnn_matmul != nullptr && !g_dnn_refused.load(std::memory_order_relaxed) &&
         at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

// A product this small goes to at::mm: oneDNN's matmul pays ~18 us a call for its primitive (creation or cache
// lookup, memory descriptors) that the product never earns back. Zen 4, two threads, a product [M, K] . [K, N],
// us, at::mm against oneDNN's: M = 1, (K, N) = (65, 512) 3.8 / 22, (512, 512) 22.6 / 30.9, (512, 2048) 90 / 56;
// M = 16, (65, 512) 15 / 36, (512, 512) 89 / 92; M = 64, (65, 512) 36 / 41, (512, 512) 203 / 187. In a layer:
// one step of one row (T = B = 1) at (I, H) = (64, 64) 12-14 against 27-34 us for every cell, (65, 512) RNN 39
// against 61, LSTM 117 against 135; fwd+bwd at (T,B,I,H) = (4,2,128,128) 0.56-0.78 against 0.71-0.94 ms.
// oneDNN keeps the products with an operand over 1 MiB, which at::mm (MKL's generic kernels on AMD) streams on
// one thread. Capped to AVX2 the rule changes nothing measurable: oneDNN's AVX2 matmul showed no such cost
// (the same one-step and fwd+bwd cases level with and without it).
constexpr int64_t kSmallMacs = int64_t{1} << 22;
constexpr int64_t kSmallOperand = int64_t{1} << 18;  // elements
// On an Intel CPU, where at::mm runs MKL's kernels for that CPU, a product with fewer rows than this on either side
// of its inner dimension (M or K: a call of a step or a few, the forward's x . W_ih^T and the backward's dx and dW
// chunks) goes to at::mm at any size: oneDNN's matmul took 1.5-6x as long. Xeon (Emerald Rapids), two threads,
// us, at::mm against oneDNN's for R rows: [R, 1536] . [1536, 512] R = 1 / 4 / 8 / 12: 15 / 52 / 59 / 74 against
// 94 / 106 / 120 / 131; [1536, R] . [R, 512] 32 / 44 / 52 / 54 against 80 / 77 / 82 / 82; [R, 512] . [512, 1536]
// 22 / 38 / 48 / 72 against 32 / 86 / 99 / 107; at R = 16 the last turned (188 against 125). A GRU of (65, 512, 2)
// layers at one step of one row, forward + backward: 1.92 ms against torch.nn's 1.39, 1.22 with at::mm.
constexpr int64_t kIntelMmRows = 16;
// And there at::mm keeps the products with operands of at most 1 MiB to 32M multiply-adds (a step's x . W_ih^T of
// a mid-size batch): [R, 256] . [256, 768 | 1024], R = 16 / 32 / 48 / 64: 37 / 54 / 72 / 87 | 53 / 75 / 96 / 113 us
// against oneDNN's 51 / 72 / 87 / 112 | 67 / 91 / 110 / 137; R = 128: 160 against 178; R = 256 (64M) 351 against
// 317. With W_ih over 1 MiB oneDNN led at every R ([16, 512] . [512, 1536]: 255 against 168).
constexpr int64_t kIntelSmallMacs = int64_t{1} << 25;

bool dnn_takes(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  if (!dnn_on()) return false;
  for (const at::Tensor* t : {&c, &a, &b}) {
    if (!t->is_cpu() || t->scalar_type() != at::kFloat || t->numel() == 0) return false;
  }
  const bool intel = intel_rules_on();
  const bool small = a.size(0) * a.size(1) * b.size(1) <= (intel ? kIntelSmallMacs : kSmallMacs) &&
                     a.numel() <= kSmallOperand && b.numel() <= kSmallOperand && c.numel() <= kSmallOperand;
  return !small && !(intel && std::min(a.size(0), a.size(1)) < kIntelMmRows);
}
}  // namespace

std::string big_gemm_engine(at::ScalarType t) {
  if (t != at::kFloat || !dnn_on()) return "at::mm";
  return intel_rules_on() ? "oneDNN matmul (at::mm to 32M multiply-adds with operands to 1 MiB, or under 16 rows: the "
                            "Intel CPU rules)"
                          : "oneDNN matmul (at::mm to 4M multiply-adds with operands to 1 MiB)";
}

void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool add) {
  if (dnn_takes(c, a, b)) {
    try {
      at::native::mkldnn_matmul(a, b, c, add ? 1.0f : 0.0f, 1.0f);
      return;
    } catch (const c10::Error&) {
      g_dnn_refused = true;  // its checks run before it writes c, so c is as it was
    }
  }
  at::Tensor out = c;
  if (add) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  gemm(c, a, b, false);
  return c;
}

at::Tensor ws_empty(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  if (g_nan_fill) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

at::Tensor ws_scratch(ScratchSlot slot, at::IntArrayRef shape, const at::TensorOptions& opts) {
  struct Kept {
    at::Tensor slot[kWsSlots];  // bytes
    int64_t bytes = 0;
  };
  thread_local Kept kept;
  const int64_t need = c10::multiply_integers(shape) * static_cast<int64_t>(opts.dtype().itemsize());
  at::Tensor& s = kept.slot[slot];
  const int64_t have = s.defined() ? s.numel() : 0;
  if (!opts.device().is_cpu() || (need > have && kept.bytes - have + need > kScratchBytes)) {
    return ws_empty(shape, opts);
  }
  if (need > have) {
    s = at::Tensor();
    kept.bytes -= have;
    s = at::empty({need}, opts.dtype(at::kByte));
    kept.bytes += need;
  }
  at::Tensor t = s.narrow(0, 0, need).view(opts.dtype().toScalarType()).view(shape);
  if (g_nan_fill) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

at::ScalarType ws_dtype(const at::Tensor& x) {
  return x.is_cpu() && at::isReducedFloatingType(x.scalar_type()) ? at::kFloat : x.scalar_type();
}

Chunks backward_chunks(const Problem& pr, bool single) {
  Chunks c;
  for (int64_t t = 0; t < pr.T;) {
    int64_t e = t;
    while (e < pr.T && (single || pr.off[e] - pr.off[t] < g_chunk_rows)) ++e;
    c.list.emplace_back(t, e);
    c.rmax = std::max(c.rmax, pr.off[e] - pr.off[t]);
    t = e;
  }
  return c;
}

void for_each_chunk(const Problem& pr, const Chunks& chunks, bool reverse,
                    const std::function<void(int64_t, int64_t)>& f) {
  const int64_t nc = static_cast<int64_t>(chunks.list.size());
  for (int64_t k = 0; k < nc; ++k) {
    const auto [ta, tb] = chunks.list[reverse ? k : nc - 1 - k];
    f(ta, tb);
  }
}

void backward_steps(const Problem& pr, const Chunks& chunks, bool reverse,
                    const std::function<void(int64_t, int64_t)>& step,
                    const std::function<void(int64_t, int64_t)>& flush) {
  for_each_chunk(pr, chunks, reverse, [&](int64_t ta, int64_t tb) {
    const int64_t lo = pr.off[ta];
    for (int64_t s = 0; s < tb - ta; ++s) {
      const int64_t t = reverse ? ta + s : tb - 1 - s;
      step(t, pr.off[t] - lo);
    }
    flush(lo, pr.off[tb] - lo);
  });
}

PrevStep prev_step(const Problem& pr, int64_t t, bool reverse) {
  const int64_t tp = reverse ? t + 1 : t - 1;
  return {tp, tp >= 0 && tp < pr.T ? std::min(pr.size[t], pr.size[tp]) : 0};
}

void gather_hprev(const Problem& pr, const PrevStep& prev, const at::Tensor& y, const at::Tensor& h0, at::Tensor hp) {
  const int64_t b = hp.size(0);
  if (prev.rows > 0) hp.narrow(0, 0, prev.rows).copy_(y.narrow(0, pr.off[prev.t], prev.rows));
  if (prev.rows < b) hp.narrow(0, prev.rows, b - prev.rows).copy_(h0.narrow(0, prev.rows, b - prev.rows));
}

ProjGrad::ProjGrad(const Problem& pr, int64_t rmax, const at::TensorOptions& opts) {
  if (!pr.proj) return;
  dtot = ws_empty({rmax, pr.Hout}, opts);
  hr = ws_empty({rmax, pr.H}, opts);
  dhr = ws_empty({pr.B, pr.H}, opts);
  zeros = at::zeros({pr.B, pr.H}, opts);
}

at::Tensor ProjGrad::total(int64_t local, const at::Tensor& dh_b, const at::Tensor& dy_b) const {
  at::Tensor dt = dtot.narrow(0, local, dh_b.size(0));
  at::add_out(dt, dh_b, dy_b);
  return dt;
}

void check_grad_outputs(const Problem& pr, const at::Tensor& x, const at::Tensor& y, const at::Tensor& dy,
                        const at::Tensor& dh_n, const OptTensor& dc_n) {
  check_like(y, "y", x, {pr.N, pr.Hout});
  check_like(dy, "dy", x, {pr.N, pr.Hout});
  check_like(dh_n, "dh_n", x, {pr.B, pr.Hout});
  if (pr.lstm) {
    TORCH_CHECK(dc_n.has_value(), "fastrnn: dc_n is required for LSTM");
    check_like(*dc_n, "dc_n", x, {pr.B, pr.H});
  }
}

GradSums grad_sums(const Problem& pr, const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   bool has_b_ih, bool has_b_hh, bool need_dx, int64_t rmax, bool scratch_dw) {
  const auto opts = x.options();
  const int64_t GH = pr.G * pr.H;
  GradSums g;
  g.dx = need_dx ? ws_empty({pr.N, pr.I}, opts) : empty0(x);
  g.dw_ih = scratch_dw ? ws_scratch(kWsDwIh, w_ih.sizes(), w_ih.options()) : ws_empty(w_ih.sizes(), w_ih.options());
  g.dw_hh = scratch_dw ? ws_scratch(kWsDwHh, w_hh.sizes(), w_hh.options()) : ws_empty(w_hh.sizes(), w_hh.options());
  if (has_b_ih || has_b_hh) g.db_x = ws_empty({GH}, opts);
  if (pr.gru && has_b_hh) g.db_h = ws_empty({GH}, opts);
  g.ones = at::ones({rmax}, opts);
  if (pr.N == 0) {
    for (at::Tensor* t : {&g.dw_ih, &g.dw_hh, &g.db_x, &g.db_h}) {
      if (t->defined()) t->zero_();
    }
    g.dw_written = g.db_written = true;
  }
  return g;
}

std::pair<at::Tensor, at::Tensor> bias_grads(const GradSums& g, bool has_b_ih, bool has_b_hh, bool gru,
                                             const at::Tensor& like) {
  at::Tensor db_ih = has_b_ih ? g.db_x : empty0(like);
  at::Tensor db_hh = !has_b_hh ? empty0(like) : gru ? g.db_h : (has_b_ih ? g.db_x.clone() : g.db_x);
  return {db_ih, db_hh};
}

DenseHprev dense_hprev(const Problem& pr, bool reverse, int64_t lo, int64_t R) {
  const bool first = reverse ? lo + R == pr.N : lo == 0;
  const int64_t from_y = R - (first ? pr.B : 0);
  const int64_t y_at = reverse ? 0 : R - from_y;
  return {first ? (reverse ? from_y : 0) : -1, y_at, from_y, lo + y_at + (reverse ? pr.B : -pr.B)};
}

void flush_chunk(const Problem& pr, bool reverse, int64_t lo, int64_t R, const at::Tensor& gx, const at::Tensor& gh,
                 const at::Tensor& x, const at::Tensor& y, const at::Tensor& h0, const at::Tensor& hprev,
                 const at::Tensor& w_ih, GradSums& g, bool products) {
  const at::Tensor ones = g.ones.narrow(0, 0, R);
  const double db_beta = g.db_written ? 1.0 : 0.0;
  if (g.db_x.defined()) g.db_x.addmv_(gx.t(), ones, db_beta);
  if (g.db_h.defined()) g.db_h.addmv_(gh.t(), ones, db_beta);
  g.db_written = true;
  if (!products) return;
  if (g.dx.numel() > 0) {
    gemm(g.dx.narrow(0, lo, R), gx, w_ih, false);
  }
  bool add = g.dw_written;
  g.dw_written = true;
  gemm(g.dw_ih, gx.t(), x.narrow(0, lo, R), add);
  if (hprev.defined()) {
    gemm(g.dw_hh, gh.t(), hprev.narrow(0, 0, R), add);
    return;
  }
  // dense: h_prev of rows [lo, lo+R) is y shifted by one step, except the step whose h_prev is h0
  const int64_t B = pr.B;
  const DenseHprev d = dense_hprev(pr, reverse, lo, R);
  if (d.h0_at >= 0) {
    gemm(g.dw_hh, gh.narrow(0, d.h0_at, B).t(), h0, add);
    add = true;
  }
  if (d.from_y > 0) gemm(g.dw_hh, gh.narrow(0, d.y_at, d.from_y).t(), y.narrow(0, d.y_row, d.from_y), add);
}

}  // namespace fastrnn
