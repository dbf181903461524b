// Per-element cell math shared by the CPU and the CUDA kernels, so that the CPU tests exercise the exact
// arithmetic the GPU runs.
//
// Every op is a struct with `elem<T>(params, r, j)`: the element (row r, hidden unit j) of one time step.
// It loads storage type T, computes in acc_t<T> (fp32 for fp32/fp16/bf16 storage, fp64 for fp64) and stores
// T. Each element reads and writes only column j (and the gate columns k*H+j) of its own row, so in-place
// buffers (gates overwritten by activated gates, state read and rewritten) are safe and the loop over j has
// no loop-carried dependency: the CPU loop uses `#pragma GCC ivdep` and vectorises.
//
// Layouts keep PyTorch's: gate blocks are contiguous H-wide column blocks of a row, LSTM (i,f,g,o),
// GRU (r,z,n). Row strides are in elements.
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

// exp for fp32 as branch-free Cephes-style polynomial: unlike std::exp it auto-vectorises on the CPU, and
// the GPU runs the same code. Relative error ~2 ulp on the clamped range; the clamp keeps 2^n finite, and
// sigmoid/tanh saturate long before it matters.
FRNN_HD float fexp(float x) {
  // selects, not fminf/fmaxf: those carry NaN rules that keep gcc from vectorising; NaN still propagates
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float k = x * 1.44269504088896341f;
  // round to nearest with the 1.5*2^23 trick: vectorises without SSE4.1's roundps
  const float n = (k + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const int bits = (static_cast<int>(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
#endif
  return p * scale;
}

FRNN_HD double fexp(double x) { return ::exp(x); }

template <typename A>
FRNN_HD A sigmoid(A x) {
  return A(1) / (A(1) + fexp(-x));
}

// tanh(x) = 1 - 2/(exp(2x)+1) loses all relative precision near 0, so small |x| uses the Cephes odd
// polynomial; both sides are computed and selected to stay branch-free.
FRNN_HD float ftanh(float x) {
  const float a = fabsf(x);
  const float big = 1.0f - 2.0f / (fexp(2.0f * a) + 1.0f);
  const float s = x * x;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const float small = p * s * x + x;
  return a < 0.625f ? small : copysignf(big, x);
}

FRNN_HD double ftanh(double x) { return ::tanh(x); }

// ---------------------------------------------------------------------------------------------------
// Forward step. One time step, `rows` active rows; the driver points every pointer at that step's rows.
struct CellParams {
  int64_t rows;        // active rows of this step (b_t)
  int64_t H;           // hidden size
  int64_t gs;          // row stride of gates and hg: G*H
  void* gates;         // gates: [rows, G*H] in: x @ w_ih^T; out: activated gates (LSTM, GRU)
  const void* hg;      // hg: [rows, G*H] h_prev @ w_hh^T
  const void* bias;    // bias: [G*H] b_ih + b_hh, except GRU's n block: b_in only (zeros without bias)
  const void* b_hn;    // b_hn: [H] GRU's b_hh n block, inside r * (W_hn h + b_hn)
  void* h;             // h: [rows, h_stride] state, GRU reads h_prev; all write h_new (LSTM: o*tanh(c))
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

// Pre-activation of gate column `g` (bias column `b`): input projection + recurrent projection + bias.
template <typename T>
FRNN_HD acc_t<T> pre(const CellParams& p, int64_t g, int64_t b) {
  return ld<T>(p.gates, g) + ld<T>(p.hg, g) + ld<T>(p.bias, b);
}

struct LstmFwd {
  template <typename T>
  static FRNN_HD void elem(const CellParams& p, int64_t r, int64_t j) {
    using A = acc_t<T>;
    const int64_t H = p.H, g0 = r * p.gs + j;
    const A i = sigmoid(pre<T>(p, g0, j));
    const A f = sigmoid(pre<T>(p, g0 + H, j + H));
    const A g = ftanh(pre<T>(p, g0 + 2 * H, j + 2 * H));
    const A o = sigmoid(pre<T>(p, g0 + 3 * H, j + 3 * H));
    const A c = f * ld<T>(p.c, r * H + j) + i * g;
    const A h = o * ftanh(c);
    st<T>(p.gates, g0, i);
    st<T>(p.gates, g0 + H, f);
    st<T>(p.gates, g0 + 2 * H, g);
    st<T>(p.gates, g0 + 3 * H, o);
    st<T>(p.c, r * H + j, c);
    st<T>(p.c_save, r * H + j, c);
    st<T>(p.h, r * p.h_stride + j, h);
    st<T>(p.y, r * p.y_stride + j, h);
  }
};

struct GruFwd {
  template <typename T>
  static FRNN_HD void elem(const CellParams& p, int64_t r, int64_t j) {
    using A = acc_t<T>;
    const int64_t H = p.H, g0 = r * p.gs + j;
    const A rg = sigmoid(pre<T>(p, g0, j));
    const A z = sigmoid(pre<T>(p, g0 + H, j + H));
    const A hn = ld<T>(p.hg, g0 + 2 * H) + ld<T>(p.b_hn, j);
    const A n = ftanh(ld<T>(p.gates, g0 + 2 * H) + ld<T>(p.bias, j + 2 * H) + rg * hn);
    const A h = (A(1) - z) * n + z * ld<T>(p.h, r * p.h_stride + j);
    st<T>(p.gates, g0, rg);
    st<T>(p.gates, g0 + H, z);
    st<T>(p.gates, g0 + 2 * H, n);
    st<T>(p.hn_save, r * p.hn_stride + j, hn);
    st<T>(p.h, r * p.h_stride + j, h);
    st<T>(p.y, r * p.y_stride + j, h);
  }
};

template <bool Relu>
struct RnnFwd {
  template <typename T>
  static FRNN_HD void elem(const CellParams& p, int64_t r, int64_t j) {
    using A = acc_t<T>;
    const A a = pre<T>(p, r * p.gs + j, j);
    const A h = Relu ? (a > A(0) ? a : A(0)) : ftanh(a);
    st<T>(p.h, r * p.h_stride + j, h);
    st<T>(p.y, r * p.y_stride + j, h);
  }
};

// ---------------------------------------------------------------------------------------------------
// Backward step: gradients with respect to the pre-activations of one step, walking time in reverse.
struct CellGradParams {
  int64_t rows;        // active rows of this step (b_t)
  int64_t H;           // hidden size
  int64_t gs;          // row stride of gates, dgx, dgh: G*H
  const void* gates;   // gates: [rows, G*H] saved activated gates (LSTM, GRU)
  const void* c;       // c: [rows, H] LSTM saved c_new
  const void* hn;      // hn: [rows, H] GRU saved W_hn h_prev + b_hn
  const void* out;     // out: [rows, out_stride] RNN saved h_new (= y rows)
  int64_t out_stride;
  // prev: the state before this step, LSTM c_prev or GRU h_prev. Rows < n_prev come from the previous
  // step's saved rows, the others (sequences starting at this step, reverse direction) from the initial state.
  const void* prev;    // prev: [n_prev, prev_stride]
  const void* init;    // init: [rows, prev_stride] c0 / h0
  int64_t prev_stride;
  int64_t n_prev;
  const void* dh;      // dh: [rows, dh_stride] gradient reaching h_new from the next step
  int64_t dh_stride;
  const void* dy;      // dy: [rows, dy_stride] gradient of the output rows (zeros where already in dh)
  int64_t dy_stride;
  void* dc;            // dc: [rows, H] LSTM, in: dc_new from the next step, out: dc_prev
  void* dgx;           // dgx: [rows, G*H] gradient of the input-side pre-activations
  void* dgh;           // dgh: [rows, G*H] GRU gradient of the recurrent pre-activations (differs in n)
  void* dh_prev;       // dh_prev: [rows, dh_stride] GRU: the direct z*dh term of dh_prev (may alias dh)
};

// Selects the row pointer, not the loaded value, so the CPU loop has no conditional load and vectorises.
template <typename T>
FRNN_HD acc_t<T> ld_prev(const CellGradParams& p, int64_t r, int64_t j) {
  return ld<T>(r < p.n_prev ? p.prev : p.init, r * p.prev_stride + j);
}

template <typename T>
FRNN_HD acc_t<T> ld_dh(const CellGradParams& p, int64_t r, int64_t j) {
  return ld<T>(p.dh, r * p.dh_stride + j) + ld<T>(p.dy, r * p.dy_stride + j);
}

struct LstmBwd {
  template <typename T>
  static FRNN_HD void elem(const CellGradParams& p, int64_t r, int64_t j) {
    using A = acc_t<T>;
    const int64_t H = p.H, g0 = r * p.gs + j;
    const A i = ld<T>(p.gates, g0), f = ld<T>(p.gates, g0 + H);
    const A g = ld<T>(p.gates, g0 + 2 * H), o = ld<T>(p.gates, g0 + 3 * H);
    const A tc = ftanh(ld<T>(p.c, r * H + j));
    const A dh = ld_dh<T>(p, r, j);
    const A dc = ld<T>(p.dc, r * H + j) + dh * o * (A(1) - tc * tc);
    st<T>(p.dgx, g0, dc * g * i * (A(1) - i));
    st<T>(p.dgx, g0 + H, dc * ld_prev<T>(p, r, j) * f * (A(1) - f));
    st<T>(p.dgx, g0 + 2 * H, dc * i * (A(1) - g * g));
    st<T>(p.dgx, g0 + 3 * H, dh * tc * o * (A(1) - o));
    st<T>(p.dc, r * H + j, dc * f);
  }
};

struct GruBwd {
  template <typename T>
  static FRNN_HD void elem(const CellGradParams& p, int64_t r, int64_t j) {
    using A = acc_t<T>;
    const int64_t H = p.H, g0 = r * p.gs + j;
    const A rg = ld<T>(p.gates, g0), z = ld<T>(p.gates, g0 + H), n = ld<T>(p.gates, g0 + 2 * H);
    const A dh = ld_dh<T>(p, r, j);
    const A dn = dh * (A(1) - z) * (A(1) - n * n);
    const A dr = dn * ld<T>(p.hn, r * H + j) * rg * (A(1) - rg);
    const A dz = dh * (ld_prev<T>(p, r, j) - n) * z * (A(1) - z);
    st<T>(p.dgx, g0, dr);
    st<T>(p.dgx, g0 + H, dz);
    st<T>(p.dgx, g0 + 2 * H, dn);
    st<T>(p.dgh, g0, dr);
    st<T>(p.dgh, g0 + H, dz);
    st<T>(p.dgh, g0 + 2 * H, dn * rg);
    st<T>(p.dh_prev, r * p.dh_stride + j, dh * z);
  }
};

template <bool Relu>
struct RnnBwd {
  template <typename T>
  static FRNN_HD void elem(const CellGradParams& p, int64_t r, int64_t j) {
    using A = acc_t<T>;
    const A h = ld<T>(p.out, r * p.out_stride + j);
    const A dh = ld_dh<T>(p, r, j);
    st<T>(p.dgx, r * p.gs + j, Relu ? (h > A(0) ? dh : A(0)) : dh * (A(1) - h * h));
  }
};

}  // namespace fastrnn
