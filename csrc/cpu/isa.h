// run_at(level, f): f(math) inlined into a function compiled for one x86-64 level, so the loops inside it
// vectorise for that level (a portable binary still runs 512-bit vectors where the CPU has them).
#pragma once

#include "cell/dispatch.h"

namespace fastrnn {

// f(M{}): M is the level's multiply-add for cell.h's kernels (other loops ignore it). x86-64-v3 and v4 have FMA
// units; the baseline has none unless the compiler's own target does (fmaf there is a libm call per element).
#if defined(__x86_64__) && !defined(__FMA__)
using BaselineMath = Unfused;
#else
using BaselineMath = Fused;
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FRNN_ISA_CLONES 1
template <class F>
__attribute__((target("arch=x86-64-v4"), flatten)) void run_v4(const F& f) {
  f(Fused{});
}
template <class F>
__attribute__((target("arch=x86-64-v3"), flatten)) void run_v3(const F& f) {
  f(Fused{});
}
#endif
template <class F>
__attribute__((flatten)) void run_baseline(const F& f) {
  f(BaselineMath{});
}
template <class F>
void run_at(Isa level, const F& f) {
#ifdef FRNN_ISA_CLONES
  switch (level) {
    case Isa::V4: return run_v4(f);
    case Isa::V3: return run_v3(f);
    default: break;
  }
#endif
  run_baseline(f);
}

}  // namespace fastrnn
