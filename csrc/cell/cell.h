// Per-element cell math shared by the CPU and the CUDA kernels, so that the CPU tests exercise the exact
// arithmetic the GPU runs.
//
// Every op is a struct with `elem<T, W, M>(params, r, j)`: the element (row r, hidden unit j) of one time step, M
// the multiply-add of its polynomials (`Fused` below); the forward ops also take their inputs from their caller
// (`with`, FwdOp below). It computes in acc_t<W> (fp32 for fp32/fp16/bf16 storage, fp64 for fp64) and has
// two storage types: T for the sequence tensors (h, y, dy, and dgates, the operands of the GEMMs) and W for the
// per-step workspaces (gates, hg, bias, c, the saved values, dh, dc); W = T except in the CPU
// engine's bf16 path, which keeps the workspaces in fp32 and rounds only what it stores for a GEMM or returns.
// Each element reads and writes only column j (and the gate columns k*gw+j) of its own row, so in-place buffers
// (gates overwritten by activated gates, state read and rewritten) are safe and the loop over j has no
// loop-carried dependency: the CPU loop uses `#pragma GCC ivdep` and vectorises.
//
// Gate k of unit j sits at column k*gw + j of its row, LSTM (i,f,g,o), GRU (r,z,n). PyTorch's layout is
// gw = H (the GPU path); the CPU engine points the kernel at one block of units whose gates are stored
// next to each other (gw = the block's width), see csrc/cpu/engine_cpu.cpp. Row strides are in elements.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FRNN_HD __host__ __device__ __forceinline__
#else
#define FRNN_HD inline __attribute__((always_inline))
#endif

namespace fastrnn {

template <typename T>
struct AccType {
  using type = T;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// How the float polynomials below multiply and add: Fused (one rounding, fmaf) wherever the target has fused
// multiply-add units, which is every GPU and every CPU path but one, so the CPU tests check the GPU's bits;
// Unfused only in the CPU kernels' x86-64 baseline clone (pre-AVX2 CPUs), where fmaf would be a libm call per
// element. The polynomials are most of a cell's arithmetic: fused, the LSTM forward cell over a 64 x 256 step
// took 35 us against 45 on AVX-512 and 59 against 73 on AVX2 (Emerald Rapids, one core, g++ 13).
struct Fused {
  static FRNN_HD float mad(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return __builtin_fmaf(a, b, c);
#endif
  }
};
struct Unfused {
  static FRNN_HD float mad(float a, float b, float c) { return a * b + c; }
};

// exp for fp32 as branch-free Cephes-style polynomial: unlike std::exp it auto-vectorises on the CPU, and
// the GPU runs the same code. Relative error ~2 ulp on the clamped range; the clamp keeps 2^n finite, and
// sigmoid/tanh saturate long before it matters.
template <class M = Fused>
FRNN_HD float fexp(float x) {
  // A select, not fminf/fmaxf: those carry NaN rules that keep gcc from vectorising; NaN still propagates.
  // One select of a sign-dependent bound, not a clamp to two constants: gcc threads constant clamped paths
  // through the polynomial, leaving selects of constants between the multiply-adds (blends on AVX2).
  x = fabsf(x) > 87.0f ? copysignf(87.0f, x) : x;
  const float k = x * 1.44269504088896341f;
  // round to nearest with the 1.5*2^23 trick: vectorises without SSE4.1's roundps
  const float n = (k + 12582912.0f) - 12582912.0f;
  float r = M::mad(n, -0.693359375f, x);  // n * 0.693359375 is exact (9-bit constant): fused or not alike
  r = M::mad(n, 2.12194440e-4f, r);
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = M::mad(p, r, 1.3981999507e-3f);
  p = M::mad(p, r, 8.3334519073e-3f);
  p = M::mad(p, r, 4.1665795894e-2f);
  p = M::mad(p, r, 1.6666665459e-1f);
  p = M::mad(p, r, 5.0000001201e-1f);
  p = M::mad(p, z, r) + 1.0f;
  const int bits = (static_cast<int>(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
#endif
  return p * scale;
}

template <class M = Fused>
FRNN_HD double fexp(double x) {
  return ::exp(x);
}

template <class M = Fused, typename A>
FRNN_HD A sigmoid(A x) {
  return A(1) / (A(1) + fexp<M>(-x));
}

// tanh(x) = 1 - 2/(exp(2x)+1) loses all relative precision near 0, so small |x| uses the Cephes odd
// polynomial; both sides are computed and selected to stay branch-free.
template <class M = Fused>
FRNN_HD float ftanh(float x) {
  const float a = fabsf(x);
  const float big = 1.0f - 2.0f / (fexp<M>(2.0f * a) + 1.0f);
  const float s = x * x;
  float p = -5.70498872745e-3f;
  p = M::mad(p, s, 2.06390887954e-2f);
  p = M::mad(p, s, -5.37397155531e-2f);
  p = M::mad(p, s, 1.33314422036e-1f);
  p = M::mad(p, s, -3.33332819422e-1f);
  const float small = M::mad(p * s, x, x);
  return a < 0.625f ? small : copysignf(big, x);
}

template <class M = Fused>
FRNN_HD double ftanh(double x) {
  return ::tanh(x);
}

// ---------------------------------------------------------------------------------------------------
// Forward step. One time step, `rows` active rows; the driver points every pointer at that step's rows.
struct CellParams {
  int64_t rows;        // active rows of this step (b_t)
  int64_t H;           // hidden size, the row stride of c and c_save
  int64_t gw;          // gate spacing: gate k of unit j is column k*gw + j (H in PyTorch's layout)
  int64_t gs;          // row stride of gates: G*H
  int64_t hg_stride;   // row stride of hg
  void* gates;         // gates: [rows, gs] in: x @ w_ih^T; out: activated gates (LSTM, GRU)
  const void* hg;      // hg: [rows, hg_stride] h_prev @ w_hh^T (elem's; `with` takes its inputs from its caller)
  const void* bias;    // bias: [G*gw] b_ih + b_hh, except GRU's n block: b_in only (zeros without bias)
  const void* b_hn;    // b_hn: [H] GRU's b_hh n block, inside r * (W_hn h + b_hn)
  const void* h_prev;  // h_prev: [rows, h_stride] GRU's state before the step (may alias h)
  void* h;             // h: [rows, h_stride] state, written h_new (LSTM: o*tanh(c))
  int64_t h_stride;
  void* y;             // y: [rows, y_stride] output rows, written with h_new
  int64_t y_stride;
  void* c;             // c: [rows, H] LSTM state, read c_prev and written c_new
  void* c_save;        // c_save: [rows, H] LSTM saved c_new (points at c when nothing is saved)
  void* hn_save;       // hn_save: [rows, hn_stride] GRU saved W_hn h + b_hn (hg's n block when not saving)
  int64_t hn_stride;
};

template <typename T>
FRNN_HD acc_t<T> ld(const void* p, int64_t i) {
  return static_cast<acc_t<T>>(static_cast<const T*>(p)[i]);
}
template <typename T>
FRNN_HD void st(void* p, int64_t i, acc_t<T> v) {
  static_cast<T*>(p)[i] = static_cast<T>(v);
}

// Pre-activation of gate k of unit j in row r: input projection + recurrent projection + bias.
template <typename W, class In>
FRNN_HD acc_t<W> pre(const CellParams& p, int64_t k, int64_t j, const In& in) {
  return in.x(k) + in.hg(k) + ld<W>(p.bias, k * p.gw + j);
}

// What a forward element (r, j) reads besides the weights, where the per-step drivers leave it: gate k's input
// projection x(k) in p.gates, its recurrent product hg(k) in p.hg, the state before the step (Op::state: LSTM c,
// GRU h).
template <class Op, typename T, typename W>
struct InMemory {
  const CellParams& p;
  int64_t r, j;
  FRNN_HD acc_t<W> x(int64_t k) const { return ld<W>(p.gates, r * p.gs + k * p.gw + j); }
  FRNN_HD acc_t<W> hg(int64_t k) const { return ld<W>(p.hg, r * p.hg_stride + k * p.gw + j); }
  FRNN_HD acc_t<W> state() const { return Op::template state<T, W>(p, r, j); }
};

// A forward op's two entries: elem(p, r, j) reads its inputs from memory (InMemory); with(p, r, j, in) takes them
// from `in` (the persistent engine's: the recurrent products from its block GEMM's sums in shared memory, the rest
// loaded before that GEMM) and returns h_new, which that engine may also stage for the next step.
template <class Op>
struct FwdOp {
  template <typename T, typename W = T, class M = Fused>
  static FRNN_HD void elem(const CellParams& p, int64_t r, int64_t j) {
    Op::template with<T, W, M>(p, r, j, InMemory<Op, T, W>{p, r, j});
  }
};

struct LstmFwd : FwdOp<LstmFwd> {
  static constexpr int kGates = 4;
  template <typename T, typename W = T>
  static FRNN_HD acc_t<W> state(const CellParams& p, int64_t r, int64_t j) {
    return ld<W>(p.c, r * p.H + j);
  }
  template <typename T, typename W = T, class M = Fused, class In>
  static FRNN_HD acc_t<W> with(const CellParams& p, int64_t r, int64_t j, const In& in) {
    using A = acc_t<W>;
    const int64_t g0 = r * p.gs + j, gw = p.gw;
    const A i = sigmoid<M>(pre<W>(p, 0, j, in));
    const A f = sigmoid<M>(pre<W>(p, 1, j, in));
    const A g = ftanh<M>(pre<W>(p, 2, j, in));
    const A o = sigmoid<M>(pre<W>(p, 3, j, in));
    const A c = f * in.state() + i * g;
    const A h = o * ftanh<M>(c);
    st<W>(p.gates, g0, i);
    st<W>(p.gates, g0 + gw, f);
    st<W>(p.gates, g0 + 2 * gw, g);
    st<W>(p.gates, g0 + 3 * gw, o);
    st<W>(p.c, r * p.H + j, c);
    st<W>(p.c_save, r * p.H + j, c);
    st<T>(p.h, r * p.h_stride + j, h);
    st<T>(p.y, r * p.y_stride + j, h);
    return h;
  }
};

struct GruFwd : FwdOp<GruFwd> {
  static constexpr int kGates = 3;
  template <typename T, typename W = T>
  static FRNN_HD acc_t<W> state(const CellParams& p, int64_t r, int64_t j) {
    return ld<T>(p.h_prev, r * p.h_stride + j);
  }
  template <typename T, typename W = T, class M = Fused, class In>
  static FRNN_HD acc_t<W> with(const CellParams& p, int64_t r, int64_t j, const In& in) {
    using A = acc_t<W>;
    const int64_t g0 = r * p.gs + j, gw = p.gw;
    const A rg = sigmoid<M>(pre<W>(p, 0, j, in));
    const A z = sigmoid<M>(pre<W>(p, 1, j, in));
    const A hn = in.hg(2) + ld<W>(p.b_hn, j);
    const A n = ftanh<M>(in.x(2) + ld<W>(p.bias, 2 * gw + j) + rg * hn);
    const A h = (A(1) - z) * n + z * in.state();
    st<W>(p.gates, g0, rg);
    st<W>(p.gates, g0 + gw, z);
    st<W>(p.gates, g0 + 2 * gw, n);
    st<W>(p.hn_save, r * p.hn_stride + j, hn);
    st<T>(p.h, r * p.h_stride + j, h);
    st<T>(p.y, r * p.y_stride + j, h);
    return h;
  }
};

template <bool Relu>
struct RnnFwd : FwdOp<RnnFwd<Relu>> {
  static constexpr int kGates = 1;
  template <typename T, typename W = T>
  static FRNN_HD acc_t<W> state(const CellParams&, int64_t, int64_t) {
    return acc_t<W>(0);  // none: the Elman cell's h_new depends on h_{t-1} only through hg
  }
  template <typename T, typename W = T, class M = Fused, class In>
  static FRNN_HD acc_t<W> with(const CellParams& p, int64_t r, int64_t j, const In& in) {
    using A = acc_t<W>;
    const A a = pre<W>(p, 0, j, in);
    const A h = Relu ? (a > A(0) ? a : A(0)) : ftanh<M>(a);
    st<T>(p.h, r * p.h_stride + j, h);
    st<T>(p.y, r * p.y_stride + j, h);
    return h;
  }
};

// ---------------------------------------------------------------------------------------------------
// Backward step: gradients with respect to the pre-activations of one step, walking time in reverse.
struct CellGradParams {
  int64_t rows;        // active rows of this step (b_t)
  int64_t H;           // hidden size, the row stride of c, hn and dc
  int64_t gw;          // gate spacing, as CellParams::gw
  int64_t gs;          // row stride of gates, dgx, dgh: G*H
  const void* gates;   // gates: [rows, gs] saved activated gates (LSTM, GRU)
  const void* c;       // c: [rows, H] LSTM saved c_new
  const void* hn;      // hn: [rows, H] GRU saved W_hn h_prev + b_hn
  const void* out;     // out: [rows, out_stride] RNN saved h_new (= y rows)
  int64_t out_stride;
  // prev: the state before this step, LSTM c_prev (workspace type) or GRU h_prev (sequence type). Rows <
  // n_prev come from the previous step's saved rows, the others (sequences starting at this step, reverse
  // direction) from the initial state.
  const void* prev;    // prev: [n_prev, prev_stride]
  const void* init;    // init: [rows, prev_stride] c0 / h0
  int64_t prev_stride;
  int64_t n_prev;
  const void* dh;      // dh: [rows, dh_stride] gradient reaching h_new from the next step
  int64_t dh_stride;
  const void* dy;      // dy: [rows, dy_stride] gradient of the output rows (zeros where already in dh)
  int64_t dy_stride;
  void* dc;            // dc: [rows, H] LSTM, in: dc_new from the next step, out: dc_prev
  void* dgx;           // dgx: [rows, gs] gradient of the input-side pre-activations
  void* dgh;           // dgh: [rows, gs] GRU gradient of the recurrent pre-activations (differs in n)
  void* dh_prev;       // dh_prev: [rows, dh_stride] GRU: the direct z*dh term of dh_prev (may alias dh)
};

// Selects the row pointer, not the loaded value, so the CPU loop has no conditional load and vectorises.
template <typename S>
FRNN_HD acc_t<S> ld_prev(const CellGradParams& p, int64_t r, int64_t j) {
  return ld<S>(r < p.n_prev ? p.prev : p.init, r * p.prev_stride + j);
}

// What a backward element (r, j) reads, where the per-step drivers leave it: saved gate k, the op's saved value
// (Op::saved: LSTM c_new, GRU hn, RNN h_new), the state before the step (Op::prev: LSTM c_prev, GRU h_prev), the
// gradient reaching h_new (dh_next, from the next step, plus the output's dy), dc_new (LSTM).
template <class Op, typename T, typename W>
struct GradInMemory {
  const CellGradParams& p;
  int64_t r, j;
  FRNN_HD acc_t<W> gate(int64_t k) const { return ld<W>(p.gates, r * p.gs + k * p.gw + j); }
  FRNN_HD acc_t<W> saved() const { return Op::template saved<T, W>(p, r, j); }
  FRNN_HD acc_t<W> prev() const { return Op::template prev<T, W>(p, r, j); }
  FRNN_HD acc_t<W> dh_next() const { return ld<W>(p.dh, r * p.dh_stride + j); }
  FRNN_HD acc_t<W> dy() const { return ld<T>(p.dy, r * p.dy_stride + j); }
  FRNN_HD acc_t<W> dh() const { return dh_next() + dy(); }
  FRNN_HD acc_t<W> dc() const { return ld<W>(p.dc, r * p.H + j); }
};

// A backward op's two entries: elem(p, r, j) reads its inputs from memory (GradInMemory) and stores the gradients;
// with(p, r, j, in, dgh) takes them from `in` (the persistent engine's: dh_next from its dh GEMM's sums, the rest
// loaded before that GEMM) and also hands dgh(k, v) each gradient of a recurrent pre-activation it stores to p.dgh
// (the operand of dh_{t-1} = dgates . W_hh), which that engine stages for the GEMM as well. An op reads kGates
// saved gates, prev() where kPrev, dc() where kDc.
struct NoDgh {
  template <typename A>
  FRNN_HD void operator()(int64_t, A) const {}
};
template <class Op>
struct BwdOp {
  template <typename T, typename W = T, class M = Fused>
  static FRNN_HD void elem(const CellGradParams& p, int64_t r, int64_t j) {
    Op::template with<T, W, M>(p, r, j, GradInMemory<Op, T, W>{p, r, j}, NoDgh{});
  }
};

struct LstmBwd : BwdOp<LstmBwd> {
  static constexpr int kGates = 4;
  static constexpr bool kPrev = true, kDc = true;
  template <typename T, typename W = T>
  static FRNN_HD acc_t<W> saved(const CellGradParams& p, int64_t r, int64_t j) {
    return ld<W>(p.c, r * p.H + j);
  }
  template <typename T, typename W = T>
  static FRNN_HD acc_t<W> prev(const CellGradParams& p, int64_t r, int64_t j) {
    return ld_prev<W>(p, r, j);
  }
  template <typename T, typename W = T, class M = Fused, class In, class Dgh>
  static FRNN_HD void with(const CellGradParams& p, int64_t r, int64_t j, const In& in, const Dgh& dgh) {
    using A = acc_t<W>;
    const int64_t H = p.H, gw = p.gw, g0 = r * p.gs + j;
    const A i = in.gate(0), f = in.gate(1), g = in.gate(2), o = in.gate(3);
    const A tc = ftanh<M>(in.saved());
    const A dh = in.dh();
    const A dc = in.dc() + dh * o * (A(1) - tc * tc);
    const A di = dc * g * i * (A(1) - i), df = dc * in.prev() * f * (A(1) - f);
    const A dg = dc * i * (A(1) - g * g), dout = dh * tc * o * (A(1) - o);
    st<T>(p.dgx, g0, di);
    st<T>(p.dgx, g0 + gw, df);
    st<T>(p.dgx, g0 + 2 * gw, dg);
    st<T>(p.dgx, g0 + 3 * gw, dout);
    dgh(0, di);
    dgh(1, df);
    dgh(2, dg);
    dgh(3, dout);
    st<W>(p.dc, r * H + j, dc * f);
  }
};

struct GruBwd : BwdOp<GruBwd> {
  static constexpr int kGates = 3;
  static constexpr bool kPrev = true, kDc = false;
  template <typename T, typename W = T>
  static FRNN_HD acc_t<W> saved(const CellGradParams& p, int64_t r, int64_t j) {
    return ld<W>(p.hn, r * p.H + j);
  }
  template <typename T, typename W = T>
  static FRNN_HD acc_t<W> prev(const CellGradParams& p, int64_t r, int64_t j) {
    return ld_prev<T>(p, r, j);
  }
  template <typename T, typename W = T, class M = Fused, class In, class Dgh>
  static FRNN_HD void with(const CellGradParams& p, int64_t r, int64_t j, const In& in, const Dgh& dgh) {
    using A = acc_t<W>;
    const int64_t gw = p.gw, g0 = r * p.gs + j;
    const A rg = in.gate(0), z = in.gate(1), n = in.gate(2);
    const A dh = in.dh();
    const A dn = dh * (A(1) - z) * (A(1) - n * n);
    const A dr = dn * in.saved() * rg * (A(1) - rg);
    const A dz = dh * (in.prev() - n) * z * (A(1) - z);
    st<T>(p.dgx, g0, dr);
    st<T>(p.dgx, g0 + gw, dz);
    st<T>(p.dgx, g0 + 2 * gw, dn);
    st<T>(p.dgh, g0, dr);
    st<T>(p.dgh, g0 + gw, dz);
    st<T>(p.dgh, g0 + 2 * gw, dn * rg);
    dgh(0, dr);
    dgh(1, dz);
    dgh(2, dn * rg);
    st<W>(p.dh_prev, r * p.dh_stride + j, dh * z);
  }
};

template <bool Relu>
struct RnnBwd : BwdOp<RnnBwd<Relu>> {
  static constexpr int kGates = 0;
  static constexpr bool kPrev = false, kDc = false;
  template <typename T, typename W = T>
  static FRNN_HD acc_t<W> saved(const CellGradParams& p, int64_t r, int64_t j) {
    return ld<T>(p.out, r * p.out_stride + j);
  }
  template <typename T, typename W = T>
  static FRNN_HD acc_t<W> prev(const CellGradParams&, int64_t, int64_t) {
    return acc_t<W>(0);  // none: the Elman cell's gradients do not depend on h_{t-1} but through W_hh
  }
  template <typename T, typename W = T, class M = Fused, class In, class Dgh>
  static FRNN_HD void with(const CellGradParams& p, int64_t r, int64_t j, const In& in, const Dgh& dgh) {
    using A = acc_t<W>;
    const A h = in.saved();
    const A dh = in.dh();
    const A d = Relu ? (h > A(0) ? dh : A(0)) : dh * (A(1) - h * h);
    st<T>(p.dgx, r * p.gs + j, d);
    dgh(0, d);
  }
};

}  // namespace fastrnn
