// cell_ln.h's executor on the CPU, one row on the calling thread: the CPU kernels of fastrnn's cells
// (cell_cpu.cpp) and the persistent engine's emulator (persist.cpp) run rows through it.
#pragma once

#include <cstdint>

#include "cell/cell_ln.h"

namespace fastrnn {

// One row of fastrnn's own cells on the calling thread (cell_ln.h's executor interface), its loops SIMD: an
// element reads and writes only its own index (cell_ln.h), so lanes are independent. M: cell.h's multiply-add.
template <class M>
struct RowSerialAt {
  using Math = M;
  template <class F>
  FRNN_HD void each(int64_t n, F&& f) const {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) f(j);
  }
  // Without reassociation a float sum is one serial chain; one partial sum per lane and term vectorises.
  template <int K, typename A, class F>
  FRNN_HD void reduce(int64_t n, A (&s)[K], F&& f) const {
    constexpr int64_t L = 64 / sizeof(A);  // one 512-bit vector of partial sums per term
    A lane[K][L] = {};
    int64_t j0 = 0;
    for (; j0 + L <= n; j0 += L) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        A v[K];
        f(j0 + l, v);
        for (int k = 0; k < K; ++k) lane[k][l] += v[k];
      }
    }
    for (int64_t j = j0; j < n; ++j) {
      A v[K];
      f(j, v);
      for (int k = 0; k < K; ++k) lane[k][0] += v[k];
    }
    for (int k = 0; k < K; ++k) {
      for (int64_t l = 0; l < L; ++l) s[k] += lane[k][l];
    }
  }
  template <int K, typename A>
  void sum(A (&)[K]) const {}
  void sync() const {}
  bool leader() const { return true; }
};
using RowSerial = RowSerialAt<Fused>;  // the GPU's arithmetic: the emulator's, and the CPU's but in baseline

}  // namespace fastrnn
