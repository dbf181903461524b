// The sequence driver's pieces shared by rnn.cpp (every device) and engine_cpu.cpp (the CPU engine).
#include "seq.h"

#include <algorithm>
#include <limits>

namespace fastrnn {
namespace {

// Rows of dgates the backward keeps before flushing them into dx/dW with big GEMMs: bounds the backward's
// workspace to O(chunk) instead of O(N) while each GEMM still has a thousand rows.
constexpr int64_t kChunkRows = 1024;
int64_t g_chunk_rows = kChunkRows;
bool g_nan_fill = false;

}  // namespace

void set_nan_fill(bool on) { g_nan_fill = on; }

void set_chunk_rows(int64_t rows) { g_chunk_rows = rows > 0 ? rows : kChunkRows; }

at::Tensor ws_empty(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
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

GradSums grad_sums(const Problem& pr, const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   bool has_b_ih, bool has_b_hh, bool need_dx, int64_t rmax) {
  const auto opts = x.options();
  const int64_t GH = pr.G * pr.H;
  GradSums g;
  g.dx = need_dx ? ws_empty({pr.N, pr.I}, opts) : empty0(x);
  g.dw_ih = at::zeros_like(w_ih);
  g.dw_hh = at::zeros_like(w_hh);
  if (has_b_ih || has_b_hh) g.db_x = at::zeros({GH}, opts);
  if (pr.gru && has_b_hh) g.db_h = at::zeros({GH}, opts);
  g.ones = at::ones({rmax}, opts);
  return g;
}

std::pair<at::Tensor, at::Tensor> bias_grads(const GradSums& g, bool has_b_ih, bool has_b_hh, bool gru,
                                             const at::Tensor& like) {
  at::Tensor db_ih = has_b_ih ? g.db_x : empty0(like);
  at::Tensor db_hh = !has_b_hh ? empty0(like) : gru ? g.db_h : (has_b_ih ? g.db_x.clone() : g.db_x);
  return {db_ih, db_hh};
}

void flush_chunk(const Problem& pr, bool reverse, int64_t lo, int64_t R, const at::Tensor& gx, const at::Tensor& gh,
                 const at::Tensor& x, const at::Tensor& y, const at::Tensor& h0, const at::Tensor& hprev,
                 const at::Tensor& w_ih, GradSums& g) {
  if (g.dx.numel() > 0) {
    at::Tensor dx_r = g.dx.narrow(0, lo, R);
    at::mm_out(dx_r, gx, w_ih);
  }
  g.dw_ih.addmm_(gx.t(), x.narrow(0, lo, R));
  const at::Tensor ones = g.ones.narrow(0, 0, R);
  if (g.db_x.defined()) g.db_x.addmv_(gx.t(), ones);
  if (g.db_h.defined()) g.db_h.addmv_(gh.t(), ones);
  if (pr.packed) {
    g.dw_hh.addmm_(gh.t(), hprev.narrow(0, 0, R));
    return;
  }
  // dense: h_prev of rows [lo, lo+R) is y shifted by one step, except the step whose h_prev is h0
  const int64_t B = pr.B;
  const bool first = reverse ? lo + R == pr.N : lo == 0;
  const int64_t from_y = R - (first ? B : 0);
  const int64_t g_y = reverse ? 0 : R - from_y;
  if (first) g.dw_hh.addmm_(gh.narrow(0, reverse ? from_y : 0, B).t(), h0);
  if (from_y > 0) g.dw_hh.addmm_(gh.narrow(0, g_y, from_y).t(), y.narrow(0, lo + g_y + (reverse ? B : -B), from_y));
}

}  // namespace fastrnn
