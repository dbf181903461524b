// CPU pointwise kernels: the cell.h ops over one time step, parallel over rows x hidden.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

#include "cell/dispatch.h"
#include "cpu/isa.h"
#include "cpu/row_serial.h"

namespace fastrnn {
namespace {

// fp32 code is compiled once per x86-64 ISA level (cpu/isa.h) and the level is chosen when the process first
// needs it; FASTRNN_CPU_ISA can cap it to show a smaller machine's path on a bigger one.
Isa detect_isa() {
#ifdef FRNN_ISA_CLONES
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::V4;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::V3;
#endif
  return Isa::Baseline;
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::V4: return "avx512";
    case Isa::V3: return "avx2";
    default: return "baseline";
  }
}

struct IsaChoice {
  Isa cpu, level;
  std::string cap;     // FASTRNN_CPU_ISA as given, "" when unset
  bool known = true;   // cap is unset or names a level
};

const IsaChoice& isa_choice() {
  static const IsaChoice c = [] {
    IsaChoice out{detect_isa(), detect_isa(), ""};
    const char* env = std::getenv("FASTRNN_CPU_ISA");
    if (env == nullptr || *env == '\0') return out;
    out.cap = env;
    for (Isa i : {Isa::Baseline, Isa::V3, Isa::V4}) {
      if (out.cap == isa_name(i)) {
        out.level = std::min(out.cpu, i);
        return out;
      }
    }
    out.level = Isa::Baseline;
    out.known = false;
    return out;
  }();
  return c;
}

// an unknown FASTRNN_CPU_ISA runs baseline here; isa_level() reports it
template <class F>
void on_isa(const F& f) {
  run_at(isa_choice().level, f);
}

template <class Op, typename T, class M = Fused, class P>
FRNN_HD void row_segment(const P& p, int64_t r, int64_t j0, int64_t j1) {
#pragma GCC ivdep
  for (int64_t j = j0; j < j1; ++j) Op::template elem<T, T, M>(p, r, j);
}

// bf16 sequence tensors, fp32 workspaces (the engine's bf16 path)
template <class Op, class P>
void rows_bf16(const P& p, int64_t units) {
  on_isa([&](auto m) {
    for (int64_t r = 0; r < p.rows; ++r) {
#pragma GCC ivdep
      for (int64_t j = 0; j < units; ++j) Op::template elem<c10::BFloat16, float, decltype(m)>(p, r, j);
    }
  });
}

template <class Op, class P>
void rows_f32(const P& p, int64_t units) {
  on_isa([&](auto m) {
    for (int64_t r = 0; r < p.rows; ++r) row_segment<Op, float, decltype(m)>(p, r, 0, units);
  });
}

// Below this many elements a fork/join costs more than the arithmetic.
constexpr int64_t kGrain = 8192;

template <class Op, typename T, class P>
void run(const P& p) {
  at::parallel_for(0, p.rows * p.H, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t r = i / p.H, j0 = i - r * p.H, j1 = std::min(p.H, j0 + (end - i));
      if constexpr (std::is_same_v<T, float>) {
        on_isa([&](auto m) { row_segment<Op, float, decltype(m)>(p, r, j0, j1); });
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

// Tasks [begin, end): rows of a forward step or of the input LayerNorm; slots of a backward step, each slot
// rows s, s + slots, ... so that its partial sums have one writer. Each range runs on a local copy of the params: a store through one of the row pointers could otherwise alias
// the caller's struct, and the compiler then reloads every pointer per element and keeps the loops scalar.
template <class Op, typename T, class M = Fused>
FRNN_HD void ext_range(const ExtParams& params, int64_t begin, int64_t end) {
  const ExtParams p = params;
  for (int64_t r = begin; r < end; ++r) ext_fwd_row<Op, RowSerialAt<M>, T>(RowSerialAt<M>{}, p, r);
}
template <class Op, typename T, class M = Fused>
FRNN_HD void ext_range(const ExtGradParams& params, int64_t begin, int64_t end) {
  const ExtGradParams p = params;
  for (int64_t s = begin; s < end; ++s) {
    for (int64_t r = s; r < p.rows; r += p.slots) ext_bwd_row<Op, RowSerialAt<M>, T>(RowSerialAt<M>{}, p, r);
  }
}
template <class Op, typename T, class M = Fused>
FRNN_HD void ext_range(const LnRowsParams& params, int64_t begin, int64_t end) {
  const LnRowsParams p = params;
  for (int64_t r = begin; r < end; ++r) ln_rows_row<RowSerialAt<M>, T>(RowSerialAt<M>{}, p, r);
}

template <class Op, class P>
void ext_range_f32(const P& p, int64_t begin, int64_t end) {
  on_isa([&](auto m) { ext_range<Op, float, decltype(m)>(p, begin, end); });
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

Isa isa_level() {
  const IsaChoice& c = isa_choice();
  TORCH_CHECK(c.known, "fastrnn: FASTRNN_CPU_ISA must be one of avx512, avx2, baseline (or unset), got '", c.cap,
              "'");
  return c.level;
}

std::string cpu_isa() {
#ifdef FRNN_ISA_CLONES
  const IsaChoice& c = isa_choice();
  const Isa level = c.level;
  if (!c.known) return "FASTRNN_CPU_ISA='" + c.cap + "' is not one of avx512, avx2, baseline: CPU calls will raise";
  std::string s = level == Isa::V4 ? "x86-64-v4 (avx512)" : level == Isa::V3 ? "x86-64-v3 (avx2+fma)"
                                                                             : "x86-64 baseline (sse2)";
  if (level != c.cpu) s += std::string(", capped by FASTRNN_CPU_ISA=") + c.cap + " (the CPU has " + isa_name(c.cpu) + ")";
  return s;
#else
  return "compiler default";
#endif
}

}  // namespace fastrnn
