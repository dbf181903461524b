// run_at(level, f): f inlined into a function compiled for one x86-64 level, so the loops inside it vectorise
// for that level (a portable binary still runs 512-bit vectors where the CPU has them).
#pragma once

#include "cell/dispatch.h"

namespace fastrnn {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FRNN_ISA_CLONES 1
template <class F>
__attribute__((target("arch=x86-64-v4"), flatten)) void run_v4(const F& f) {
  f();
}
template <class F>
__attribute__((target("arch=x86-64-v3"), flatten)) void run_v3(const F& f) {
  f();
}
#endif
template <class F>
__attribute__((flatten)) void run_baseline(const F& f) {
  f();
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
