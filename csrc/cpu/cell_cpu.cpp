// CPU pointwise kernels: the cell.h ops over one time step, parallel over rows x hidden.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "cell/dispatch.h"

namespace fastrnn {
namespace {

// fp32 code is cloned per x86-64 ISA level and the loader picks one clone (ifunc), so a portable binary
// still runs 512-bit vectors where the CPU has them; -march=native would tie the wheel to the build host.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FRNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FRNN_CLONES
#endif

template <class Op, typename T, class P>
FRNN_HD void row_segment(const P& p, int64_t r, int64_t j0, int64_t j1) {
#pragma GCC ivdep
  for (int64_t j = j0; j < j1; ++j) Op::template elem<T>(p, r, j);
}

template <class Op, class P>
FRNN_CLONES void row_segment_f32(const P& p, int64_t r, int64_t j0, int64_t j1) {
  row_segment<Op, float>(p, r, j0, j1);
}

// bf16 sequence tensors, fp32 workspaces (the engine's bf16 path)
template <class Op, class P>
FRNN_CLONES void rows_bf16(const P& p, int64_t units) {
  for (int64_t r = 0; r < p.rows; ++r) {
#pragma GCC ivdep
    for (int64_t j = 0; j < units; ++j) Op::template elem<c10::BFloat16, float>(p, r, j);
  }
}

template <class Op, class P>
FRNN_CLONES void rows_f32(const P& p, int64_t units) {
  for (int64_t r = 0; r < p.rows; ++r) row_segment<Op, float>(p, r, 0, units);
}

// Below this many elements a fork/join costs more than the arithmetic.
constexpr int64_t kGrain = 8192;

template <class Op, typename T, class P>
void run(const P& p) {
  at::parallel_for(0, p.rows * p.H, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t r = i / p.H, j0 = i - r * p.H, j1 = std::min(p.H, j0 + (end - i));
      if constexpr (std::is_same_v<T, float>) {
        row_segment_f32<Op>(p, r, j0, j1);
      } else {
        row_segment<Op, T>(p, r, j0, j1);
      }
      i += j1 - j0;
    }
  });
}

template <class Visit, class P>
void run_cpu(Mode m, Dtype d, const P& p, Visit visit) {
  visit(m, [&](auto op) {
    using Op = decltype(op);
    switch (d) {
      case Dtype::F32: return run<Op, float>(p);
      case Dtype::F64: return run<Op, double>(p);
      default: TORCH_CHECK(false, "fastrnn: the CPU kernels support float32 and float64 only");
    }
  });
}

template <class Visit, class P>
void run_block(Mode m, Dtype d, const P& p, int64_t units, Visit visit) {
  visit(m, [&](auto op) {
    using Op = decltype(op);
    switch (d) {
      case Dtype::F32: return rows_f32<Op>(p, units);
      case Dtype::BF16: return rows_bf16<Op>(p, units);
      default: TORCH_CHECK(false, "fastrnn: the CPU engine's cells take float32 and bfloat16 only");
    }
  });
}

// One row of fastrnn's own cells on the calling thread (cell_ln.h's executor interface), its loops SIMD: an
// element reads and writes only its own index (cell_ln.h), so lanes are independent.
struct RowSerial {
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

// Tasks [begin, end): rows of a forward step or of the input LayerNorm; slots of a backward step, each slot
// rows s, s + slots, ... so that its partial sums have one writer. Each range runs on a local copy of the params: a store through one of the row pointers could otherwise alias
// the caller's struct, and the compiler then reloads every pointer per element and keeps the loops scalar.
template <class Op, typename T>
FRNN_HD void ext_range(const ExtParams& params, int64_t begin, int64_t end) {
  const ExtParams p = params;
  for (int64_t r = begin; r < end; ++r) ext_fwd_row<Op, RowSerial, T>(RowSerial{}, p, r);
}
template <class Op, typename T>
FRNN_HD void ext_range(const ExtGradParams& params, int64_t begin, int64_t end) {
  const ExtGradParams p = params;
  for (int64_t s = begin; s < end; ++s) {
    for (int64_t r = s; r < p.rows; r += p.slots) ext_bwd_row<Op, RowSerial, T>(RowSerial{}, p, r);
  }
}
template <class Op, typename T>
FRNN_HD void ext_range(const LnRowsParams& params, int64_t begin, int64_t end) {
  const LnRowsParams p = params;
  for (int64_t r = begin; r < end; ++r) ln_rows_row<RowSerial, T>(RowSerial{}, p, r);
}

template <class Op, class P>
FRNN_CLONES void ext_range_f32(const P& p, int64_t begin, int64_t end) {
  ext_range<Op, float>(p, begin, end);
}

// (tasks, grain): a row is G*H elements of work a few times over, a slot at least one row.
std::pair<int64_t, int64_t> ext_tasks(const ExtParams& p) {
  return {p.rows, std::max<int64_t>(1, kGrain / p.GH)};
}
std::pair<int64_t, int64_t> ext_tasks(const LnRowsParams& p) {
  return {p.rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, p.n))};
}
std::pair<int64_t, int64_t> ext_tasks(const ExtGradParams& p) { return {std::min(p.rows, p.slots), 1}; }

template <class Op, class P>
void run_tasks(Dtype d, const P& p, int64_t begin, int64_t end) {
  switch (d) {
    case Dtype::F32: return ext_range_f32<Op>(p, begin, end);
    case Dtype::F64: return ext_range<Op, double>(p, begin, end);
    default: TORCH_CHECK(false, "fastrnn: the CPU kernels of fastrnn's cells take float32 and float64 only");
  }
}

template <class Op, class P>
void run_ext(Dtype d, const P& p) {
  const auto [tasks, grain] = ext_tasks(p);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { run_tasks<Op>(d, p, begin, end); });
}

}  // namespace

void ext_cpu(Mode m, Dtype d, const ExtParams& p) {
  visit_ext(m, [&](auto op) { run_ext<decltype(op)>(d, p); });
}

void ext_cpu(Mode m, Dtype d, const ExtGradParams& p) {
  visit_ext(m, [&](auto op) { run_ext<decltype(op)>(d, p); });
}

void ext_cpu_tasks(Mode m, Dtype d, const ExtParams& p, int64_t begin, int64_t end) {
  visit_ext(m, [&](auto op) { run_tasks<decltype(op)>(d, p, begin, end); });
}

void ext_cpu_tasks(Mode m, Dtype d, const ExtGradParams& p, int64_t begin, int64_t end) {
  visit_ext(m, [&](auto op) { run_tasks<decltype(op)>(d, p, begin, end); });
}

void ln_rows_cpu(Dtype d, const LnRowsParams& p) { run_ext<void>(d, p); }  // no cell: Op unused

void cell_cpu_block(Mode m, Dtype d, const CellParams& p, int64_t units) {
  run_block(m, d, p, units, [](Mode mm, auto&& f) { visit_fwd(mm, f); });
}

void cell_cpu_block(Mode m, Dtype d, const CellGradParams& p, int64_t units) {
  run_block(m, d, p, units, [](Mode mm, auto&& f) { visit_bwd(mm, f); });
}

void cell_cpu(Mode m, Dtype d, const CellParams& p) {
  run_cpu(m, d, p, [](Mode mm, auto&& f) { visit_fwd(mm, f); });
}

void cell_cpu(Mode m, Dtype d, const CellGradParams& p) {
  run_cpu(m, d, p, [](Mode mm, auto&& f) { visit_bwd(mm, f); });
}

const char* cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  // mirrors the clone order above, which is also the order the ifunc resolver tries
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (avx512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (avx2+fma)";
  return "x86-64 baseline (sse2)";
#else
  return "compiler default";
#endif
}

}  // namespace fastrnn
