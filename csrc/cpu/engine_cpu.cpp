// The CPU engine: per time step one fused pass per thread, x_t . W_ih and h_{t-1} . W_hh on oneDNN's
// batch-reduce GEMM ukernel (at::native::cpublas::brgemm) into tiles that stay in cache, then cell.h's math
// on them. The weight gradients and dx stay big GEMMs per chunk of steps: on the ukernel too off AVX-512
// (BigProducts), else seq.cpp's flush_chunk (oneDNN's matmul or MKL).
//
// Blocked gate layout. Hidden units are cut into blocks of U = unit_block(...) (the last one shorter); block
// [j0, j1) stores its G gates next to each other: gate k of unit j0 + u is column G*j0 + k*(j1 - j0) + u of
// a gates row. W_ih, W_hh and the biases are permuted into that row order once per call, so the per-step
// tiles and the saved gates share it, and a thread that owns a range of blocks owns
// a contiguous column range [G*ja, G*jb) of every gates row and [ja, jb) of every state row. The layout
// depends on H, G and the dtype only (not on the thread count), so backward reads what any forward saved.
//
// Threads. One OpenMP region per forward call (per chunk in backward) with one barrier per step:
//  forward:  per own segment (one unit block, or all the thread's blocks where its tiles are small:
//            Segments), tiles = x_t . W_ih^T and h_{t-1} . W_hh^T [:, segment's gates] (the first straight
//            into the saved gates' rows where they are kept), then the cell on each of its blocks ->
//            h_t, c_t, y, saved gates; barrier (h_{t-1} and h_t live in two buffers, so step t+1's GEMM never
//            reads a row being written).
//  backward: cell backward on own units -> dgates rows (own columns); barrier;
//            dh_{t-1}[:, own units] = dgates . W_hh[:, own units] (all gates: hence the barrier before).
// W_ih and W_hh are packed once per call as one contiguous panel per segment (Layout::panels, gate_panels).
//
// bf16: x, h, y and dgates (the GEMM operands) in bf16, the weights packed in oneDNN's VNNI layout (pairs
// along K), fp32 accumulation; gates, c, dh, dc and the saved values stay fp32. Needs even H (and even I
// for the in-step input projection; odd I projects all steps up front with an fp32 at::mm instead).
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <omp.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <fstream>
#include <string>
#include <thread>

#include <unistd.h>

#include "cpu/isa.h"
#include "seq.h"

namespace fastrnn {
namespace {

using at::Tensor;
namespace cpublas = at::native::cpublas;

// What the block sizes below follow, read from the machine once: the ISA level fastrnn's code runs at
// (isa_level(), so FASTRNN_CPU_ISA shows a smaller machine's choices), the L2 per core and the L3 the process's
// first core shares.
struct Machine {
  Isa isa;
  int64_t l2, l3;
};
// GenuineIntel: ATen's products run on MKL's kernels for this CPU (short calls below, and seq.cpp's gemm())
bool genuine_intel() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  return std::strcmp(vendor, "GenuineIntel") == 0;
#else
  return false;
#endif
}
// bytes of cpu0's cache at `level` from sysfs, else sysconf's answer (which on the Zen 2 VM measured says 256 MiB
// of L3 where sysfs says 16), else `fallback`
int64_t cache_bytes(int level, int sysconf_name, int64_t fallback) {
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream lv(dir + "level"), ty(dir + "type"), sz(dir + "size");
    int l = 0;
    std::string type, size;
    if (!(lv >> l) || !(ty >> type) || !(sz >> size)) continue;
    if (l != level || type == "Instruction") continue;
    const int64_t n = std::atoll(size.c_str());
    const char unit = size.empty() ? ' ' : size.back();
    const int64_t bytes = unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : n;
    if (bytes > 0) return bytes;
  }
  const long s = sysconf(sysconf_name);
  return s > 0 ? static_cast<int64_t>(s) : fallback;
}
const Machine& machine() {
  // where neither source says: the smaller of the machines measured below
  static const Machine m{isa_level(), cache_bytes(2, _SC_LEVEL2_CACHE_SIZE, int64_t{512} << 10),
                         cache_bytes(3, _SC_LEVEL3_CACHE_SIZE, int64_t{16} << 20)};
  return m;
}
int g_intel_rules = -1;  // set_intel_rules's: 0 or 1 stands for the vendor, -1 asks cpuid
// Whether the rules measured on an Intel CPU apply (short calls without gradients, x . W_ih^T in the step, and
// seq.cpp's gemm()); the vendor is read apart from machine(), which a bad FASTRNN_CPU_ISA makes throw
bool intel_rules() {
  static const bool intel = genuine_intel();
  return g_intel_rules >= 0 ? g_intel_rules == 1 : intel;
}

// A forward block panel over kSplitBytes runs gate by gate (StepWeight says why). The same on both machines
// measured: with 32-unit blocks on Zen 2 (512 KiB L2), LSTM forward (T,B,I,H) = (100,64,512,512) ran 163 ms
// unsplit (256 KiB panels) against 171 split, (100,64,256,1024) 446 split (512 KiB) against 506 unsplit.
constexpr int64_t kSplitBytes = 256 * 1024;

// Units per block, U. Each block's GEMM rereads all of A (h_{t-1}, or dgates in backward), which favours wide
// blocks; its B panel (G*U x H in forward, G*H x U in backward: the same size) should stay within half the L2
// while the call's rows reuse it, and H should still make 8 blocks for the threads.
// AVX-512: U doubles from 32 (two 512-bit fp32 vectors per gate row segment) up to 128 while both hold, where a
// forward panel split by gate (StepWeight) counts one gate's part. Measured on Zen 4 (1 MiB L2): LSTM H = 512
// fp32 ran a few % faster with 64-unit blocks than with 32, H = 1024 15 % slower with 128 (both before the
// split); with the split, LSTM (T,B,I,H) = (100,64,256,1024) with 64 against 32: forward 410 -> 385 ms, forward
// + backward 1157 -> 1125, GRU forward + backward 837 -> 817.
// AVX2: 32 always. On Zen 2 every wider block was slower, worst at 64, where oneDNN's AVX2 brgemm runs at
// 78 GF/s per core against 100 for 32 columns (M = 64, K = 1024, one thread): forward at (100,64,512,512) /
// (100,64,256,1024), U = 32 / 64 / 128: LSTM 163 / 199 / 165 and 446 / 542 / 507 ms, GRU 125 / 149 / 121 and
// 312 / 379 / 348, RNN 47 / 52 / 45 and 105 / 132 / 109; LSTM backward steps 90 against 125 and 341 against
// 424 ms (32 against 64).
int64_t unit_block(int64_t H, int64_t G, int64_t esize) {
  const Machine& m = machine();
  if (m.isa != Isa::V4) return 32;
  const int64_t panel_bytes = m.l2 / 2;
  // a panel over kSplitBytes runs split by gate (StepWeight), so one gate's part fitting kSplitBytes will do
  auto fits = [&](int64_t u) { return G * u * H * esize <= panel_bytes || (G > 1 && u * H * esize <= kSplitBytes); };
  int64_t U = 32;
  while (U < 128 && H >= 16 * U && fits(2 * U)) U *= 2;
  return U;
}

// Rows per step from which the forward may compute x_t . W_ih^T inside the step (engine_fwd), where both weights
// fit together in the cache each step then reads W_ih's panels again from: the L3 on an AMD CPU (a Zen CCX's,
// which kept pace with the step), the threads' L2s on an Intel one (whose L3, a mesh across the socket, served
// about 30 GB/s a core: kFuseRowsBeyondL2). Zen 2 (16 MiB L3), LSTM forward, in the step against up front (the
// all-rows projection on the same panels): (T,B,I,H) = (100,4,128,512) 10.8 against 12.1 ms, (100,8,128,512) 17.0
// / 19.1, (512,16,128,128) 17.2 / 24.5, (100,64,512,512) 164 / 187, (100,2,128,512) and (100,3,256,512) level;
// with 24 MiB of weights, beyond that L3, (100,B,512,1024) at B = 4 / 8 / 16 / 32: 97 / 48, 141 / 82, 221 / 185,
// 318 / 280, and with 20 MiB at (100,64,256,1024) level. Zen 4, against the earlier up-front path (at::mm on a
// permuted copy of W_ih): 16.5 against 24 ms at (512,16,128,128), 20 against 23 at (100,8,128,512).
constexpr int64_t kFuseRows = 4;
// On an Intel CPU, rows per step from which it does so with weights beyond the L2s, read again from L3 or memory
// every step: below that a step is bound by the bytes it reads, and W_ih's panels add theirs to W_hh's, while
// from 40 rows the products bound it and the gates computed into cache pay. Intel Xeon (Emerald Rapids VM, 2 MiB
// L2, 300 MiB of socket L3 reported), forward, in the step against up front, ms: LSTM (T,B,I,H) = (100,4,512,512)
// 14.3 / 6.6, (100,16,512,512) 25.0 / 19.5, (100,64,512,512) 75.5 / 85.8, (100,8,1024,1024) 74.0 / 58.4,
// (100,64,1024,1024) 293 / 314; RNN (100,4,1024,1024) 15.0 / 8.2, (100,64,1024,1024) 73.6 / 84.6,
// (100,16,512,512), weights in the L2s, 4.8 / 5.2. With the forward's odd steps walked backwards (engine_fwd),
// up-front time / in-step time, medians of 15 in-process alternations: LSTM (512,512) at B = 16 / 32 / 40 / 44 /
// 48 / 56: 0.90 / 0.96 / 0.98-1.04 / 1.11 / 1.11 / 1.16, (256,1024) at 32 / 40: 1.09 / 1.12, (128,1024) at 40:
// 1.18, (1024,1024) at 40 / 48: 1.01 / 1.08; GRU (512,512) at 32 / 40 / 48: 0.95 / 1.01 / 0.99, (256,1024) at
// 40: 1.19; forward + backward, LSTM (512,512) at 40 / 48: 0.99 / 1.02.
constexpr int64_t kFuseRowsBeyondL2 = 40;
// Rows per ukernel call where the input projection runs ahead of the steps: the M the per-step calls are tuned
// for at B = 64.
constexpr int64_t kProjRows = 64;
// Rows (T*B, or a packed sequence's total) from which a layer takes the engine, by whether the call trains.
// Training: below 16 rows the engine's fixed cost per call (the backward's permuted weights, dh panels and
// gradient scratch) outweighs the per-step at::mm it replaces. Two threads, forward + backward, (T,B,I,H,L) =
// (T,1,65,512,2) at T = 8 / 16 / 32, engine against at::mm, ms (ranges of 3 runs): AVX2 (Zen 4 capped) LSTM
// 11.7-13.6 / 11.6-12.4 / 13.8-16.0 against 7.5-8.7 / 12.6-14.6 / 19.5-20.6, GRU 5.6-11.0 / 7.2-8.2 / 9.3-9.6
// against 5.6-6.7 / 8.4-9.6 / 13.7-15.2.
constexpr int64_t kTrainRows = 16;
// Steps from which a training call takes the engine (with kTrainRows rows): its fixed cost per call (the forward's
// and the backward's weight copies and panels, the gradients unpermuted: weight-sized work, on memory mostly
// page-faulted fresh) is paid back over the steps it runs, and one step runs the same products either way.
// Two threads, forward + backward of one layer call, engine against at::mm per step, medians of 11 alternations
// in one process (Zen 4), ratios at::mm time / engine time at T = 1 / 2 / 4 / 8: LSTM (H, B) = (128, 16) 0.73 /
// 0.94 / 1.05 / 1.18, (256, 16) 0.60 / 0.76 / 0.96 / 1.12, (512, 16) 0.55 / 0.67 / 0.89 / 0.93, (128, 64) 0.93 /
// 1.02 / 1.65 / 1.66, (256, 64) 0.89 / 1.02 / 1.05 / 1.05, (512, 64) 0.76 / 0.82 / 0.92 / 1.07; GRU (128, 16)
// 0.43 / 0.62 / 0.82 / 1.01, (512, 16) 0.36 / 0.51 / 0.71 / 1.12, (128, 64) 0.72 / 0.97 / 1.10 / 1.24, (512, 64)
// 0.75 / 0.90 / 1.01 / 1.10. So 8 steps, or 4 where a step has 64 rows. (A cell in a training loop is T = 1: the
// engine had made fastrnn's LSTMCell 0.65x torch.nn's at (B, H) = (32, 256).)
constexpr int64_t kTrainSteps = 8;
constexpr int64_t kTrainStepsWide = 4;
constexpr int64_t kTrainWideRows = 64;
int64_t g_engine_steps = 0;  // set_engine_steps's: both steps rules

static int64_t train_steps(const Problem& pr) {
  if (g_engine_steps > 0) return g_engine_steps;
  return pr.B >= kTrainWideRows ? kTrainStepsWide : kTrainSteps;
}
// Inference (nothing saved): the forward packs only what the steps read (and at one row per step not W_hh:
// DotWeight), so it wins from two rows, by 1.12-2.8x on AVX-512 for every cell from (T,B,I,H) = (4,1,16,16) to
// (4,1,256,1024) (Zen 4, forward, ranges of 3 runs: LSTM (2,1,128,128) 0.19 against 0.22 ms, (4,1,65,512,2)
// 0.75-0.91 against 1.39-1.61). A single row has its own rule (one_row_engine): with W_ih packed into panels
// for its one use, the engine's GRU and RNN had run level at (1,1,65,512,2) on AVX-512 and slower on AVX2.
constexpr int64_t kInferRows = 2;
// AVX2: the engine's fixed cost is larger against ATen's AVX2 kernels, and small layers lose 5-15 % from two
// rows ((2,1,32,32) to (8,1,128,128), 0.13-0.25 ms calls), while weights from 1 MiB up win: (3,1,256,256) LSTM
// 1.18x, GRU 1.05x, (2,8,128,512) 1.20-1.47x, (4,1,65,512,2) 1.16-2.5x. Below kInferBytes, inference starts
// where training does.
constexpr int64_t kInferBytes = int64_t{1} << 20;
// Steps from which a call without gradients takes the engine on an Intel CPU, by its rows per step (elsewhere the
// rows rule alone decides), unless it packs no weights at all (one row a step, W_hh and W_ih read in place). There
// ATen's per-step products run on MKL's kernels for that CPU, and the engine's packing of the weights per call
// (a transpose of each: 36 % of an LSTM (T,B,I,H) = (2,2,256,256) call, perf) is paid back only over several
// steps; on the Zen 4 the engine had beaten them from one step of B = 2-64. Intel Xeon (Emerald Rapids VM, 2
// MiB L2), forward, two threads, at::mm time / engine time at T = 1 / 2 / 4 / 8 (medians of 7 in-process
// alternations, I = H): LSTM H = 256, B = 2: 0.27 / 0.35 / 0.52 / 0.82, B = 4: 0.38 / 0.48 / 0.80 / 1.12, B = 8:
// 0.48 / 0.71 / 1.04 / 1.15, B = 16: 0.77 / 1.07 / 1.30 / 1.40, B = 64: 0.93 / 1.01 / 1.08 / 1.12; LSTM H = 64,
// B = 2: 0.50 / 0.72 / 0.87 / 1.27, B = 8: 0.69 / 0.97 / 1.28 / 1.76, B = 16: 0.84 / 1.08 / 1.47 / 1.90; LSTM H
// = 1024, B = 4: 0.54 / 0.70 / 0.96 / 1.20, B = 16: 0.70 / 0.90 / 1.14 / 1.28; RNN H = 256, B = 2: 0.48 / 0.61 /
// 0.80 / 1.08, B = 8: 0.66 / 0.88 / 1.05 / 1.32, B = 16: 0.85 / 1.06 / 1.32 / 1.70; at B = 1-2 the engine wins from
// 8 steps under kInferBytes of weights (LSTM H = 64, 128 KiB: 1.61 and 1.27 at T = 8, RNN H = 256, 512 KiB: 1.27
// and 1.08), above it from 16 (LSTM H = 256, 2 MiB: 0.83 and 0.82 at T = 8, 1.22 and 1.07 at 16). Slower still at
// every T to 16: RNN H = 1024 at B = 2-16 (0.59-0.91 at T = 8).
constexpr int64_t kInferStepsFew = 16;
constexpr int64_t kInferSteps = 8;
constexpr int64_t kInferStepsWide = 4;
constexpr int64_t kInferMidRows = 4;
constexpr int64_t kInferWideRows = 16;

static int64_t infer_steps(const Problem& pr) {
  if (g_engine_steps > 0) return g_engine_steps;
  if (!intel_rules()) return 1;
  if (pr.B >= kInferWideRows) return kInferStepsWide;
  const bool light = pr.G * pr.H * (pr.I + pr.H) * int64_t{4} < kInferBytes;
  return pr.B >= kInferMidRows || light ? kInferSteps : kInferStepsFew;
}

// in fp32 bytes whatever the storage, so that a 16-bit layer and its fp32 fallback decide alike
int64_t engine_rows(const Problem& pr, bool training) {
  if (training) return kTrainRows;
  const int64_t weight_bytes = pr.G * pr.H * (pr.I + pr.H) * int64_t{4};
  return machine().isa == Isa::V4 || weight_bytes >= kInferBytes ? kInferRows : kTrainRows;
}
// K chunk of the backward's dh GEMM, in bytes of a dgates row (engine_bwd says why). The same on both ISA levels
// (Zen 4, two threads, backward of (T,B,I,H) = (100,64,256,1024), chunks of 2 / 4 / 8 KiB / one pass, ms, two
// runs each): AVX-512 LSTM 665-693 / 665-672 / 759-762 / 758-769, GRU 500-518 / 505-518 / 536-547 / 540-542;
// capped to AVX2 LSTM 712-721 / 705-724 / 755-756 / 743-761, GRU 531-536 / 530-536 / 548-578 / 541-551.
constexpr int64_t kDhChunkBytes = 4096;

// oneDNN's brgemm ukernel: fp32 takes a plain row-major B; bf16 takes B in VNNI layout ([K/2][N][2], ld_b
// counted in N). The fp32 overload falls back to a BLAS call by itself where the ukernel is missing; the bf16
// VNNI one throws, so it is probed once.
void ukernel(bool bf16, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_C,
             const void* A, const void* B, float* C) {
  if (bf16) {
    cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, static_cast<const at::BFloat16*>(A),
                    static_cast<const at::BFloat16*>(B), C, true);
  } else {
    cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, static_cast<const float*>(A), static_cast<const float*>(B), C,
                    false);
  }
}

bool probe_bf16() {
#if defined(__x86_64__) && AT_MKLDNN_ENABLED()
  try {
    const at::BFloat16 a[4] = {1.f, 2.f, 3.f, 4.f}, b[4] = {1.f, 1.f, 1.f, 1.f};
    float c[2] = {0.f, 0.f};
    cpublas::brgemm(1, 2, 2, 2, 2, 2, false, a, b, c, true);
    cpublas::brgemm_release(true);
    return c[0] == 3.f && c[1] == 3.f;
  } catch (const std::exception&) {
    return false;
  }
#else
  return false;
#endif
}

bool fp32_ukernel() {
#if defined(__x86_64__) && AT_MKLDNN_ENABLED()
  return at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

// torch.backends.mkldnn.enabled = False turns the ukernel off at any time, so only the probe is cached
bool bf16_ukernel() {
  static const bool ok = probe_bf16();
  return fp32_ukernel() && ok;
}

#if defined(__x86_64__)
// gcc 12's intrinsics headers fill the unused merge operand with a self-initialised "undefined" vector
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
// One full 16 x 16 tile in registers: 32-bit, then 64-bit interleaves of row pairs leave each 128-bit lane
// holding a 4 x 4 block, and two rounds of lane shuffles gather the blocks of one output row.
__attribute__((target("avx512f"))) void transpose_tile16(const uint32_t* src, int64_t src_ld, uint32_t* dst,
                                                          int64_t dst_ld) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * src_ld);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // r[4g + q], lane l: column 4l + q of rows 4g .. 4g + 3
  for (int g = 0; g < 16; g += 4) {
    r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i lo_ab = _mm512_shuffle_i32x4(r[q], r[4 + q], 0x44);
    const __m512i hi_ab = _mm512_shuffle_i32x4(r[q], r[4 + q], 0xEE);
    const __m512i lo_cd = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0x44);
    const __m512i hi_cd = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0xEE);
    _mm512_storeu_si512(dst + q * dst_ld, _mm512_shuffle_i32x4(lo_ab, lo_cd, 0x88));
    _mm512_storeu_si512(dst + (4 + q) * dst_ld, _mm512_shuffle_i32x4(lo_ab, lo_cd, 0xDD));
    _mm512_storeu_si512(dst + (8 + q) * dst_ld, _mm512_shuffle_i32x4(hi_ab, hi_cd, 0x88));
    _mm512_storeu_si512(dst + (12 + q) * dst_ld, _mm512_shuffle_i32x4(hi_ab, hi_cd, 0xDD));
  }
}
// One full 8 x 8 tile: 32-bit interleaves of row pairs, 64-bit-wide shuffles that leave each 128-bit lane
// holding a 4 x 4 block, then one lane exchange per output row pair.
__attribute__((target("avx2"))) void transpose_tile8(const uint32_t* src, int64_t src_ld, uint32_t* dst,
                                                      int64_t dst_ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + i * src_ld));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[4h + q], lane l: column 4l + q of rows 4h .. 4h + 3
  for (int h = 0; h < 8; h += 4) {
    r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(reinterpret_cast<float*>(dst + q * dst_ld), _mm256_permute2f128_ps(r[q], r[4 + q], 0x20));
    _mm256_storeu_ps(reinterpret_cast<float*>(dst + (4 + q) * dst_ld), _mm256_permute2f128_ps(r[q], r[4 + q], 0x31));
  }
}
#pragma GCC diagnostic pop
#endif

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols, in 16 x 16 tiles of 32-bit elements, a
// full one in registers (one 512-bit tile, or four 256-bit ones). With scalar tiles only, packing a 4 MiB W_hh
// took 0.4-1.1 ms of a 4-6 ms layer forward at B = 1 (Zen 4); the register tiles took LSTM (T,B,I,H,L) =
// (100,1,128,512,2) forward from 13.5 to 12.2 ms there; on Zen 2 (AVX2, 8 x 8 tiles) the short (16,1,128,512,2)
// went from 7.7 to 6.6 ms.
void transpose32(const uint32_t* src, int64_t src_ld, uint32_t* dst, int64_t dst_ld, int64_t rows, int64_t cols) {
  constexpr int64_t kT = 16;
  const Isa isa = machine().isa;
  for (int64_t r0 = 0; r0 < rows; r0 += kT) {
    const int64_t r1 = std::min(rows, r0 + kT);
    for (int64_t c0 = 0; c0 < cols; c0 += kT) {
      const int64_t c1 = std::min(cols, c0 + kT);
#if defined(__x86_64__)
      if (r1 - r0 == kT && c1 - c0 == kT && isa != Isa::Baseline) {
        const uint32_t* s = src + r0 * src_ld + c0;
        uint32_t* d = dst + c0 * dst_ld + r0;
        if (isa == Isa::V4) {
          transpose_tile16(s, src_ld, d, dst_ld);
        } else {
          for (int64_t q = 0; q < 4; ++q) {
            const int64_t i = q / 2 * 8, j = q % 2 * 8;  // rows i.., columns j.. of the tile
            transpose_tile8(s + i * src_ld + j, src_ld, d + j * dst_ld + i, dst_ld);
          }
        }
        continue;
      }
#endif
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) dst[c * dst_ld + r] = src[r * src_ld + c];
      }
    }
  }
}

struct Layout {
  int64_t H, G, U, nb;

  // esize: the GEMM operands' element size (the layout may differ per dtype, not per thread count)
  Layout(int64_t H_, int64_t G_, int64_t esize) : H(H_), G(G_), U(unit_block(H_, G_, esize)), nb((H_ + U - 1) / U) {}
  int64_t unit(int64_t b) const { return std::min(b * U, H); }
  // w's rows (dim 0, PyTorch's gate order) in the blocked order, or back with `back`: each (block, gate)
  // is a run of whole rows, so this is G*nb row-run copies (index_select is far slower on weights). The
  // backward permutes both weights and both of their gradients per call; blocks of kCopyGrainBytes or more
  // are shared among the threads (one thread does not saturate memory). Xeon, forward + backward, two threads
  // / one (medians of 11 in-process alternations; grains of 16-256 KiB alike): LSTM (100,1,128,512) 1.06,
  // (100,8,512,512) 1.06, GRU (100,8,256,1024) 1.04; level from batch 16 ((512,16,128,128) 1.01,
  // (100,64,256,256) 0.99).
  static constexpr int64_t kCopyGrainBytes = 64 << 10;
  Tensor permute(const Tensor& w, bool back, std::optional<ScratchSlot> slot = std::nullopt) const {
    const Tensor src = w.contiguous();
    Tensor out = slot ? ws_scratch(*slot, src.sizes(), src.options()) : at::empty_like(src);
    const int64_t row = (src.dim() > 1 ? src.stride(0) : 1) * src.element_size();
    const char* from = static_cast<const char*>(src.data_ptr());
    char* to = static_cast<char*>(out.data_ptr());
    at::parallel_for(0, nb, std::max<int64_t>(1, kCopyGrainBytes / (G * U * row)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j0 = unit(b), n = unit(b + 1) - j0;
        for (int64_t k = 0; k < G; ++k) {
          const int64_t blocked = G * j0 + k * n, torch_row = k * H + j0;
          std::memcpy(to + (back ? torch_row : blocked) * row, from + (back ? blocked : torch_row) * row, n * row);
        }
      }
    });
    return out;
  }
  Tensor rows(const Tensor& w, std::optional<ScratchSlot> slot = std::nullopt) const { return permute(w, false, slot); }
  Tensor unrows(const Tensor& w) const { return permute(w, true); }

  // The ukernel's B operand from kn [K, per_unit*H] (columns in blocked order, per_unit columns per unit) as
  // one contiguous panel per unit range [unit(b), seg_end[b]) (a block or several: Segments), [K][n] fp32 or
  // [K/2][n][2] bf16 (n = per_unit * range width): a range's GEMM then streams one contiguous run of memory,
  // which the prefetchers keep up with at small M.
  Tensor panels(const Tensor& kn, int64_t per_unit, bool bf16, const std::vector<int64_t>& seg_end,
                std::optional<ScratchSlot> slot = std::nullopt) const {
    const int64_t K = kn.size(0);
    Tensor out = slot ? ws_scratch(*slot, {K * kn.size(1)}, kn.options()) : at::empty({K * kn.size(1)}, kn.options());
    for (int64_t b = 0; b < nb; b = (seg_end[b] + U - 1) / U) {
      const int64_t c0 = per_unit * unit(b), n = per_unit * seg_end[b] - c0;
      const Tensor src = kn.narrow(1, c0, n);
      Tensor dst = out.narrow(0, K * c0, K * n);
      if (bf16) {
        dst.view({K / 2, n, 2}).copy_(src.view({K / 2, 2, n}).transpose(1, 2));
      } else {
        dst.view({K, n}).copy_(src);
      }
    }
    return out;
  }
  // The same panels for the forward's x . W_ih^T and h . W_hh^T, packed straight from the weight in PyTorch's
  // layout, w [G*H, K], by a tiled transpose (at small batch the packing is a large part of a call, and
  // at::Tensor::copy_ of the transposed view ran at ~4 GB/s): the panel of unit range [s0, s1) (a block, or
  // several: Segments) holds its gates' columns in blocked order, [K][G*(s1 - s0)]; with `split` it is G
  // panels [K][n], one per gate of a single block. bf16's VNNI pairs along K move as one 32-bit element.
  Tensor gate_panels(const Tensor& w, bool bf16, bool split, const std::vector<int64_t>& seg_begin,
                     const std::vector<int64_t>& seg_end, ScratchSlot slot) const {
    const Tensor src = w.contiguous();
    const int64_t Kp = src.size(1) * src.element_size() / 4;  // 32-bit elements per weight row
    Tensor out = ws_scratch(slot, {G * H * src.size(1)}, src.options());
    const auto* from = static_cast<const uint32_t*>(src.data_ptr());
    auto* to = static_cast<uint32_t*>(out.data_ptr());
    at::parallel_for(0, nb * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / G, k = i % G, j0 = unit(b), n = unit(b + 1) - j0;
        const int64_t s0 = seg_begin[b], sw = G * (seg_end[b] - s0);
        uint32_t* panel = to + G * s0 * Kp;
        transpose32(from + (k * H + j0) * Kp, Kp, split ? panel + k * Kp * n : panel + G * (j0 - s0) + k * n,
                    split ? n : sw, n, Kp);
      }
    });
    return out;
  }
  // block j0's panel in `panels` (its leading dimension is the block's column count)
  static const void* panel(const Tensor& panels, int64_t K, int64_t per_unit, int64_t j0) {
    return static_cast<const char*>(panels.data_ptr()) + K * per_unit * j0 * panels.element_size();
  }
};

// The team's per-step barrier. It spins only briefly and then yields the core: on a loaded machine the
// partner being waited for may be queued behind this very thread, and OpenMP's long default spin then turns
// each of the thousands of per-step barriers into a scheduler time slice.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int i = 0; gen_.load(std::memory_order_acquire) == gen; ++i) {
      if (i < kSpins) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  // a few microseconds: about what a step's GEMM takes at the smallest sizes that still run threaded
  static constexpr int kSpins = 4000;
  static void pause() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

// The threads of one engine region and the units [ja, jb) each owns (whole blocks).
struct Team {
  const Layout& L;
  int nt;
  explicit Team(const Layout& layout) : L(layout) {
    // nested inside someone's parallel region: run serially rather than oversubscribe
    const int64_t want = at::in_parallel_region() ? 1 : at::get_num_threads();
    nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, L.nb)));
  }
  std::pair<int64_t, int64_t> units(int tid) const { return {L.unit(L.nb * tid / nt), L.unit(L.nb * (tid + 1) / nt)}; }

  // Runs body(tid, ja, jb, step, phase) for every step and phase on every thread, with a barrier after each
  // phase except a step's last unless sync_last. An exception on one thread stops the work but not the
  // barriers (a thread leaving early would hang the others) and is rethrown once the region ends.
  template <class Body>
  void run(int64_t steps, int phases, bool sync_last, bool bf16, Body&& body) const {
    std::exception_ptr error;
    std::atomic<bool> failed{false};
    std::mutex m;
    Barrier barrier(nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      const int tid = nt > 1 ? omp_get_thread_num() : 0;
      const auto [ja, jb] = units(tid);
      for (int64_t s = 0; s < steps; ++s) {
        for (int ph = 0; ph < phases; ++ph) {
          if (ja < jb && !failed.load(std::memory_order_relaxed)) {
            try {
              body(tid, ja, jb, s, ph);
            } catch (...) {
              const std::lock_guard<std::mutex> lock(m);
              if (!error) error = std::current_exception();
              failed = true;
            }
          }
          if (ph + 1 < phases || sync_last) barrier.wait();
        }
      }
      if (bf16) cpublas::brgemm_release(true);
    }
    if (error) std::rethrow_exception(error);
  }
};

// Unit ranges whose per-step GEMMs run as one ukernel call on one packed panel (the forward's x . W_ih^T and
// h . W_hh^T, the backward's dh): each thread's whole range where its tiles stay within kGroupBytes and its
// panel within half the L2, else every unit block alone. Fewer, wider calls: RNN forward at (T,B,I,H) =
// (512,16,128,128) 4.8 -> 4.0 ms (Zen 4, two threads, 64 units each instead of two 32-unit blocks). A panel
// that does not stay in L2 streams from L3, and as one call (the ukernel walks its column blocks down rows a
// whole panel wide) it streamed slower than as its blocks' calls (each a contiguous run): Zen 2, B = 1,
// forward, LSTM (100,1,128,512,2) 26.7 against 16.0 ms (a 2 MiB panel per thread), RNN (100,1,128,1024,1) 6.4
// against 5.3. Half the L2, not all of it: on the Xeon (2 MiB L2) panels of 1.5-2 MiB ran faster as blocks,
// grouped time / per-block time, medians of 15 in-process alternations: RNN forward (100,B,I,1024) at (B, I) =
// (2, 128) / (4, 128) / (8, 256) 1.19 / 1.15 / 1.43, (100,16,128,768) 1.10; LSTM forward + backward (the dh
// panels) (100,8,512,512) 1.10-1.11, (100,16,512,512) 1.08-1.09, (100,1,128,512) 1.03, (100,64,512,512) level
// (never grouped: its tiles); level where a panel fits half the L2 ((512,16,128,128) every cell, RNN
// (100,8,512,512)).
constexpr int64_t kGroupBytes = 64 * 1024;
struct Segments {
  std::vector<int64_t> begin, end;  // per block: the range it belongs to
  int64_t U, widest = 0;
  // unit_bytes: a unit's share of the widest panel the ranges' calls read (K * columns per unit * esize)
  Segments(const Layout& L, const Team& team, int64_t rows, int64_t unit_bytes, bool group)
      : begin(L.nb), end(L.nb), U(L.U) {
    for (int tid = 0; tid < team.nt; ++tid) {
      const auto [ja, jb] = team.units(tid);
      group = group && rows * L.G * (jb - ja) * 4 <= kGroupBytes && unit_bytes * (jb - ja) <= machine().l2 / 2;
    }
    for (int64_t b = 0; b < L.nb; ++b) {
      begin[b] = L.unit(b);
      end[b] = L.unit(b + 1);
    }
    for (int tid = 0; group && tid < team.nt; ++tid) {
      const auto [ja, jb] = team.units(tid);
      for (int64_t b = ja / L.U; b * L.U < jb; ++b) {
        begin[b] = ja;
        end[b] = jb;
      }
    }
    for (int64_t b = 0; b < L.nb; ++b) widest = std::max(widest, end[b] - begin[b]);
  }
  // f(s0, s1) for each range within a thread's units [ja, jb), first to last or, `backwards`, last to first: a
  // step that starts on the panels the step before read last finds them still in L2 (engine_fwd says more)
  template <class F>
  void walk(int64_t ja, int64_t jb, bool backwards, F&& f) const {
    if (backwards) {
      for (int64_t s1 = jb; s1 > ja; s1 = begin[(s1 - 1) / U]) f(begin[(s1 - 1) / U], s1);
    } else {
      for (int64_t s0 = ja; s0 < jb; s0 = end[s0 / U]) f(s0, end[s0 / U]);
    }
  }
};

// A forward weight (W_ih or W_hh) as the ukernel's B operand, K x G*H, and its per-step GEMM over one
// segment. A block panel over kSplitBytes is split by gate (and its blocks are never grouped): with the
// panels streaming from L3 (a thread's blocks outgrow L2), one [K][w] GEMM per gate ran at 108 GF/s per core
// where one [K][G*w] GEMM ran at 95 (Zen 4, fp32, M = 64, K = 1024, w = 32); at K <= 512 both run at 114.
struct StepWeight {
  const Layout& L;
  int64_t K;
  bool bf16, split;
  Tensor panels;
  static bool splits(const Layout& L, int64_t K, int64_t esize) {
    return L.G > 1 && K * L.G * L.U * esize > kSplitBytes;
  }
  StepWeight(const Layout& layout, const Tensor& w, bool bf16_, const Segments& seg, ScratchSlot slot)
      : L(layout), K(w.size(1)), bf16(bf16_), split(splits(L, K, w.element_size())),
        panels(L.gate_panels(w, bf16_, split, seg.begin, seg.end, slot)) {}
  // C[:M, :G*(s1-s0)] = A[:M, :K] . W^T[:, columns of segment [s0, s1)] (C's row stride ldc, A's lda)
  void gemm(int64_t M, const void* A, int64_t lda, int64_t s0, int64_t s1, float* C, int64_t ldc) const {
    const void* B = Layout::panel(panels, K, L.G, s0);
    const int64_t width = s1 - s0;
    if (!split) {
      ukernel(bf16, M, L.G * width, K, lda, L.G * width, ldc, false, A, B, C);
      return;
    }
    for (int64_t k = 0; k < L.G; ++k) {
      ukernel(bf16, M, width, K, lda, width, ldc, false, A,
              static_cast<const char*>(B) + K * k * width * panels.element_size(), C + k * width);
    }
  }
};

int64_t g_in_place_share = 0;  // set_in_place_share's

// 8 fp32 lanes, one AVX2 register (AVX-512 runs them at half width: the product is bound by reading W_hh,
// not by arithmetic). A wider vector than the target's registers is split by gcc through the stack.
// aligned(4): loads at any row offset.
typedef float Lanes __attribute__((vector_size(32), aligned(4), may_alias));
constexpr int64_t kLanes = 8;

// out[i * os] = a[:K] . w[i * ws, :K] for i < NR, the lanes summed once at the end. Separate multiply and add,
// as everywhere in fastrnn's CPU code (-ffp-contract=off). Named accumulators: an array of them would live on
// the stack (gcc scalarises arrays before it unrolls the loops that index them), which ran 3x slower.
template <int NR>
inline void dot_tile(int64_t K, const float* a, const float* w, int64_t ws, float* out, int64_t os) {
  static_assert(NR >= 1 && NR <= 4, "four accumulators");
  auto lanes = [](const float* p) -> const Lanes& { return *reinterpret_cast<const Lanes*>(p); };
  // rows past the tile's point at its first (never read): no pointer past the end of W_hh
  const float *w0 = w, *w1 = NR > 1 ? w + ws : w, *w2 = NR > 2 ? w + 2 * ws : w, *w3 = NR > 3 ? w + 3 * ws : w;
  Lanes acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    const Lanes& av = lanes(a + k);
    acc0 += lanes(w0 + k) * av;
    if constexpr (NR > 1) acc1 += lanes(w1 + k) * av;
    if constexpr (NR > 2) acc2 += lanes(w2 + k) * av;
    if constexpr (NR > 3) acc3 += lanes(w3 + k) * av;
  }
  const Lanes acc[4] = {acc0, acc1, acc2, acc3};
  for (int i = 0; i < NR; ++i) {
    float sum[kLanes];
    std::memcpy(sum, &acc[i], sizeof sum);
    for (int64_t n = kLanes / 2; n > 0; n /= 2) {
      for (int64_t l = 0; l < n; ++l) sum[l] += sum[l + n];
    }
    for (int64_t kk = k; kk < K; ++kk) sum[0] += w[i * ws + kk] * a[kk];
    out[i * os] = sum[0];
  }
}

// One unit block's gates from W_hh's rows [k*H + j0, k*H + j0 + n) for each gate k (w points at gate 0's first),
// dotted with h: out[k * n + u], the block's tile. A tile reads up to four rows at once from different gates
// (or, with one gate, neighbouring rows), so each stream runs through a gate's n * H contiguous floats in order:
// tiles of neighbouring rows of one gate made streams of one row each (2 KiB at H = 512) that the prefetchers
// never caught up with (slower than the panels).
void dot_block(int64_t G, int64_t H, int64_t K, int64_t n, const float* a, const float* w, float* out) {
  if (G == 1) {
    int64_t u = 0;
    for (; u + 4 <= n; u += 4) dot_tile<4>(K, a, w + u * K, K, out + u, 1);
    for (; u < n; ++u) dot_tile<1>(K, a, w + u * K, K, out + u, 1);
    return;
  }
  const int64_t gate = H * K;  // from a gate's row of unit j to the next gate's
  for (int64_t u = 0; u < n; ++u) {
    const float* wu = w + u * K;
    if (G == 4) {
      dot_tile<4>(K, a, wu, gate, out + u, n);
    } else if (G == 3) {
      dot_tile<3>(K, a, wu, gate, out + u, n);
    } else {
      for (int64_t k = 0; k < G; ++k) dot_tile<1>(K, a, wu + k * gate, gate, out + k * n + u, n);
    }
  }
}

// W_hh as it lies, and the step's h_{t-1} . W_hh^T over one segment from it (the tile StepWeight::gemm writes).
// Taken instead of StepWeight's panels at one row per step (B = 1) in fp32 for a single row (one_row_engine), and
// where a thread's share of W_hh fills at least half its L2: the step is then a matrix-vector product streaming
// W_hh from L3 or memory, as fast from either layout, and packing the panels (a transpose of all of W_hh per
// call) is pure cost. Forward, two
// threads, panels against in place (medians of 15 calls, two to three alternating runs): AVX2 (Zen 4 capped)
// LSTM (T,B,I,H,L) = (100,1,128,512,2) 9.7-10.0 -> 8.3-8.7 ms, (200,1,256,512,1) 9.0-9.2 -> 7.2-7.4, GRU 6.6-7.4
// -> 5.7; AVX-512 LSTM (100,1,256,1024,1) 16.1-16.7 -> 13.4-14.0, (100,1,128,512,2) level. Where the share fits
// the L2 the panels stay there and win: GRU (200,1,256,256,1) AVX2 1.6-1.7 against 2.2 ms, LSTM (512,1,128,128,1)
// AVX-512 1.57 against 1.67-1.75. At B = 2 in place was level, at B = 3 and 4 12-18 % slower.
struct DotWeight {
  const Layout& L;
  Tensor w;  // [G*H, K] fp32, PyTorch's gate order: W_hh (K = H), or W_ih (K = I) at one or two rows
  int64_t K;
  static bool takes(const Layout& L, const Team& team, int64_t B, int64_t N, bool bf16) {
    const int64_t share = g_in_place_share > 0 ? g_in_place_share : machine().l2 / 2;
    return !bf16 && B == 1 && (N == 1 || L.G * L.H * L.H * static_cast<int64_t>(sizeof(float)) >= team.nt * share);
  }
  // W_ih too, for the step's x_t . W_ih^T, where W_hh is read in place and the call has at most kRowsX rows:
  // packing W_ih into panels for a projection up front pays from four. Forward at B = 1, two threads, us, in place
  // against packed (two runs), AVX-512: T = 2 LSTM (I, H) = (65, 512) 88-90 against 100-137, GRU (512, 512)
  // 102-113 / 134-154, RNN (256, 1024) 91 / 126-142; T = 4 level (155-160 / 157-205); T = 8 5-15 % slower.
  static constexpr int64_t kRowsX = 2;
  DotWeight(const Layout& layout, const Tensor& weight) : L(layout), w(weight.contiguous()), K(w.size(1)) {}
  // C[0, :G*(s1-s0)] = h . W^T[:, columns of segment [s0, s1)] for one row h [K], its blocks last to first where
  // `backwards` (engine_fwd's odd steps)
  void gemv(const void* h, int64_t s0, int64_t s1, float* C, bool backwards) const {
    const auto* a = static_cast<const float*>(h);
    const float* wp = w.data_ptr<float>();
    const int64_t nb = (s1 - s0 + L.U - 1) / L.U;
    run_at(machine().isa, [&](auto) {
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t j0 = s0 + (backwards ? nb - 1 - i : i) * L.U, n = std::min(j0 + L.U, s1) - j0;
        dot_block(L.G, L.H, K, n, a, wp + j0 * K, C + L.G * (j0 - s0));
      }
    });
  }
};

char* at_row(const Tensor& t, int64_t row, int64_t col = 0) {
  return static_cast<char*>(t.data_ptr()) + (row * t.stride(0) + col) * static_cast<int64_t>(t.element_size());
}

// The backward's big products on the ukernel: dx = dgates . W_ih and the weight gradients as their transposes,
// dW^T[:, c] += [x | h_prev]^T . dgates[:, c] for 32-column panels c of dgates. W_ih is packed once per call
// into 32-column panels [GH][32]; per chunk each thread packs its own panels of the chunk's dgates ([R][32]
// each, contiguous: the ukernel walks K = R down a panel) and a share of [x | h_prev]^T ([I + H, R]); after a
// barrier it runs its panels against all of [x | h_prev]^T in 64-row calls, and dx for its share of the rows,
// 64 rows by 512 of K at a time (the A block then stays in L2). Taken where oneDNN's matmul does not run fp32
// (no AVX-512: torch refuses it there) and MKL's sgemm is left. Zen 2, two threads, R = 1024 rows, (I, G*H) =
// (512, 2048), (256, 4096), (1024, 4096): the weight gradients ran at 164-171 GF/s with the packing (190-195
// without) where MKL ran them, with the transposed dgates, at 127-143; dx at 165-196 GF/s (MKL 149-153). The
// panels are 32 columns wide: oneDNN's AVX2 ukernel ran 64-column panels at 143-149. Each call also packs
// W_ih, zeroes dW^T and transposes it back: about three passes over the weights, which a few hundred rows repay;
// from kBigProductRows. Zen 2, LSTM (100,1,128,512,2) forward + backward (100 rows per layer): 0.88x torch.nn
// with these products, 0.98x without. Not on an Intel CPU, where MKL's sgemm runs its kernels for that CPU: on
// the Xeon capped to AVX2, forward + backward, time with the ukernel's products / with seq.cpp's gemm() (there
// oneDNN's AVX2 matmul | at::mm, MKL's AVX2 kernels, as on an Intel CPU without AVX-512, where torch's oneDNN
// matmul refuses fp32), medians of 15 in-process alternations: LSTM (100,64,256,1024) 1.04 | 1.04,
// (100,64,512,512) 1.05-1.07 | 1.06, (100,16,512,512) 1.06-1.07 | 1.05, GRU (100,64,256,256) 1.05 | 1.07,
// (100,8,256,1024) 1.16 | 1.13; LSTM (512,16,128,128) level.
constexpr int64_t kBigProductRows = 512;
// whether the rule above puts a long call's products on the ukernel here (what the report names)
bool ukernel_products() {
  return machine().isa != Isa::V4 && !intel_rules() && fp32_ukernel();
}
struct BigProducts {
  static constexpr int64_t kPanel = 32, kRows = 64, kDepth = 512;
  const Problem& pr;
  const Team& team;
  int64_t GH, K;     // K = I + H: the rows of dW^T
  Tensor dwt;        // [I + H, G*H] fp32: dW_ih^T over dW_hh^T, in the engine's column order
  Tensor pack_x, pack_h;  // the chunk's dgates (and GRU's dgh) as panels, [G*H / 32][R][32] (the last narrower)
  Tensor states_t;        // [I + H, rmax]: x^T over h_prev^T
  Tensor w_panels;        // W_ih in the engine's row order as panels [I / 32][G*H][32] (the last narrower)
  Tensor dx;              // [N, I], undefined without need_dx

  static bool takes(const Problem& p, const Tensor& x) {
    return x.scalar_type() == at::kFloat && p.N >= kBigProductRows && ukernel_products();
  }
  BigProducts(const Problem& p, const Team& t, int64_t rmax, const Tensor& w_ih, const Tensor& dx_)
      : pr(p), team(t), GH(p.G * p.H), K(p.I + p.H),
        dwt(ws_scratch(kWsDwT, {K, GH}, at::TensorOptions(at::kFloat)).zero_()),
        pack_x(ws_scratch(kWsPackGx, {rmax * GH}, at::TensorOptions(at::kFloat))),
        pack_h(p.gru ? ws_scratch(kWsPackGh, {rmax * GH}, at::TensorOptions(at::kFloat)) : pack_x),
        states_t(ws_scratch(kWsStatesT, {K, rmax}, at::TensorOptions(at::kFloat))),
        dx(dx_.numel() > 0 ? dx_ : Tensor()) {
    if (!dx.defined()) return;
    w_panels = ws_scratch(kWsPanelDx, {GH * p.I}, at::TensorOptions(at::kFloat));
    const int64_t nq = (p.I + kPanel - 1) / kPanel;
    at::parallel_for(0, nq, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t c0 = q * kPanel, w = std::min(kPanel, p.I - c0);
        float* dst = w_panels.data_ptr<float>() + c0 * GH;
        for (int64_t k = 0; k < GH; ++k) std::memcpy(dst + k * w, at_row(w_ih, k, c0), w * sizeof(float));
      }
    });
  }

  // The chunk of rows [lo, lo + R): gx, gh [R, G*H] its dgates; hprev [R, H] its h_prev rows where defined
  // (packed), else they are y's rows one step back (forward: before; reverse: after), h0's at the first step.
  void add(int64_t lo, int64_t R, bool reverse, const Tensor& gx, const Tensor& gh, const Tensor& x, const Tensor& y,
           const Tensor& h0, const Tensor& hprev) {
    const int64_t np = (GH + kPanel - 1) / kPanel, I = pr.I, H = pr.H, B = pr.B;
    float* st = states_t.data_ptr<float>();
    team.run(1, 2, false, false, [&](int tid, int64_t, int64_t, int64_t, int phase) {
      const int nt = team.nt;
      const int64_t p0 = np * tid / nt, p1 = np * (tid + 1) / nt;
      if (phase == 0) {
        for (const Tensor* g : {&gx, &gh}) {
          float* pack = (g == &gx ? pack_x : pack_h).data_ptr<float>();
          for (int64_t p = p0; p < p1 && (g == &gx || pr.gru); ++p) {
            const int64_t c0 = p * kPanel, w = std::min(kPanel, GH - c0);
            for (int64_t r = 0; r < R; ++r) {
              std::memcpy(pack + c0 * R + r * w, at_row(*g, r, c0), w * sizeof(float));
            }
          }
        }
        // this thread's columns of x^T's and h_prev^T's sources
        auto share = [&](int64_t n) { return std::make_pair(n * tid / nt, n * (tid + 1) / nt); };
        const auto [xa, xb] = share(I);
        transpose32(reinterpret_cast<const uint32_t*>(at_row(x, lo, xa)), x.stride(0),
                    reinterpret_cast<uint32_t*>(st + xa * R), R, R, xb - xa);
        const auto [ha, hb] = share(H);
        uint32_t* ht = reinterpret_cast<uint32_t*>(st + (I + ha) * R);
        auto rows_t = [&](const Tensor& src, int64_t row, int64_t at_col, int64_t n) {
          transpose32(reinterpret_cast<const uint32_t*>(at_row(src, row, ha)), src.stride(0), ht + at_col, R, n, hb - ha);
        };
        if (hprev.defined()) {
          rows_t(hprev, 0, 0, R);
        } else {
          const DenseHprev d = dense_hprev(pr, reverse, lo, R);
          if (d.h0_at >= 0) rows_t(h0, 0, d.h0_at, B);
          if (d.from_y > 0) rows_t(y, d.y_row, d.y_at, d.from_y);
        }
        return;
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c0 = p * kPanel, w = std::min(kPanel, GH - c0);
        for (int64_t m0 = 0; m0 < K; m0 += kRows) {
          const int64_t m = std::min(kRows, K - m0);
          // rows of x^T take dgx; rows of h_prev^T dgh (GRU's differs in n); a block spanning both is split
          const int64_t split = m0 < I && m0 + m > I ? I - m0 : m;
          for (int64_t a = m0, n = split; a < m0 + m; a += n, n = m0 + m - a) {
            const float* pack = (a < I ? pack_x : pack_h).data_ptr<float>() + c0 * R;
            ukernel(false, n, w, R, R, w, GH, true, st + a * R, pack, dwt.data_ptr<float>() + a * GH + c0);
          }
        }
      }
      if (!dx.defined()) return;
      const int64_t r0 = R * tid / nt, r1 = R * (tid + 1) / nt;
      for (int64_t m0 = r0; m0 < r1; m0 += kRows) {
        const int64_t m = std::min(kRows, r1 - m0);
        for (int64_t k0 = 0; k0 < GH; k0 += kDepth) {
          const int64_t kd = std::min(kDepth, GH - k0);
          for (int64_t q0 = 0; q0 < I; q0 += kPanel) {
            const int64_t w = std::min(kPanel, I - q0);
            ukernel(false, m, w, kd, GH, w, dx.stride(0), k0 > 0, at_row(gx, m0, k0),
                    w_panels.data_ptr<float>() + q0 * GH + k0 * w, reinterpret_cast<float*>(at_row(dx, lo + m0, q0)));
          }
        }
      }
    });
  }

  // dW_ih and dW_hh in the engine's row order, into the given [G*H, I] and [G*H, H] tensors
  void finish(Tensor& dw_ih, Tensor& dw_hh) const {
    const auto* src = reinterpret_cast<const uint32_t*>(dwt.data_ptr<float>());
    transpose32(src, GH, reinterpret_cast<uint32_t*>(dw_ih.data_ptr<float>()), pr.I, pr.I, GH);
    transpose32(src + pr.I * GH, GH, reinterpret_cast<uint32_t*>(dw_hh.data_ptr<float>()), pr.H, pr.H, GH);
  }
};

Dtype seq_dtype(const Tensor& x) { return x.scalar_type() == at::kBFloat16 ? Dtype::BF16 : Dtype::F32; }

}  // namespace

// A single row without gradients (T = B = 1: a step of generation) takes the engine in fp32 from kOneRowBytes of
// weights (fp32, W_ih and W_hh), reading both weights in place (DotWeight): at::mm's matrix-vector products
// run on one thread (MKL's generic kernels on AMD), the engine's threads each stream their share of the rows.
// One step at (I, H), two threads, us, engine against at::mm (ranges of two runs), AVX-512 | capped to AVX2: GRU
// (65, 512) 45-60 against 90-92 | 47-48 against 92-93, LSTM (256, 1024) 198-202 / 656-716 | 206-223 / 1183-1187,
// RNN (512, 512) 32-42 / 60 | 33 / 62, LSTM (256, 256) 33-37 / 69-71 | 33-34 / 71-77, GRU (128, 128) 17-18 /
// 20-24 | 18-20 / 21-23; below 256 KiB level or up to 1.5 us slower: RNN (128, 128) 15 / 14 | 15 / 14, GRU (64,
// 64) 15-18 / 14-16 | 15 / 15. A two-layer module at (I, H) = (65, 512), one step: RNN 115-137 against 147-148
// us, GRU 164-199 / 315-317, LSTM 196-223 / 392-440 on AVX-512.
constexpr int64_t kOneRowBytes = int64_t{256} << 10;

static bool one_row_engine(const Problem& pr, const at::Tensor& x, bool training) {
  return !training && x.scalar_type() == at::kFloat && pr.G * pr.H * (pr.I + pr.H) * int64_t{4} >= kOneRowBytes;
}

// What the call is refused for regardless of its rows comes first, so that a call refused with and without
// gradients names the same reason.
std::string engine_refusal(const Problem& pr, const at::Tensor& x, bool training) {
  if (!x.is_cpu()) return "not a CPU tensor";
  if (pr.proj) return "proj_size";
  if (x.scalar_type() == at::kFloat) {
    if (!fp32_ukernel()) return "no oneDNN ukernel (or torch.backends.mkldnn off)";
  } else if (x.scalar_type() == at::kBFloat16) {
    if (pr.H % 2) return "odd H (bf16 pairs along K)";
    if (!bf16_ukernel()) return "no bf16 ukernel on this CPU";
  } else {
    return std::string(c10::toString(x.scalar_type())) + " storage";
  }
  const int64_t from = engine_rows(pr, training);
  if (pr.N >= from) {
    const int64_t steps = training ? train_steps(pr) : infer_steps(pr);
    if (pr.T >= steps || (!training && engine_in_place(pr, x) == 2)) return "";
    const std::string where = " at batch " + std::to_string(pr.B) + " without gradients (on an Intel CPU)";
    return "fewer than " + std::to_string(steps) + " steps" + (training ? " in training" : where);
  }
  if (pr.N == 1) {
    if (one_row_engine(pr, x, training)) return "";
    return training ? "a single row (T*B)" : "a single row (T*B) of weights under 256 KiB (or not fp32)";
  }
  return "fewer than " + std::to_string(from) + " rows (T*B)" +
         (training ? " in training" : " (weights under 1 MiB, not AVX-512)");
}

bool engine_takes(const Problem& pr, const at::Tensor& x, bool training) {
  return engine_refusal(pr, x, training).empty();
}

bool engine_projects_in_step(const Problem& pr, const at::Tensor& x) {
  if (x.scalar_type() == at::kBFloat16 && pr.I % 2) return false;  // no VNNI panels of W_ih: one GEMM up front
  const Layout L(pr.H, pr.G, x.element_size());
  const Machine& m = machine();
  const bool intel = intel_rules();
  const int64_t bytes = (pr.I + pr.H) * pr.G * pr.H * static_cast<int64_t>(x.element_size());
  const bool near = bytes <= (intel ? Team(L).nt * m.l2 : m.l3);
  return near ? pr.B >= kFuseRows : intel && pr.B >= kFuseRowsBeyondL2;
}

int engine_in_place(const Problem& pr, const at::Tensor& x) {
  const Layout L(pr.H, pr.G, x.element_size());
  if (!DotWeight::takes(L, Team(L), pr.B, pr.N, x.scalar_type() == at::kBFloat16)) return 0;
  return pr.N <= DotWeight::kRowsX ? 2 : 1;
}

void set_in_place_share(int64_t bytes) { g_in_place_share = std::max<int64_t>(0, bytes); }
void set_engine_steps(int64_t steps) { g_engine_steps = std::max<int64_t>(0, steps); }
void set_intel_rules(int64_t on) { g_intel_rules = on < 0 ? -1 : on > 0 ? 1 : 0; }
bool intel_rules_on() { return intel_rules(); }

// machine() for the reports, which must not throw: nullptr (and the reason) under an unknown FASTRNN_CPU_ISA,
// which the first CPU call reports too
static const Machine* reported_machine(std::string* why = nullptr) {
  try {
    return &machine();
  } catch (const c10::Error& e) {
    if (why) *why = e.msg();
    return nullptr;
  }
}

std::string engine_machine() {
  std::string why;
  const Machine* known = reported_machine(&why);
  if (!known) return why;
  const Machine& m = *known;
  auto kib = [](int64_t b) { return b >= (int64_t{1} << 20) && b % (int64_t{1} << 20) == 0
                                        ? std::to_string(b >> 20) + " MiB" : std::to_string(b >> 10) + " KiB"; };
  return std::string("L2 ") + kib(m.l2) + " per core, L3 " + kib(m.l3) + "; " +
         (m.isa == Isa::V4 ? "unit blocks of 32-128 (panels within half the L2)" : "32-unit blocks (not AVX-512)") +
         "; x . W_ih^T in the step from " + std::to_string(kFuseRows) +
         " rows per step where W_ih and W_hh fit " +
         (intel_rules() ? "the threads' L2s, from " + std::to_string(kFuseRowsBeyondL2) + " where not; "
                  : std::string("the L3; ")) +
         (intel_rules() ? "without gradients from " + std::to_string(kInferStepsFew) + " steps (" +
                        std::to_string(kInferSteps) + " from batch " + std::to_string(kInferMidRows) +
                        " or under 1 MiB of weights, " + std::to_string(kInferStepsWide) + " from batch " +
                        std::to_string(kInferWideRows) + ", the Intel CPU rules); "
                  : std::string("without gradients whatever the steps (not an Intel CPU); ")) +
         "W_hh read in place at one row per step where a thread's "
         "share fills half the L2 or the call has a single row, W_ih too at one or two rows";
}

std::vector<std::pair<std::string, std::string>> engine_report() {
  auto fused = [](const std::string& how, const std::string& fewer) {
    return "fused per-step oneDNN brgemm ukernel + cell" + how + " from " + std::to_string(kInferRows) +
           " rows (T*B) without gradients (off AVX-512 where the weights reach 1 MiB, else " +
           std::to_string(kTrainRows) + "; on an Intel CPU over " + std::to_string(kInferStepsWide) + "-" +
           std::to_string(kInferStepsFew) + " steps by batch), from " + std::to_string(kTrainRows) + " rows and " +
           std::to_string(kTrainSteps) + " steps with them (" + std::to_string(kTrainStepsWide) + " steps of " +
           std::to_string(kTrainWideRows) + " rows); fewer" + fewer;
  };
  const Machine* m = reported_machine();
  const std::string big = "; dx and weight gradients: " +
                          (m && ukernel_products() ? "the brgemm ukernel from " + std::to_string(kBigProductRows) +
                                                  " rows (fewer: " + big_gemm_engine(at::kFloat) + ")"
                                            : big_gemm_engine(at::kFloat));
  return {{"float32", (fp32_ukernel() ? fused("", ": at::mm per step, but a single row without gradients takes the "
                                                  "engine from " + std::to_string(kOneRowBytes >> 10) +
                                                  " KiB of weights")
                                      : "at::mm per step + pointwise cell") + big},
          {"bfloat16", bf16_ukernel() ? fused(" (bf16 VNNI, fp32 state)", " or odd H: the float32 path")
                                      : "the float32 path, rounding outputs to bfloat16"},
          {"float16", "the float32 path, rounding outputs to float16"},
          {"float64", "at::mm per step + pointwise cell"}};
}

struct StepGemm::Impl {
  int64_t K;
  Layout L;
  Team team;
  Tensor panels;
  Impl(const Tensor& w_kn)
      : K(w_kn.size(0)), L(w_kn.size(1), 1, 4), team(L),
        panels(L.panels(w_kn.to(at::kFloat), 1, false, Segments(L, team, 0, 0, false).end)) {}
};

bool StepGemm::takes(const Tensor& x) { return x.is_cpu() && x.scalar_type() == at::kFloat && fp32_ukernel(); }
StepGemm::StepGemm(const Tensor& w_kn) : impl_(new Impl(w_kn)) {}
StepGemm::~StepGemm() { delete impl_; }
int StepGemm::threads() const { return impl_->team.nt; }
std::pair<int64_t, int64_t> StepGemm::cols(int tid) const { return impl_->team.units(tid); }

void StepGemm::run(int tid, int64_t M, const float* A, int64_t lda, float* C, int64_t ldc, bool add,
                   bool backwards) const {
  const Impl& m = *impl_;
  const auto [ja, jb] = cols(tid);
  const int64_t nb = (jb - ja + m.L.U - 1) / m.L.U;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t j0 = ja + (backwards ? nb - 1 - i : i) * m.L.U, w = std::min(m.L.U, jb - j0);
    ukernel(false, M, w, m.K, lda, w, ldc, add, A, Layout::panel(m.panels, m.K, 1, j0), C + j0);
  }
}

void StepGemm::steps(int64_t n, int phases, const std::function<void(int, int64_t, int)>& body) const {
  impl_->team.run(n, phases, true, false, [&](int tid, int64_t, int64_t, int64_t s, int ph) { body(tid, s, ph); });
}

std::vector<Tensor> engine_fwd(const Problem& pr, const Tensor& x, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh, const Tensor& bias, const Tensor& b_hn,
                               bool reverse, bool save) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t H = pr.H, G = pr.G, GH = G * H, B = pr.B;
  const auto opts = x.options(), f32 = opts.dtype(at::kFloat);
  const Layout L(H, G, x.element_size());

  // x . W_ih^T on the ukernel from W_ih packed like W_hh (bf16 needs even I: VNNI pairs along K; odd I takes one
  // fp32 GEMM up front). Where kFuseRows says so it runs in the step, block by block beside h_{t-1} . W_hh^T, so
  // a block's input-side gates are computed into cache right before its cell reads them (a [N, G*H] projection
  // made up front is read back from memory, which left the LSTM's cell waiting on loads). Otherwise each thread
  // projects all rows for its own columns before its first step (only it reads them: no barrier), a block at a
  // time, so the block's panel stays in cache across the row chunks. Zen 2, LSTM (16,1,128,512,2) forward: 4.7
  // ms against 6.6 with at::mm on a permuted copy of W_ih (which MKL then packs again). At one or two rows with
  // W_hh in place, W_ih is read in place too, in the step (DotWeight::kRowsX).
  const int64_t I = pr.I;
  const bool x_panels = !bf16 || I % 2 == 0;
  const Team team(L);
  const bool fuse_x = engine_projects_in_step(pr, x);
  const bool dot_h = DotWeight::takes(L, team, B, pr.N, bf16);
  const bool dot_x = dot_h && pr.N <= DotWeight::kRowsX;
  const bool in_step_x = fuse_x || dot_x;
  const bool save_gates = save && (pr.lstm || pr.gru);
  Tensor gates = !x_panels ? gemm(x.to(at::kFloat), L.rows(w_ih, kWsRowsX).to(at::kFloat).t())
                 : save_gates || !in_step_x ? ws_empty({pr.N, GH}, f32) : Tensor();
  const int64_t esize = x.element_size();
  const Segments seg(L, team, B, std::max(H, x_panels ? I : 0) * G * esize,
                     !StepWeight::splits(L, H, esize) && !(x_panels && StepWeight::splits(L, I, esize)));
  const std::optional<StepWeight> wx =
      x_panels && !dot_x ? std::make_optional<StepWeight>(L, w_ih, bf16, seg, kWsPanelX) : std::nullopt;
  const std::optional<DotWeight> wdx = dot_x ? std::make_optional<DotWeight>(L, w_ih) : std::nullopt;
  const std::optional<StepWeight> wf =
      dot_h ? std::nullopt : std::make_optional<StepWeight>(L, w_hh, bf16, seg, kWsPanelH);
  const std::optional<DotWeight> wd = dot_h ? std::make_optional<DotWeight>(L, w_hh) : std::nullopt;
  const Tensor bias_p = L.rows(bias).to(at::kFloat);
  const Tensor bhn = pr.gru ? b_hn.to(at::kFloat).contiguous() : Tensor();
  Tensor hs = ws_empty({2, B, H}, opts);
  hs.copy_(h0.unsqueeze(0).expand({2, B, H}));  // both: reverse packed rows start from h0 in either buffer
  Tensor cs = pr.lstm ? c0.to(at::kFloat).clone(at::MemoryFormat::Contiguous) : at::empty({0}, f32);
  Tensor y = ws_empty({pr.N, H}, opts);
  const bool save_c = save && pr.lstm, save_hn = save && pr.gru;
  Tensor c_save = save_c ? ws_empty({pr.N, H}, f32) : at::empty({0}, f32);
  Tensor hn_save = save_hn ? ws_empty({pr.N, H}, f32) : at::empty({0}, f32);
  // one segment's h . W_hh^T per thread (and x . W_ih^T where no gates are kept), consumed by the cells of its
  // blocks right after the GEMMs, so they stay in cache
  const int64_t tile = B * G * seg.widest;
  Tensor tiles = ws_empty({team.nt, in_step_x && !gates.defined() ? 2 : 1, tile}, f32);
  const Dtype dt = seq_dtype(x);
  const int64_t hs_bytes = B * H * static_cast<int64_t>(hs.element_size());

  team.run(pr.T, 1, true, bf16, [&](int tid, int64_t ja, int64_t jb, int64_t k, int) {
    const int64_t t = reverse ? pr.T - 1 - k : k, b = pr.size[t], o = pr.off[t];
    float* hg = tiles.data_ptr<float>() + tid * tiles.stride(0);
    const char* h_prev = static_cast<const char*>(hs.data_ptr()) + k % 2 * hs_bytes;
    char* h_next = static_cast<char*>(hs.data_ptr()) + (k + 1) % 2 * hs_bytes;
    if (k == 0 && x_panels && !in_step_x) {
      seg.walk(ja, jb, false, [&](int64_t s0, int64_t s1) {
        for (int64_t r0 = 0; r0 < pr.N; r0 += kProjRows) {
          wx->gemm(std::min(kProjRows, pr.N - r0), at_row(x, r0), I, s0, s1,
                   reinterpret_cast<float*>(at_row(gates, r0, G * s0)), GH);
        }
      });
    }
    // Odd steps walk the thread's segments (and an in-place segment's blocks) last to first, so that a step
    // starts on the weights the previous one read last, still in L2 where the thread's share of the weights
    // outgrows the L2 (walked the same way every step, LRU evicts each panel before its next use). Xeon
    // (Emerald Rapids VM, 2 MiB L2), forward, two threads, time one way / both ways (medians of 20 in-process
    // alternations): LSTM (T,B,I,H) = (100,1,128,512) 1.22-1.24, (100,4,256,1024) 1.11, (100,8,512,512) 1.16,
    // (100,1,512,1024) 1.13, (100,64,512,512) 1.02-1.03; RNN (100,1,128,1024) 1.27 (W_hh in place: its blocks
    // reversed); GRU (100,64,512,512) 1.02; fastrnn's LayerNorm LSTM (StepGemm) (100,1,128,512) 1.27,
    // (100,8,512,512) 1.11; level where the share fits the L2 ((100,64,256,256)). The backward's dh product
    // walks so too (engine_bwd).
    const bool backwards = k % 2 == 1;
    auto segment = [&](int64_t s0, int64_t s1) {
      const int64_t sw = G * (s1 - s0);
      float* xg = gates.defined() ? reinterpret_cast<float*>(at_row(gates, o, G * s0)) : hg + tile;
      const int64_t xg_stride = gates.defined() ? GH : sw;
      if (fuse_x) wx->gemm(b, at_row(x, o), I, s0, s1, xg, xg_stride);
      if (dot_x) wdx->gemv(at_row(x, o), s0, s1, xg, backwards);
      if (dot_h) {
        wd->gemv(h_prev, s0, s1, hg, backwards);
      } else {
        wf->gemm(b, h_prev, H, s0, s1, hg, sw);
      }
      for (int64_t j0 = s0; j0 < s1;) {
        const int64_t j1 = std::min(j0 + L.U, s1), w = j1 - j0;
        float* hgb = hg + G * (j0 - s0);
        CellParams p{};
        p.gs = xg_stride;
        p.gates = xg + G * (j0 - s0);
        p.rows = b;
        p.H = H;
        p.gw = w;
        p.hg_stride = sw;
        p.hg = hgb;
        p.bias = bias_p.data_ptr<float>() + G * j0;
        p.b_hn = pr.gru ? bhn.data_ptr<float>() + j0 : nullptr;
        p.h_prev = h_prev + j0 * esize;
        p.h = h_next + j0 * esize;
        p.h_stride = H;
        p.y = at_row(y, o, j0);
        p.y_stride = H;
        if (pr.lstm) {
          p.c = cs.data_ptr<float>() + j0;
          p.c_save = save_c ? at_row(c_save, o, j0) : p.c;
        }
        if (pr.gru) {
          // unsaved, W_hn h + b_hn goes back into the tile's n block, which this step owns anyway
          p.hn_save = save_hn ? static_cast<void*>(at_row(hn_save, o, j0)) : static_cast<void*>(hgb + 2 * w);
          p.hn_stride = save_hn ? H : sw;
        }
        cell_cpu_block(pr.mode, dt, p, w);
        j0 = j1;
      }
    };
    seg.walk(ja, jb, backwards, segment);
  });

  // h_n: each sequence's last output row (a packed sequence ends at its own step), or h0 without steps
  Tensor h_n;
  if (pr.T == 0) {
    h_n = h0.clone(at::MemoryFormat::Contiguous);
  } else {
    Tensor last = at::empty({B}, at::kLong);
    int64_t* l = last.data_ptr<int64_t>();
    for (int64_t r = 0; r < B; ++r) {
      int64_t t = 0;
      if (!reverse)
        while (t + 1 < pr.T && pr.size[t + 1] > r) ++t;
      l[r] = pr.off[t] + r;
    }
    h_n = y.index_select(0, last);
  }
  Tensor c_n = pr.lstm ? cs.to(x.scalar_type()) : empty0(x);
  return {y, h_n, c_n, save_gates ? gates : at::empty({0}, f32), c_save, hn_save};
}

std::vector<Tensor> engine_bwd(const Problem& pr, const Tensor& x, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh, bool has_b_ih, bool has_b_hh, bool reverse,
                               const Tensor& y, const Tensor& gates, const Tensor& c_save, const Tensor& hn_save,
                               const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, bool need_dx) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t H = pr.H, G = pr.G, GH = G * H;
  const auto opts = x.options();
  const Layout L(H, G, x.element_size());
  const Tensor wih_p = L.rows(w_ih, kWsRowsX), whh_p = L.rows(w_hh, kWsRowsH);
  const Team team(L);
  const Segments seg(L, team, pr.B, GH * x.element_size(), true);
  const Tensor wb = L.panels(whh_p, 1, bf16, seg.end, kWsPanelDh);  // dgates . W_hh: K = G*H, a column per unit
  // dh's GEMM in K chunks of kDhChunkBytes per row, each over all the thread's blocks, once a row of dgates
  // outgrows two of them: the chunk of dgates then stays in L2 while the blocks' panels stream past it.
  // Zen 4, fp32, M = 64, K = 4096, 32-unit blocks: 105 GF/s per core in 1024-wide chunks, 87 in one pass.
  const int64_t kc = GH * x.element_size() > 2 * kDhChunkBytes ? kDhChunkBytes / x.element_size() : GH;

  const Chunks chunks = backward_chunks(pr, bf16);
  const int64_t rmax = chunks.rmax;
  Tensor dhs = dh_n.to(at::kFloat).clone(at::MemoryFormat::Contiguous);
  Tensor dcs = pr.lstm ? dc_n.to(at::kFloat).clone(at::MemoryFormat::Contiguous) : Tensor();
  const Tensor c0f = pr.lstm ? c0.to(at::kFloat).contiguous() : Tensor();
  Tensor dgx = ws_scratch(kWsDgx, {rmax, GH}, opts);
  Tensor dgh = pr.gru ? ws_scratch(kWsDgh, {rmax, GH}, opts) : dgx;
  Tensor hprev = pr.packed ? ws_empty({rmax, H}, opts) : Tensor();
  GradSums sums = grad_sums(pr, x, wih_p, whh_p, has_b_ih, has_b_hh, need_dx, rmax, true);
  std::optional<BigProducts> big;
  if (BigProducts::takes(pr, x)) big.emplace(pr, team, rmax, wih_p, sums.dx);
  // LSTM's cell backward needs c_prev (fp32), GRU's h_prev (sequence dtype): previous step's rows or initial
  const Tensor& prev_src = pr.lstm ? c_save : y;
  const Tensor& init = pr.lstm ? c0f : h0;
  const Dtype dt = seq_dtype(x);
  const int64_t esize = x.element_size();

  for_each_chunk(pr, chunks, reverse, [&](int64_t ta, int64_t tb) {
    const int64_t lo = pr.off[ta], R = pr.off[tb] - lo;
    // phase 0: cell backward of own units; barrier; phase 1: dh_{t-1}[:, own units] from every unit's dgates
    team.run(tb - ta, 2, false, bf16, [&](int, int64_t ja, int64_t jb, int64_t s, int phase) {
      const int64_t t = reverse ? ta + s : tb - 1 - s, b = pr.size[t], o = pr.off[t], local = o - lo;
      if (phase == 1) {
        // Odd steps walk the chunks and ranges last to first, as the forward does its weights. The first chunk
        // a step runs writes dh (GRU's adds to the z * dh term), the others add: the order of the sum is fixed
        // per step, whatever the backward's row chunks or the threads. Xeon, forward + backward, per-block
        // panels one way / both ways (medians of 15 in-process alternations): LSTM (100,1,128,512) 1.11,
        // (100,2,512,1024) 1.06, (100,8,512,512) 0.97-1.02, (100,16,512,512) 1.01-1.02, (100,64,512,512)
        // level. (One pass over K instead of chunks would keep the sum's order on odd steps too: as fast at B
        // = 1-16, 5 % slower at (100,64,256,1024).)
        const bool backwards = t % 2 == 1;
        const int64_t nk = (GH + kc - 1) / kc;
        for (int64_t q = 0; q < nk; ++q) {
          const int64_t k0 = (backwards ? nk - 1 - q : q) * kc, k = std::min(kc, GH - k0);
          seg.walk(ja, jb, backwards, [&](int64_t s0, int64_t s1) {
            const int64_t w = s1 - s0;
            ukernel(bf16, b, w, k, GH, w, H, pr.gru || q > 0, at_row(dgh, local, k0),
                    static_cast<const char*>(Layout::panel(wb, GH, 1, s0)) + k0 * w * esize,
                    dhs.data_ptr<float>() + s0);
          });
        }
        return;
      }
      const int64_t tp = reverse ? t + 1 : t - 1;
      const bool has_prev = tp >= 0 && tp < pr.T;
      const int64_t n_prev = has_prev ? std::min(b, pr.size[tp]) : 0;
      for (int64_t j0 = ja; j0 < jb;) {
        const int64_t j1 = std::min(j0 + L.U, jb), w = j1 - j0;
        CellGradParams p{};
        p.rows = b;
        p.H = H;
        p.gw = w;
        p.gs = GH;
        p.gates = pr.lstm || pr.gru ? at_row(gates, o, G * j0) : nullptr;
        p.c = pr.lstm ? at_row(c_save, o, j0) : nullptr;
        p.hn = pr.gru ? at_row(hn_save, o, j0) : nullptr;
        p.out = at_row(y, o, j0);
        p.out_stride = H;
        if (pr.lstm || pr.gru) {
          p.init = at_row(init, 0, j0);
          p.prev = has_prev ? at_row(prev_src, pr.off[tp], j0) : p.init;
          p.prev_stride = H;
          p.n_prev = n_prev;
        }
        float* dh = dhs.data_ptr<float>() + j0;
        p.dh = dh;
        p.dh_stride = H;
        p.dy = at_row(dy, o, j0);
        p.dy_stride = H;
        p.dc = pr.lstm ? dcs.data_ptr<float>() + j0 : nullptr;
        p.dgx = at_row(dgx, local, G * j0);
        p.dgh = at_row(dgh, local, G * j0);
        p.dh_prev = dh;
        cell_cpu_block(pr.mode, dt, p, w);
        j0 = j1;
      }
      if (pr.packed) {
        for (int64_t r = 0; r < b; ++r) {
          const char* src = r < n_prev ? at_row(y, pr.off[tp] + r, ja) : at_row(h0, r, ja);
          std::memcpy(at_row(hprev, local + r, ja), src, (jb - ja) * esize);
        }
      }
    });
    flush_chunk(pr, reverse, lo, R, dgx.narrow(0, 0, R), dgh.narrow(0, 0, R), x, y, h0, hprev, wih_p, sums, !big);
    if (big) big->add(lo, R, reverse, dgx, dgh, x, y, h0, hprev);
  });
  if (big) big->finish(sums.dw_ih, sums.dw_hh);
  const auto [db_ih, db_hh] = bias_grads(sums, has_b_ih, has_b_hh, pr.gru, x);
  auto un = [&](const Tensor& t) { return t.numel() > 0 ? L.unrows(t) : t; };
  Tensor dcs_out = pr.lstm ? dcs.to(x.scalar_type()) : empty0(x);
  return {sums.dx, dhs.to(x.scalar_type()), dcs_out, un(sums.dw_ih), un(sums.dw_hh), un(db_ih), un(db_hh),
          empty0(x)};
}

}  // namespace fastrnn
