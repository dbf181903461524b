// Per-row math of fastrnn's own cells (LayerNorm, zoneout, recurrent dropout: CellExt in
// fastrnn/ops/__init__.py), shared by the CPU and the CUDA kernels like cell.h.
//
// A LayerNorm needs its row's mean and deviation before any element of the row is final, so these ops work on
// whole rows: `fwd<X, T>(x, params, r)` with an executor X that runs the row's loops and sums. The CPU
// (cell_cpu.cpp) walks a row on one thread; CUDA (cell_ln_cuda.cu) spreads it over one block's threads and
// sums through shared memory. X provides:
//   each(n, f)       calls f(j) for every j in [0, n) that this thread owns (CPU: all of them)
//   reduce(n, s, f)  f(j, v) sets the K terms v[k] of element j (and may write at index j); adds every term's
//                    sum over the whole row to s[k], on every thread of the row
//   sum(v)           replaces every v[k] of a K-array by its sum over the row's threads (CPU: nothing to do)
//   sync()      makes this row's writes visible to the row's other threads (CPU: nothing to do)
//   leader()    whether this thread stores the row's scalars
//   Math        cell.h's multiply-add (Fused, or Unfused in the CPU's x86-64 baseline clone)
// A loop over n elements gives element j to the same thread in every loop over n, so an element written in one
// loop and read at the same index in a later one needs no barrier; reads at other indices (the H-wide cell
// loops against the G*H-wide LayerNorm loops) follow a sum() or sync(). The functions handed to each() and
// reduce() are FRNN_LAMBDA: the CPU executor runs them as SIMD loops, which needs their bodies inlined.
//
// Storage and arithmetic in T, fp32 or fp64: the drivers compute 16-bit calls in fp32.
//
// Pre-activations: with LayerNorm, gate column g = k*H + j of a row is
//   xs[g]*gain_x[g] + hs[g]*gain_h[g] + bias[g]
// where xs, hs are the normalised projections x W_ih^T and (h*rec_mask) W_hh^T and bias folds the LayerNorm
// shifts with b_ih and b_hh (GRU's n block: x side only; its recurrent terms are hs*gain_h + b_hn, inside
// r * (...)). Without LayerNorm xs, hs are the raw projections and the gains are absent (nullptr).
#pragma once

#include "cell.h"

// nvcc's device pass takes no attribute on a lambda; on the host (gcc, clang) a lambda's call operator is
// otherwise an out-of-line call per element, which keeps the CPU loops from vectorising.
#if defined(__CUDACC__)
#define FRNN_LAMBDA
#else
#define FRNN_LAMBDA __attribute__((always_inline))
#endif

namespace fastrnn {

constexpr double kLnEps = 1e-5;  // fastrnn.ops.LN_EPS

// Columns of the per-row LayerNorm statistics kept for backward: rstd of xs and of hs, mean and rstd of LSTM's c.
enum : int64_t { kRsX = 0, kRsH = 1, kMuC = 2, kRsC = 3, kStats = 4 };

FRNN_HD float fsqrt(float v) { return sqrtf(v); }
FRNN_HD double fsqrt(double v) { return ::sqrt(v); }

template <typename T>
FRNN_HD void* off(void* p, int64_t i) {
  return static_cast<T*>(p) + i;
}
template <typename T>
FRNN_HD const void* off(const void* p, int64_t i) {
  return static_cast<const T*>(p) + i;
}

template <typename T>
FRNN_HD void add(void* p, int64_t i, acc_t<T> v) {
  st<T>(p, i, ld<T>(p, i) + v);
}

// Zoneout: the previous value kept with weight z.
template <typename A>
FRNN_HD A zone(A z, A prev, A next) {
  return z * prev + (A(1) - z) * next;
}

// Mean and 1/sqrt(var + eps) of v[0, n). Two passes: the deviations' squares, not E[v^2] - E[v]^2, which
// cancels for rows whose mean is large against their spread.
template <class X, typename T>
FRNN_HD void row_stats(const X& x, const void* v, int64_t n, acc_t<T>& mean, acc_t<T>& rstd) {
  using A = acc_t<T>;
  A s[1] = {A(0)};
  x.reduce(n, s, [&](int64_t j, A(&t)[1]) FRNN_LAMBDA { t[0] = ld<T>(v, j); });
  mean = s[0] / A(n);
  A q[1] = {A(0)};
  x.reduce(n, q, [&](int64_t j, A(&t)[1]) FRNN_LAMBDA {
    const A d = ld<T>(v, j) - mean;
    t[0] = d * d;
  });
  rstd = A(1) / fsqrt(q[0] / A(n) + A(kLnEps));
}

// Normalises v[0, n) in place; returns its rstd.
template <class X, typename T>
FRNN_HD acc_t<T> normalize_row(const X& x, void* v, int64_t n) {
  acc_t<T> mean, rstd;
  row_stats<X, T>(x, v, n, mean, rstd);
  x.each(n, [&](int64_t j) FRNN_LAMBDA { st<T>(v, j, (ld<T>(v, j) - mean) * rstd); });
  x.sync();
  return rstd;
}

// ---------------------------------------------------------------------------------------------------
// LayerNorm of the input projection, for all rows of the sequence at once (before the time loop).
struct LnRowsParams {
  int64_t rows;  // rows of x (N)
  int64_t n;     // row width (G*H)
  void* v;       // v: [rows, n] in: x W_ih^T; out: normalised
  void* stats;   // stats: [rows, kStats] written: column kRsX
};

template <class X, typename T>
FRNN_HD void ln_rows_row(const X& x, const LnRowsParams& p, int64_t r) {
  const acc_t<T> rstd = normalize_row<X, T>(x, off<T>(p.v, r * p.n), p.n);
  if (x.leader()) st<T>(p.stats, r * kStats + kRsX, rstd);
}

// ---------------------------------------------------------------------------------------------------
// Forward step, rows [0, rows) active; the driver points every row pointer at the step's first row.
struct ExtParams {
  int64_t rows;          // active rows of this step (b_t)
  int64_t H;             // hidden size
  int64_t GH;            // G*H: the row stride of xs and hs
  const void* xs;        // xs: [rows, GH] x W_ih^T, normalised (LayerNorm) or raw
  void* hs;              // hs: [rows, GH] in: (h*rec_mask) W_hh^T; out: normalised (LayerNorm)
  void* stats;           // stats: [rows, kStats] written: kRsH, and kMuC, kRsC for LSTM (nullptr without LayerNorm)
  const void* gain_x;    // gain_x: [GH] LayerNorm gain of xs (nullptr without LayerNorm)
  const void* gain_h;    // gain_h: [GH] LayerNorm gain of hs (nullptr without LayerNorm)
  const void* gain_c;    // gain_c: [H] LSTM LayerNorm gain of c (nullptr without LayerNorm)
  const void* shift_c;   // shift_c: [H] LSTM LayerNorm shift of c
  const void* bias;      // bias: [GH] the additive terms of each pre-activation (see the top of this file)
  const void* b_hn;      // b_hn: [H] GRU: the recurrent n block's additive terms
  void* h;               // h: [rows, h_stride] in: h_{t-1}; out: h_t (with a projection: hr = o*tanh(.), [rows, H])
  int64_t h_stride;
  void* y;               // y: [rows, y_stride] out: h_t (with a projection: hr again)
  int64_t y_stride;
  const void* zh;        // zh: [rows, h_stride] zoneout of h (nullptr: none, or the driver's after a projection)
  const void* rec_mask;  // rec_mask: [rows, h_stride] recurrent dropout (nullptr: none, or the driver's)
  void* hm;              // hm: [rows, h_stride] out: h_t * rec_mask, the next step's GEMM operand
  void* c;               // c: [rows, H] LSTM state, in: c_{t-1}; out: c_t
  void* c_save;          // c_save: [rows, H] LSTM c_t kept for backward (points at c when nothing is saved)
  const void* zc;        // zc: [rows, H] LSTM zoneout of c (nullptr: none)
  void* cn;              // cn: [rows, H] LSTM scratch: c before zoneout
};

// Backward step, walking time in reverse; same row convention.
struct ExtGradParams {
  int64_t rows;          // active rows of this step (b_t)
  int64_t H;             // hidden size, the row stride of prev, init, zc, dc and hr
  int64_t GH;            // G*H: the row stride of xs, hs, dgx, dgh
  const void* xs;        // xs: [rows, GH] saved forward xs
  const void* hs;        // hs: [rows, GH] saved forward hs (normalised)
  const void* stats;     // stats: [rows, kStats] saved (nullptr without LayerNorm)
  const void* gain_x;    // gain_x, gain_h: [GH]; gain_c, shift_c: [H]; bias: [GH]; b_hn: [H]: as ExtParams
  const void* gain_h;
  const void* gain_c;
  const void* shift_c;
  const void* bias;
  const void* b_hn;
  // prev: the state before this step, LSTM c_{t-1} or GRU h_{t-1}: rows < n_prev from the previous step's
  // saved rows, the others (sequences that start at this step, reverse direction) from the initial state.
  const void* prev;      // prev: [n_prev, H]
  const void* init;      // init: [rows, H] c0 / h0
  int64_t n_prev;
  const void* zh;        // zh: [rows, dh_stride] zoneout of h (nullptr: none, or the driver's with a projection)
  const void* zc;        // zc: [rows, H] LSTM zoneout of c (nullptr: none)
  const void* dh;        // dh: [rows, dh_stride] gradient reaching h_t from the next step
  int64_t dh_stride;
  const void* dy;        // dy: [rows, dy_stride] gradient of the output rows (zeros where already in dh)
  int64_t dy_stride;
  void* dh_prev;         // dh_prev: [rows, dh_stride] out: the part of dh_{t-1} that bypasses W_hh (zoneout, GRU's
                         //   z*h); may alias dh; nullptr: there is none or the driver adds it (projection)
  void* dc;              // dc: [rows, H] LSTM, in: dc_t; out: dc_{t-1}
  void* hr;              // hr: [rows, H] LSTM with projection, out: o*tanh(.), the operand of dW_hr (else nullptr)
  void* dgx;             // dgx: [rows, GH] out: gradient w.r.t. x W_ih^T (before LayerNorm)
  void* dgh;             // dgh: [rows, GH] out: gradient w.r.t. (h*rec_mask) W_hh^T; aliases dgx when they are
                         //   equal (no LayerNorm, not GRU)
  void* part;            // part: [slots, part_width] LayerNorm parameter gradients: row r adds its terms to slot
                         //   r % slots, which one thread (CPU) or block (CUDA) owns for the whole step
  int64_t slots;
};

// Columns of a slot in ExtGradParams::part: gain_x, shift_x, gain_h, shift_h (GH each), gain_c, shift_c (H each).
FRNN_HD int64_t part_width(int64_t GH, int64_t H) { return 4 * GH + 2 * H; }

// Pointer p moved down `rows` rows of `width` elements of `esize` bytes; nullptr stays nullptr.
FRNN_HD void* rows_down(void* p, int64_t rows, int64_t width, int64_t esize) {
  return p ? static_cast<char*>(p) + rows * width * esize : p;
}
FRNN_HD const void* rows_down(const void* p, int64_t rows, int64_t width, int64_t esize) {
  return p ? static_cast<const char*>(p) + rows * width * esize : p;
}

// The params of the forward step whose `rows` rows start at row o of the sequence, from `base` with its per-row
// pointers at row 0 of their [N, .] tensors; the running state and scratch ([B, .]: h, hm, c, cn) stay. hs
// moves only where it is kept per step (`save`, else a [B, G*H] scratch), c_save only where it is not c.
FRNN_HD ExtParams ext_fwd_step(ExtParams p, int64_t rows, int64_t o, bool save, int64_t esize) {
  p.rows = rows;
  p.xs = rows_down(p.xs, o, p.GH, esize);
  if (save) p.hs = rows_down(p.hs, o, p.GH, esize);
  p.stats = rows_down(p.stats, o, kStats, esize);
  p.y = rows_down(p.y, o, p.y_stride, esize);
  p.zh = rows_down(p.zh, o, p.h_stride, esize);
  if (p.c_save != p.c) p.c_save = rows_down(p.c_save, o, p.H, esize);
  p.zc = rows_down(p.zc, o, p.H, esize);
  return p;
}

// The params of the backward step whose `rows` rows start at row o of the sequence (at row `local` of the
// dgx/dgh workspaces), from `base` with its per-row pointers at row 0 and `prev` at row 0 of the saved states
// it reads (LSTM c, GRU y); the running dh, dc and the LayerNorm slots stay. `prev_rows` rows of the previous
// step, from row prev_off, precede this one (the others start from `init`).
FRNN_HD ExtGradParams ext_bwd_step(ExtGradParams p, int64_t rows, int64_t o, int64_t local, int64_t prev_rows,
                                   int64_t prev_off, int64_t esize) {
  p.rows = rows;
  p.xs = rows_down(p.xs, o, p.GH, esize);
  p.hs = rows_down(p.hs, o, p.GH, esize);
  p.stats = rows_down(p.stats, o, kStats, esize);
  p.prev = prev_rows > 0 ? rows_down(p.prev, prev_off, p.H, esize) : p.init;
  p.n_prev = prev_rows;
  p.zh = rows_down(p.zh, o, p.dh_stride, esize);
  p.zc = rows_down(p.zc, o, p.H, esize);
  p.dy = rows_down(p.dy, o, p.dy_stride, esize);
  p.dgx = rows_down(p.dgx, local, p.GH, esize);
  p.dgh = rows_down(p.dgh, local, p.GH, esize);
  return p;
}

// The gate column g of row r: the input side's and the recurrent side's terms before the bias.
template <typename T, class P>
FRNN_HD acc_t<T> xpart(const P& p, int64_t r, int64_t g) {
  const acc_t<T> v = ld<T>(p.xs, r * p.GH + g);
  return p.gain_x ? v * ld<T>(p.gain_x, g) : v;
}
template <typename T, class P>
FRNN_HD acc_t<T> hpart(const P& p, int64_t r, int64_t g) {
  const acc_t<T> v = ld<T>(p.hs, r * p.GH + g);
  return p.gain_h ? v * ld<T>(p.gain_h, g) : v;
}
template <typename T, class P>
FRNN_HD acc_t<T> pre(const P& p, int64_t r, int64_t g) {
  return xpart<T>(p, r, g) + hpart<T>(p, r, g) + ld<T>(p.bias, g);
}

// GRU's n gate and its recurrent term hn (inside r * (...)).
template <typename T>
struct GruN {
  acc_t<T> n, hn;
};
template <typename T, class M, class P>
FRNN_HD GruN<T> gru_n(const P& p, int64_t r, int64_t j, acc_t<T> rg) {
  const int64_t g = 2 * p.H + j;
  const acc_t<T> hn = hpart<T>(p, r, g) + ld<T>(p.b_hn, j);
  return {ftanh<M>(xpart<T>(p, r, g) + ld<T>(p.bias, g) + rg * hn), hn};
}

// h_t from the cell's new value: zoneout, the output row, the next step's masked GEMM operand.
template <typename T>
FRNN_HD void put_h(const ExtParams& p, int64_t r, int64_t j, acc_t<T> next) {
  const int64_t i = r * p.h_stride + j;
  const acc_t<T> h = p.zh ? zone(ld<T>(p.zh, i), ld<T>(p.h, i), next) : next;
  st<T>(p.h, i, h);
  st<T>(p.y, r * p.y_stride + j, h);
  if (p.rec_mask) st<T>(p.hm, i, h * ld<T>(p.rec_mask, i));
}

template <typename T>
FRNN_HD acc_t<T> prev_at(const ExtGradParams& p, int64_t r, int64_t j) {
  return ld<T>(r < p.n_prev ? p.prev : p.init, r * p.H + j);
}

// The gradient reaching unit j's h_t splits into the cell's new value (`cell`) and h_{t-1} (`bypass`, zoneout).
template <typename T>
struct DhSplit {
  acc_t<T> cell, bypass;
};
template <typename T>
FRNN_HD DhSplit<T> split_dh(const ExtGradParams& p, int64_t r, int64_t j) {
  using A = acc_t<T>;
  const A d = ld<T>(p.dh, r * p.dh_stride + j) + ld<T>(p.dy, r * p.dy_stride + j);
  if (!p.zh) return {d, A(0)};
  const A z = ld<T>(p.zh, r * p.dh_stride + j);
  return {(A(1) - z) * d, z * d};
}

// Gradients of gate column g: the input side's and the recurrent side's (the same but for GRU's n block).
template <typename T>
FRNN_HD void put_dgate(const ExtGradParams& p, int64_t r, int64_t g, acc_t<T> dx, acc_t<T> dh) {
  st<T>(p.dgx, r * p.GH + g, dx);
  if (p.dgh != p.dgx) st<T>(p.dgh, r * p.GH + g, dh);
}

struct LstmExt {
  template <class X, typename T>
  static FRNN_HD void fwd(const X& x, const ExtParams& p, int64_t r) {
    using M = typename X::Math;
    using A = acc_t<T>;
    const int64_t H = p.H, rc = r * H;
    x.each(H, [&](int64_t j) FRNN_LAMBDA {
      const A i = sigmoid<M>(pre<T>(p, r, j)), f = sigmoid<M>(pre<T>(p, r, H + j));
      const A g = ftanh<M>(pre<T>(p, r, 2 * H + j));
      const A cp = ld<T>(p.c, rc + j), cn = f * cp + i * g;
      const A c = p.zc ? zone(ld<T>(p.zc, rc + j), cp, cn) : cn;
      st<T>(p.cn, rc + j, cn);
      st<T>(p.c, rc + j, c);
      st<T>(p.c_save, rc + j, c);
    });
    A mean = A(0), rstd = A(1);
    if (p.gain_c) {
      row_stats<X, T>(x, off<T>(p.cn, rc), H, mean, rstd);
      if (x.leader()) {
        st<T>(p.stats, r * kStats + kMuC, mean);
        st<T>(p.stats, r * kStats + kRsC, rstd);
      }
    }
    x.each(H, [&](int64_t j) FRNN_LAMBDA {
      A cl = ld<T>(p.cn, rc + j);
      if (p.gain_c) cl = (cl - mean) * rstd * ld<T>(p.gain_c, j) + ld<T>(p.shift_c, j);
      put_h<T>(p, r, j, sigmoid<M>(pre<T>(p, r, 3 * H + j)) * ftanh<M>(cl));
    });
  }

  // One unit's forward values, recomputed from the saved projections.
  template <typename T>
  struct Unit {
    acc_t<T> i, f, g, o, cp, nc, tcl;  // gates, c_{t-1}, normalised c (c itself without LayerNorm), tanh(LN(c))
  };
  template <typename T, class M>
  static FRNN_HD Unit<T> unit(const ExtGradParams& p, int64_t r, int64_t j, acc_t<T> mean, acc_t<T> rstd) {
    using A = acc_t<T>;
    const int64_t H = p.H;
    Unit<T> u;
    u.i = sigmoid<M>(pre<T>(p, r, j));
    u.f = sigmoid<M>(pre<T>(p, r, H + j));
    u.g = ftanh<M>(pre<T>(p, r, 2 * H + j));
    u.o = sigmoid<M>(pre<T>(p, r, 3 * H + j));
    u.cp = prev_at<T>(p, r, j);
    u.nc = (u.f * u.cp + u.i * u.g - mean) * rstd;
    const A cl = p.gain_c ? u.nc * ld<T>(p.gain_c, j) + ld<T>(p.shift_c, j) : u.nc;
    u.tcl = ftanh<M>(cl);
    return u;
  }

  template <class X, typename T>
  static FRNN_HD void bwd(const X& x, const ExtGradParams& p, int64_t r, void* part) {
    using M = typename X::Math;
    using A = acc_t<T>;
    const int64_t H = p.H, GH = p.GH, rc = r * H;
    const bool ln = p.gain_c != nullptr;
    const A mean = ln ? ld<T>(p.stats, r * kStats + kMuC) : A(0);
    const A rstd = ln ? ld<T>(p.stats, r * kStats + kRsC) : A(1);
    // d(LN(c)) -> dc needs the row means of dnc = d(LN(c)) * gain_c and of dnc * nc first
    A m[2] = {A(0), A(0)};
    if (ln) {
      x.reduce(H, m, [&](int64_t j, A(&t)[2]) FRNN_LAMBDA {
        const Unit<T> u = unit<T, M>(p, r, j, mean, rstd);
        const A dcl = split_dh<T>(p, r, j).cell * u.o * (A(1) - u.tcl * u.tcl);
        const A dnc = dcl * ld<T>(p.gain_c, j);
        t[0] = dnc;
        t[1] = dnc * u.nc;
        add<T>(part, 4 * GH + j, dcl * u.nc);
        add<T>(part, 4 * GH + H + j, dcl);
      });
      m[0] /= A(H);
      m[1] /= A(H);
    }
    x.each(H, [&](int64_t j) FRNN_LAMBDA {
      const Unit<T> u = unit<T, M>(p, r, j, mean, rstd);
      const DhSplit<T> d = split_dh<T>(p, r, j);
      const A dcl = d.cell * u.o * (A(1) - u.tcl * u.tcl);
      const A dcn = ln ? rstd * (dcl * ld<T>(p.gain_c, j) - m[0] - u.nc * m[1]) : dcl;
      const A dct = ld<T>(p.dc, rc + j);
      const A zc = p.zc ? ld<T>(p.zc, rc + j) : A(0);
      const A dc = dcn + (A(1) - zc) * dct;
      st<T>(p.dc, rc + j, dc * u.f + zc * dct);
      const A di = dc * u.g * u.i * (A(1) - u.i), df = dc * u.cp * u.f * (A(1) - u.f);
      const A dg = dc * u.i * (A(1) - u.g * u.g), dout = d.cell * u.tcl * u.o * (A(1) - u.o);
      put_dgate<T>(p, r, j, di, di);
      put_dgate<T>(p, r, H + j, df, df);
      put_dgate<T>(p, r, 2 * H + j, dg, dg);
      put_dgate<T>(p, r, 3 * H + j, dout, dout);
      if (p.dh_prev) st<T>(p.dh_prev, r * p.dh_stride + j, d.bypass);
      if (p.hr) st<T>(p.hr, rc + j, u.o * u.tcl);
    });
  }
};

struct GruExt {
  template <class X, typename T>
  static FRNN_HD void fwd(const X& x, const ExtParams& p, int64_t r) {
    using M = typename X::Math;
    using A = acc_t<T>;
    x.each(p.H, [&](int64_t j) FRNN_LAMBDA {
      const A rg = sigmoid<M>(pre<T>(p, r, j)), z = sigmoid<M>(pre<T>(p, r, p.H + j));
      const A n = gru_n<T, M>(p, r, j, rg).n;
      put_h<T>(p, r, j, (A(1) - z) * n + z * ld<T>(p.h, r * p.h_stride + j));
    });
  }

  template <class X, typename T>
  static FRNN_HD void bwd(const X& x, const ExtGradParams& p, int64_t r, void*) {
    using M = typename X::Math;
    using A = acc_t<T>;
    const int64_t H = p.H;
    x.each(H, [&](int64_t j) FRNN_LAMBDA {
      const A rg = sigmoid<M>(pre<T>(p, r, j)), z = sigmoid<M>(pre<T>(p, r, H + j));
      const GruN<T> g = gru_n<T, M>(p, r, j, rg);
      const A n = g.n, hn = g.hn;
      const DhSplit<T> d = split_dh<T>(p, r, j);
      const A dn = d.cell * (A(1) - z) * (A(1) - n * n);
      const A dr = dn * hn * rg * (A(1) - rg);
      const A dz = d.cell * (prev_at<T>(p, r, j) - n) * z * (A(1) - z);
      put_dgate<T>(p, r, j, dr, dr);
      put_dgate<T>(p, r, H + j, dz, dz);
      put_dgate<T>(p, r, 2 * H + j, dn, dn * rg);
      st<T>(p.dh_prev, r * p.dh_stride + j, d.bypass + d.cell * z);
    });
  }
};

template <bool Relu>
struct RnnExt {
  template <class M, typename A>
  static FRNN_HD A act(A a) {
    return Relu ? (a > A(0) ? a : A(0)) : ftanh<M>(a);
  }

  template <class X, typename T>
  static FRNN_HD void fwd(const X& x, const ExtParams& p, int64_t r) {
    using M = typename X::Math;
    x.each(p.H, [&](int64_t j) FRNN_LAMBDA { put_h<T>(p, r, j, act<M>(pre<T>(p, r, j))); });
  }

  template <class X, typename T>
  static FRNN_HD void bwd(const X& x, const ExtGradParams& p, int64_t r, void*) {
    using M = typename X::Math;
    using A = acc_t<T>;
    x.each(p.H, [&](int64_t j) FRNN_LAMBDA {
      const A a = pre<T>(p, r, j), h = act<M>(a);
      const DhSplit<T> d = split_dh<T>(p, r, j);
      const A da = Relu ? (a > A(0) ? d.cell : A(0)) : d.cell * (A(1) - h * h);
      put_dgate<T>(p, r, j, da, da);
      if (p.dh_prev) st<T>(p.dh_prev, r * p.dh_stride + j, d.bypass);
    });
  }
};

// dgx, dgh hold the gradients of the LayerNorm outputs; turns them into the gradients of the projections
// before LayerNorm and adds the gains' and shifts' terms to the row's slot.
template <class X, typename T>
FRNN_HD void ln_bwd_row(const X& x, const ExtGradParams& p, int64_t r, void* part) {
  using A = acc_t<T>;
  const int64_t GH = p.GH, rg = r * GH;
  x.sync();
  A s[4] = {A(0), A(0), A(0), A(0)};
  x.reduce(GH, s, [&](int64_t g, A(&t)[4]) FRNN_LAMBDA {
    const A dx = ld<T>(p.dgx, rg + g), dh = ld<T>(p.dgh, rg + g);
    const A nx = ld<T>(p.xs, rg + g), nh = ld<T>(p.hs, rg + g);
    const A ux = dx * ld<T>(p.gain_x, g), uh = dh * ld<T>(p.gain_h, g);
    t[0] = ux;
    t[1] = ux * nx;
    t[2] = uh;
    t[3] = uh * nh;
    add<T>(part, g, dx * nx);
    add<T>(part, GH + g, dx);
    add<T>(part, 2 * GH + g, dh * nh);
    add<T>(part, 3 * GH + g, dh);
  });
  const A inv = A(1) / A(GH);
  const A rx = ld<T>(p.stats, r * kStats + kRsX), rh = ld<T>(p.stats, r * kStats + kRsH);
  x.each(GH, [&](int64_t g) FRNN_LAMBDA {
    const A nx = ld<T>(p.xs, rg + g), nh = ld<T>(p.hs, rg + g);
    const A ux = ld<T>(p.dgx, rg + g) * ld<T>(p.gain_x, g), uh = ld<T>(p.dgh, rg + g) * ld<T>(p.gain_h, g);
    st<T>(p.dgx, rg + g, rx * (ux - s[0] * inv - nx * (s[1] * inv)));
    st<T>(p.dgh, rg + g, rh * (uh - s[2] * inv - nh * (s[3] * inv)));
  });
}

// The whole row of one step: Op is LstmExt, GruExt or RnnExt.
template <class Op, class X, typename T>
FRNN_HD void ext_fwd_row(const X& x, const ExtParams& p, int64_t r) {
  if (p.gain_h) {
    const acc_t<T> rstd = normalize_row<X, T>(x, off<T>(p.hs, r * p.GH), p.GH);
    if (x.leader()) st<T>(p.stats, r * kStats + kRsH, rstd);
  }
  Op::template fwd<X, T>(x, p, r);
}

template <class Op, class X, typename T>
FRNN_HD void ext_bwd_row(const X& x, const ExtGradParams& p, int64_t r) {
  void* part = p.gain_x ? off<T>(p.part, (r % p.slots) * part_width(p.GH, p.H)) : nullptr;
  Op::template bwd<X, T>(x, p, r, part);
  if (p.gain_x) ln_bwd_row<X, T>(x, p, r, part);
}

}  // namespace fastrnn
