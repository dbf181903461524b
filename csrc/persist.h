// The persistent CUDA engine's plan and block program, shared by the CUDA kernels (persist_cuda.cu) and the
// CPU emulator (persist.cpp) that runs the very same phases thread by thread, so that the CPU tests exercise
// the GPU's index arithmetic, shared-memory layout, reduction order and cell calls.
//
// One launch covers a layer's whole recurrence. Block (tile, slice) owns batch rows [tile*bt, +bt) and hidden
// units [slice*U, +U) with all G gates of those units, and keeps its slice of W_hh in shared memory for the
// whole sequence. Per step (forward):
//   stage + accumulate: hg[rows, own gate columns] = h_{t-1}[rows, :] . W_hh[own rows, :]^T, over K chunks;
//   cell: cell.h's op on each (row, own unit), its G recurrent products summed from the threads' K-split partial
//   sums in shared memory in a fixed order (deterministic), in fp32, never stored;
//   barrier: among the tile's slices, at a counter in global memory (grid scheme) or the cluster's barrier
//   (slices > 1: other blocks read this step's h), or only the block's (slices == 1).
// Backward mirrors it: the cell backward of each (row, own unit) writes dgates, a barrier, then
// dh_{t-1}[rows, own units] = dgates[rows, :] . W_hh[:, own units]. c and dc are read and written only by the
// block that owns their unit; h_{t-1} and dgates cross blocks through L2 (loaded with ld.global.cg), except where
// a GEMM stages its whole K at once: a block that owns every unit puts them in its next GEMM's staged operand
// itself, and a cluster's blocks put them in each other's through distributed shared memory (exchange_peers). The
// row phase of fastrnn's own cells (below) and the backward sink's add read other blocks' hs and dh with plain
// loads: safe because the grid and cluster barriers acquire (the grid scheme's counter is waited on with acquire
// loads after a release arrival, as grid.sync fences; barrier.cluster.wait is .acquire by default), which a split
// arrive / relaxed wait would break.
// With 16-bit storage on sm_80 and later the block GEMMs may run on tensor cores (mma.sync, fp32 accumulation,
// Ws in shared memory in the instruction's fragment order); the plan chooses per shape, and the emulator runs
// the instruction lane by lane from the PTX ISA's fragment table.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "cell/dispatch.h"

#if defined(__CUDA_ARCH__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fastrnn {
namespace persist {

// 256 threads: 8 warps hide the shared-memory latency of the K loop, and 256 x 16 partial sums (16 KiB, a little
// more with the SIMT loop's padded K slices) is the reduction buffer. Each thread accumulates a 4 x 4 register
// tile (4 batch rows x 4 gate columns): 8 shared loads per 16 FMAs, where a 1 x 1 tile would be bound by
// shared-memory bandwidth at 1/4 of the FMA rate.
constexpr int kThreads = 256;
constexpr int kTileRows = 4;
constexpr int kTileCols = 4;
constexpr int kTile = kTileRows * kTileCols;
// The SIMT stage's unit of K: a chunk is a multiple of it (the plan's, up to the whole K where shared memory
// allows; a 64-row batch tile stages at least 64 x 65 floats, 16.6 KiB), a pass of the stage covers 4 rows of it,
// and it bounds the K split (ks).
constexpr int64_t kChunk = 64;
// The plan's cost model, in SM cycles: one grid-wide barrier (~1 us on a 132-SM H100/H200, from published
// cooperative-groups measurements) against the K loop's 16 FMAs per thread per K step.
constexpr int64_t kGridSyncCycles = 2000;
// A grid plan's step barrier waits only for its sync group (one direction's slices of one batch tile), and each
// member arrives with an atomic on the group's one counter, which L2 serialises: a price per member on top. Zero,
// so that kGridSyncCycles prices the whole GPU's barrier as before, until a slope fitted by the calibration (grid
// barriers over all SMs, half of them and 16) is written here.
constexpr int64_t kGridSyncMemberCycles = 0;
// A K chunk's fixed price: its operand's round trip to L2 (the loads wait for the barrier before them, the K
// loop for the loads) and two block barriers, ~500 cycles until a GPU run measures it. A backward over K = G*H
// = 1024 in 64-column chunks paid it 16 times a step; a chunk of the whole K pays it once.
constexpr int64_t kStageCycles = kGridSyncCycles / 4;
// A one-chunk K whose operand the step before's cells put in shared memory themselves (exchange_peers: the block's
// own, or pushed by its cluster's blocks): the stage loads nothing, and what it keeps of kStageCycles is its two block
// barriers, ~50 cycles each (the stores into a peer's shared memory are fire-and-forget under the K loop; unpriced).
constexpr int64_t kExchangeCycles = kStageCycles / 5;

// A Hopper thread-block cluster's barrier is the hardware's, among at most 8 SMs of one GPC, where the grid
// barrier is software (atomics in global memory, every SM polling): taken as a quarter of its cost until a GPU
// run measures it.
constexpr int64_t kClusterSyncCycles = kGridSyncCycles / 4;

// Tensor cores (sm_80 on, fp32 accumulation): mma.sync m16n8k16 for 16-bit storage, m16n8k8 in TF32 for fp32
// where torch allows TF32 for cuDNN's RNN (the one the engine replaces). Both on the block GEMM transposed,
// out^T[R, n] = Ws^T[R, K] . A^T[K, n]: the instruction's M (16) runs over the block's gate columns, of which
// there are many, its N (8) over the batch rows, of which there may be one. A warp's accumulators are
// kWarpTiles 16 x 8 tiles of 4 floats per thread: the SIMT loop's kTile registers, so the same reduction buffer.
constexpr int kWarps = kThreads / 32;
constexpr int kWarpTiles = kTile / 4;
// The unit of K staged per chunk: 8 k-steps of 16 (16 of 8 in TF32), at least one per warp when all 8 split K; a
// chunk is a multiple of it (the plan's). A staged row of kc values is padded by 8 (16-bit) or 4 (fp32), a
// stride of 4 words (mod 32), so the B fragments' rows (lane / 4) land on banks 4 * row + lane % 4: all 32 distinct.
constexpr int64_t kMmaChunk = 128;
FRNN_HD constexpr int64_t mma_stride(int64_t kc, int64_t es) { return kc + (es == 2 ? 8 : 4); }
// K of one instruction: 16 with 16-bit operands, 8 with TF32; either way 4 A and 2 B registers per lane.
FRNN_HD constexpr int64_t mma_k(int64_t es) { return es == 2 ? 16 : 8; }
// The plan's price of one warp's m16n8k16 (2048 FMAs; an m16n8k8 in TF32 is half the work at half the rate,
// and the same fragment bytes) in the SIMT loop's unit (a thread's FMA). A SIMT K step
// (16 FMAs and 8 shared loads per thread) keeps the block ~64 cycles: 8 warps x 8 loads of one wavefront each,
// so a unit is ~4 cycles. A round of 8 warps' mma takes ~48: 6 wavefronts of fragments each (one 16-byte A load
// of 4, two conflict-free B words), where the tensor cores need ~16. So ~12 units, until a GPU run measures it.
constexpr int64_t kMmaCycles = 12;

// kBlock: a block holds all of W_hh for its batch rows; kGrid: the hidden units split over blocks that meet at a
// grid barrier (cooperative launch); kCluster: split over the blocks of one thread-block cluster per batch tile,
// which meet at the cluster's barrier.
enum Scheme : int { kNone = 0, kBlock = 1, kGrid = 2, kCluster = 3 };

// The cost model's prices above, as a plan uses them: a Limits carries them, so that the calibration
// (benchmarks/persist_calibrate.py) can show the plans that measured prices would give before they are written here.
struct Costs {
  int64_t grid_sync = kGridSyncCycles, grid_sync_member = kGridSyncMemberCycles, cluster_sync = kClusterSyncCycles,
          stage = kStageCycles, mma = kMmaCycles, exchange = kExchangeCycles;
};

// The portable cluster size, the most blocks a plan puts in one cluster: larger ones need
// cudaFuncAttributeNonPortableClusterSizeAllowed and are not guaranteed to be schedulable with a block per SM.
constexpr int64_t kMaxCluster = 8;

// Limits::clusters_at_once of a device that has not said: -1 for every size.
constexpr std::array<int64_t, kMaxCluster + 1> unknown_clusters() {
  std::array<int64_t, kMaxCluster + 1> a{};
  for (int64_t& n : a) n = -1;
  return a;
}

// What the plan needs of a device.
struct Limits {
  int64_t sms = 0;    // streaming multiprocessors
  int64_t smem = 0;   // dynamic shared memory one block may opt in to, bytes
  bool cooperative = false;
  int64_t cluster = 0;  // most blocks in a thread-block cluster (sm_90 and later: kMaxCluster), 0: none
  bool mma = false;     // tensor cores (sm_80 and later): 16-bit always, fp32 only with `tf32`
  bool tf32 = false;    // torch allows TF32 for cuDNN's RNN (torch.backends.cudnn.allow_tf32 / rnn.fp32_precision)
  bool pad = true;      // the SIMT loop's strides padded where they fit (off: FASTRNN_PERSISTENT_PAD=0, to measure)
  Costs costs;          // the cost model's prices (persist.h's, unless a calibration asks for others)
  // [n]: clusters of n blocks the GPU holds at once, a block per SM (cudaOccupancyMaxActiveClusters); -1: not
  // known, taken as sms / n. A cluster's blocks share one GPC, and SMs left over in a GPC host no cluster, so
  // where a GPC's SM count is no multiple of n a GPU holds fewer (an H100's 132 SMs are 8 GPCs of uneven size).
  // Every engine kernel takes over 128 registers a thread (145 to 250: benchmarks/results/kernel_report.md), so
  // a block per SM whatever its shared memory, and this one count per size is what each launch meets.
  std::array<int64_t, kMaxCluster + 1> clusters_at_once = unknown_clusters();
};

// The clusters of n blocks that run at once on the device (Limits::clusters_at_once).
inline int64_t clusters_at_once(const Limits& lim, int64_t n) {
  const int64_t known = n >= 1 && n <= kMaxCluster ? lim.clusters_at_once[n] : -1;
  return known >= 0 ? known : lim.sms / n;
}


// What fits where, decided once per call on the host from the device's SM count and shared memory.
struct Plan {
  int scheme = kNone;
  int64_t units = 0;   // U: hidden units per block
  int64_t slices = 0;  // ceil(H / U)
  int64_t bt = 0;      // batch rows per block
  int64_t tiles = 0;   // ceil(B / bt)
  int64_t smem = 0;    // dynamic shared memory per block, bytes
  bool mma = false;    // the block GEMMs on tensor cores (fp32 storage: in TF32)
  bool pad = true;     // the SIMT loop's strides padded against bank conflicts (simt_strides)
  int64_t dirs = 1;    // directions in one launch: a bidirectional layer's two share it, each on tiles * slices
                       // blocks of its own (direction-major), where the device has the SMs for both
  int64_t kc[2] = {kChunk, kChunk};  // the K chunk each GEMM stages, forward's and backward's (make_plan)
  // forward's and backward's: a cluster's blocks write their units' part of the GEMM's operand (h_t, dgates) into
  // each other's staged operand through distributed shared memory, two of them alternating by step, instead of
  // exchanging it through L2 (plain cells, a K in one chunk, where the second fits)
  bool push[2] = {false, false};
  int64_t cost = 0;    // the cost model's price of a forward and a backward step, SM cycles
  const char* why = "";
};

// The blocks of one direction; a launch has dirs times as many, direction-major.
FRNN_HD int64_t dir_blocks(const Plan& p) { return p.tiles * p.slices; }

// The blocks that meet at a step barrier: one direction's slices of one batch tile, consecutive in the launch (a
// cluster, where the plan takes one). Nothing a block reads crosses groups: a tile's steps read only its own rows,
// and a direction only its own tensors; so the grid scheme's barrier waits only for the group too (a counter per
// group, persist_cuda.cu), and tiles and directions run apart, as the emulator runs them (persist.cpp).
FRNN_HD int64_t sync_groups(const Plan& p) { return p.dirs * p.tiles; }
FRNN_HD int64_t sync_group(const Plan& p, int64_t b) { return b / p.slices; }

// Block b of a launch: its direction and its index among that direction's blocks (owned() takes it).
struct LaunchBlock {
  int64_t dir, blk;
};
FRNN_HD LaunchBlock launch_block(const Plan& p, int64_t b) {
  const int64_t per = dir_blocks(p), dir = b / per;
  return {dir, b - dir * per};
}

// The K-split map of one block's GEMM out[bt, R] = A[bt, K] . Ws[K, R]. SIMT: items = cw * bg threads each own
// a 4 x 4 tile (columns cg + j*cw, rows bg_ + i*bg), and ks such groups split K. Tensor cores (mma): items = cw *
// bg tiles of 16 columns x 8 rows (tile j: column tile j / bg, row tile j % bg), warp w takes tiles w % wg +
// i*wg (i < kWarpTiles) of its K slice w / wg, with wg = kWarps / ks warps per slice; es: the operands' element
// size (2: 16-bit, 4: TF32 in fp32 storage). ldw, lds, ldr: the SIMT loop's shared-memory strides (simt_strides);
// kc: its K chunk (a multiple of kChunk, on the tensor cores of kMmaChunk).
struct Gemm {
  int64_t K, R, bt;
  int64_t cw, bg, items, ks;
  bool mma;
  int64_t es;
  int64_t ldw, lds, ldr;
  int64_t kc;
  int64_t stages = 1;  // staged operands: 2 where a cluster's blocks write each other's next one (Plan::push)
};

FRNN_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a / b in the phases' per-step index arithmetic, whose operands count the elements of one block's tile, chunk or
// columns (a block's plan keeps them to thousands): in 32 bits. nvcc compiles a 64-bit division as a test of the
// high words, a 32-bit division, and a subroutine of some 70 instructions for wide operands, per element of the
// staging and cell loops; these never need the subroutine (sm_90 PTX: 982 div.s64 before, 264 after).
FRNN_HD int64_t div_small(int64_t a, int64_t b) {
#if !defined(__CUDA_ARCH__)
  // the emulator checks what the GPU assumes, on every plan the tests run
  if (a < 0 || a > INT32_MAX || b <= 0 || b > INT32_MAX) throw std::out_of_range("persist: index beyond 32 bits");
#endif
  return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
}

// The SIMT loop's strides, chosen so that a warp's shared loads of one K step are free of bank conflicts (the
// 32 banks of 4 bytes serve one word each per cycle). Thread tid is (ksl, item) = (tid / items, tid % items), so
// with items < 32 a warp spans `span` K slices, each reading its own row kk of Ws and column kk of the stage:
// - Ws, ldw elements per row (>= R): a warp reads columns cg + j*cw of `span` rows. With a row stride of cw*m
//   words, m odd, row q's columns fall on banks cw*(q*m mod 32/cw) + cg: distinct for cw a power of two; for
//   other cw a stride of cw (mod 32) words puts (ksl, cg) on bank ksl*cw + cg, the lane's own for bg = 1.
//   16-bit Ws pairs columns in a word, so the rule runs on words (ceil(R / 2) per row, ceil(cw / 2) per group).
//   The pad costs (ldw - R) * K elements: 25 % at R = 4cw with cw a power of two.
// - stage, lds floats per row: rows bg_ (bg of them) and `span` columns meet on bank bg_ * (lds - kc) + column
//   (kc, the chunk, a multiple of 32): distinct with lds = kc + span while bg * span <= 32 (kc + 1 for span 1).
// - reduction buffer, ldr floats per K slice: spill's store of value e puts (ksl, item) on bank ksl*ldr + item
//   (+ e*items), the lane's own (ksl*items + item) with ldr = items (mod 32); reduce reads consecutive floats of
//   each slice. At most 31 floats per slice beyond kTile * items.
// With one K slice per warp (items a multiple of 32) no two rows meet and nothing is padded. Unpadded (`pad`
// false: ldw = R, lds = kc + 1, ldr = kTile * items) where the plan finds no room for the pads.
// tests/test_persist.py counts the phases' wavefronts per warp (bank_report, persist.cpp) on the plans' GEMMs.
FRNN_HD int64_t ksl_span(int64_t items, int64_t ks) {
  if (items % 32 == 0 || ks == 1) return 1;
  if (32 % items == 0) return 32 / items < ks ? 32 / items : ks;
  int64_t span = 1;
  for (int64_t t0 = 0; t0 < items * ks; t0 += 32) {
    const int64_t t1 = t0 + 31 < items * ks ? t0 + 31 : items * ks - 1, s = t1 / items - t0 / items + 1;
    span = s > span ? s : span;
  }
  return span;
}
// The row stride, in words, of rows of r words that a warp reads in groups of cw words from `span` rows.
FRNN_HD int64_t word_stride(int64_t r, int64_t cw, int64_t span) {
  if (span == 1) return r;
  if ((cw & (cw - 1)) == 0) {
    const int64_t m = cdiv(r, cw);
    return cw * (m % 2 ? m : m + 1);
  }
  return r + ((cw - r) % 32 + 32) % 32;
}
FRNN_HD void simt_strides(Gemm& g, bool pad) {
  const int64_t span = pad ? ksl_span(g.items, g.ks) : 1;
  g.ldw = g.es == 2 && span > 1 ? 2 * word_stride(cdiv(g.R, 2), cdiv(g.cw, 2), span) : word_stride(g.R, g.cw, span);
  g.lds = g.kc + span;
  g.ldr = kTile * g.items + (pad ? ((g.items - kTile * g.items) % 32 + 32) % 32 : 0);
}

FRNN_HD Gemm make_gemm(int64_t K, int64_t R, int64_t bt, bool mma = false, int64_t es = 4, bool pad = true,
                       int64_t kc = kChunk, int64_t stages = 1) {
  if (mma) {
    Gemm g{K, R, bt, cdiv(R, 16), cdiv(bt, 8), 0, 1, true, es, 0, 0, 0, cdiv(kc, kMmaChunk) * kMmaChunk, stages};
    g.items = g.cw * g.bg;
    while (g.items * g.ks * 2 <= kWarps && g.ks * 2 <= kMmaChunk / mma_k(es)) g.ks *= 2;
    return g;
  }
  Gemm g{K, R, bt, cdiv(R, kTileCols), cdiv(bt, kTileRows), 0, 1, false, es, 0, 0, 0, kc, stages};
  g.items = g.cw * g.bg;
  while (g.items * g.ks * 2 <= kThreads && g.ks * 2 <= kChunk) g.ks *= 2;
  simt_strides(g, pad);
  return g;
}

// Whether every thread's share fits its kTile accumulators.
FRNN_HD bool gemm_fits(const Gemm& g) {
  return g.mma ? cdiv(g.items, kWarps / g.ks) <= kWarpTiles : g.items <= kThreads;
}

// A thread's serial work per step in the plan's units (SIMT FMAs): its K loop, or its warp's mma instructions at
// `mma` units each.
FRNN_HD int64_t gemm_cycles(const Gemm& g, int64_t mma = kMmaCycles) {
  return g.mma ? cdiv(g.items, kWarps / g.ks) * cdiv(cdiv(g.K, mma_k(g.es)), g.ks) * mma : cdiv(g.K, g.ks) * kTile;
}

// Ws as stored: K x R, padded to whole 16 x mma_k tiles for the tensor cores (zeros beyond K and R).
FRNN_HD int64_t k_stored(const Gemm& g) { return g.mma ? cdiv(g.K, mma_k(g.es)) * mma_k(g.es) : g.K; }
FRNN_HD int64_t r_stored(const Gemm& g) { return g.mma ? g.cw * 16 : g.R; }

// The SIMT loop's places: thread tid's K slice and 4 x 4 tile; Ws(k, c); the staged operand's row r, column kk of
// the chunk; value e of a K slice's item in the reduction buffer.
struct SimtThread {
  int64_t ksl, item, bg0, cg;
};
FRNN_HD SimtThread simt_thread(const Gemm& g, int64_t tid) {
  const int64_t ksl = div_small(tid, g.items), item = tid - ksl * g.items, bg0 = div_small(item, g.cw);
  return {ksl, item, bg0, item - bg0 * g.cw};
}
FRNN_HD int64_t simt_w(const Gemm& g, int64_t k, int64_t c) { return k * g.ldw + c; }
FRNN_HD int64_t stage_at(const Gemm& g, int64_t r, int64_t kk) { return r * g.lds + kk; }
FRNN_HD int64_t red_at(const Gemm& g, int64_t ksl, int64_t e, int64_t item) { return ksl * g.ldr + e * g.items + item; }

// Where Ws(k, c) lives in shared memory: row-major for the SIMT loop; for the tensor cores in the order the A
// fragments take Ws^T (row c, column k), so that a lane's values of a 16 x mma_k tile are one 16-byte load
// (8 16-bit values, or 4 fp32): tile (c / 16, k / mma_k), then lane, then the value's slot in its registers.
FRNN_HD int64_t w_index(const Gemm& g, int64_t k, int64_t c) {
  if (!g.mma) return simt_w(g, k, c);
  // k, c >= 0 and mma_k a power of two: shifts and masks, where a division by the run-time mma_k was a subroutine
  const int sh = g.es == 2 ? 4 : 3;
  const int64_t kk = int64_t(1) << sh, i = c & 15, j = k & (kk - 1);
  const int64_t tile = (c >> 4) * ((g.K + kk - 1) >> sh) + (k >> sh);
  if (g.es == 4) return (tile * 32 + (i % 8) * 4 + j % 4) * 4 + i / 8 + 2 * (j / 4);
  return (tile * 32 + (i % 8) * 4 + (j % 8) / 2) * 8 + (j % 2) + 2 * (i / 8) + 4 * (j / 8);
}

// Shared memory of one block, in this order: the staged operand (SIMT: floats, bt x lds; mma: the storage type,
// bt rounded up to 8 rows x mma_stride; g.stages of them), the reduction buffer (SIMT: ks slices of ldr floats; at least, and with
// mma exactly, kThreads x kTile floats), Ws as stored (SIMT: K rows of ldw elements of the storage type, the
// forward's [H][G*U], the backward's [G*H][U]; mma: padded to 16 x mma_k tiles). The forward's and the backward's
// launches each carve their own GEMM's; the plan reserves the larger.
FRNN_HD int64_t stage_bytes(const Gemm& g) {
  return g.mma ? cdiv(g.bt, 8) * 8 * mma_stride(g.kc, g.es) * g.es : g.bt * g.lds * 4;
}
FRNN_HD int64_t red_floats(const Gemm& g) {
  return g.mma || g.ks * g.ldr < int64_t(kThreads) * kTile ? int64_t(kThreads) * kTile : g.ks * g.ldr;
}
FRNN_HD int64_t w_elems(const Gemm& g) { return g.mma ? k_stored(g) * r_stored(g) : g.K * g.ldw; }
FRNN_HD int64_t smem_bytes(const Gemm& g) {
  return stage_bytes(g) * g.stages + red_floats(g) * 4 + w_elems(g) * g.es;
}

// The wavefronts of one warp's shared-memory access with lane l at 4-byte word word[l] (-1: the lane sits out):
// the most distinct words any one bank serves (0: no lane takes part). Host code: the plan's price of unpadded
// strides, and the tests' count (bank_report).
inline int64_t warp_wavefronts(const int64_t (&word)[32]) {
  int64_t seen[32][32], most = 0;
  int n[32] = {};
  for (const int64_t w : word) {
    if (w < 0) continue;
    const int64_t b = w % 32;
    int i = 0;
    while (i < n[b] && seen[b][i] != w) ++i;
    if (i == n[b]) seen[b][n[b]++] = w;
    most = n[b] > most ? n[b] : most;
  }
  return most;
}
// Lane l's word in warp instruction `load` of a SIMT K step (accumulate's first pass of a chunk, the tile's rows
// all staged): loads 0..3 Ws's columns cg + j*cw, 4..7 the stage's rows bg_ + i*bg, each past the last read as
// the last; -1 where the lane loads nothing.
inline int64_t k_step_word(const Gemm& g, int64_t tid, int load) {
  const int64_t klen = g.K < g.kc ? g.K : g.kc;
  if (tid >= g.items * g.ks) return -1;
  const SimtThread th = simt_thread(g, tid);
  if (th.ksl >= klen) return -1;
  if (load < kTileCols) {
    const int64_t c = th.cg + load * g.cw;
    return simt_w(g, th.ksl, c < g.R ? c : g.R - 1) * g.es / 4;
  }
  const int64_t r = th.bg0 + (load - kTileCols) * g.bg;
  return stage_at(g, r < g.bt ? r : g.bt - 1, th.ksl);
}
// A SIMT K step's price in the plan's units (a thread's FMA, ~4 cycles; 16 per K step): its FMAs, or the block's
// shared-load wavefronts at one per cycle where bank conflicts make those the longer.
inline int64_t k_step_cycles(const Gemm& g) {
  int64_t waves = 0;
  for (int64_t w0 = 0; w0 < kThreads; w0 += 32) {
    for (int load = 0; load < kTileCols + kTileRows; ++load) {
      int64_t word[32];
      for (int l = 0; l < 32; ++l) word[l] = k_step_word(g, w0 + l, load);
      waves += warp_wavefronts(word);
    }
  }
  return cdiv(waves, 4) > kTile ? cdiv(waves, 4) : kTile;
}

// The price of the SIMT loop's bank conflicts on top of gemm_cycles: a K step costs its FMAs or its wavefronts, the
// longer (none on the tensor cores, whose fragment layouts are conflict-free).
inline int64_t conflict_cycles(const Gemm& g) {
  return g.mma ? 0 : cdiv(g.K, g.ks) * k_step_cycles(g) - gemm_cycles(g);
}

// Whether a step's cells put their part of the GEMM's operand in shared memory for the next GEMM (plain cells:
// exchange_peers), given the plan's slices: a block holding every unit over a K of one chunk, or a cluster's blocks
// pushing to each other, which only a cluster plan with two staged operands does (and only where it launches as
// one).
FRNN_HD bool exchanged(int64_t slices, const Gemm& g) { return slices == 1 ? g.kc >= g.K : g.stages == 2; }

// A step's price of a GEMM's operand: kStageCycles per chunk staged from L2, or kExchangeCycles where the cells of
// the step before put it in place (fastrnn's own cells never do).
FRNN_HD int64_t operand_cycles(const Gemm& g, bool exchange, const Costs& c) {
  return exchange ? c.exchange : cdiv(g.K, g.kc) * c.stage;
}

// fastrnn's own cells (cell_ln.h) run a row phase after each step's GEMM: a block takes whole rows of its
// batch tile, all G*H columns, with its threads as the row's executor (row_block.cuh), whose sums need this
// much static shared memory beside the plan's (sum<K> keeps K <= 4 floats per warp, once per K used).
constexpr int64_t kRowSmem = 1024;
// The cost model's price of one row in the row phase, in SM cycles: about six passes over G*H/kThreads
// elements each and eight block barriers (~50 cycles each) for its sums.
constexpr int64_t kRowPassCycles = 6;
constexpr int64_t kRowSyncCycles = 400;

// The cheapest feasible (U, bt) by the cost model; kNone when even one unit per block over every SM does not
// fit, or the problem is one the engine does not run (decided by the caller: proj_size, fp64). A split over
// at most lim.cluster blocks runs as a cluster where the GPU holds every tile's cluster at once; a wider one, or
// more clusters than that, needs cooperative launch (the grid barrier needs every block resident). With `cells`
// (fastrnn's own cells): the row phase's shared memory and cost, and two barriers per step (after the GEMM, after
// the rows).
inline Plan make_plan(int64_t G, int64_t B, int64_t H, int64_t esize, const Limits& lim, bool cells = false) {
  const int64_t sms = lim.sms, smem_max = lim.smem - (cells ? kRowSmem : 0);
  const int64_t max_slices = lim.cooperative ? sms : (lim.cluster < sms ? lim.cluster : sms);
  Plan best;
  best.why = lim.cooperative || lim.cluster
                 ? "W_hh does not fit: one unit per block over every SM needs more shared memory than a block has"
                 : "no cooperative launch or clusters, and W_hh does not fit in one block";
  bool crowded = false;  // a split that fit was left out for want of clusters (no cooperative launch)
  int64_t best_cost = -1;
  // a candidate split, its GEMMs on the SIMT loop or the tensor cores
  auto consider = [&](int64_t U, int64_t slices, int64_t bt, int64_t tiles, bool mma) {
    // the plan's shared memory: the larger of the two launches' carvings
    auto larger = [](const Gemm& x, const Gemm& y) {
      return smem_bytes(x) > smem_bytes(y) ? smem_bytes(x) : smem_bytes(y);
    };
    // padded strides where they fit (and FASTRNN_PERSISTENT_PAD is not 0), else the unpadded ones
    Gemm f = make_gemm(H, G * U, bt, mma, esize, false), b = make_gemm(G * H, U, bt, mma, esize, false);
    if (larger(f, b) > smem_max || !gemm_fits(f) || !gemm_fits(b)) return;
    const Gemm fp = make_gemm(H, G * U, bt, mma, esize), bp = make_gemm(G * H, U, bt, mma, esize);
    const bool pad = lim.pad && (mma || larger(fp, bp) <= smem_max);
    if (pad) {
      f = fp;
      b = bp;
    }
    // each GEMM's K chunk as wide as a block's shared memory allows (each launch carves its own): the whole K,
    // else halves of it in whole units (kChunk, kMmaChunk)
    auto widen = [&](Gemm& g) {
      const int64_t unit = g.mma ? kMmaChunk : kChunk;
      for (int64_t kc = cdiv(g.K, unit) * unit; kc > g.kc; kc = cdiv(kc / 2, unit) * unit) {
        const Gemm w = make_gemm(g.K, g.R, g.bt, g.mma, esize, pad, kc);
        if (smem_bytes(w) <= smem_max) {
          g = w;
          return;
        }
      }
    };
    widen(f);
    widen(b);
    // a split into clusters that the GPU cannot hold all at once meets at the grid barrier, as its launch would
    const bool clusters_fit = tiles <= clusters_at_once(lim, slices);
    const int scheme = slices == 1 ? kBlock : slices <= lim.cluster && clusters_fit ? kCluster : kGrid;
    if (scheme == kGrid && !lim.cooperative) {
      crowded = true;
      return;
    }
    // a cluster's blocks write each other's next staged operand where a GEMM's K is one chunk and a second fits
    if (scheme == kCluster && !cells) {
      Gemm f2 = f, b2 = b;
      f2.stages = f.kc >= f.K ? 2 : 1;
      b2.stages = b.kc >= b.K ? 2 : 1;
      if (larger(f2, b2) <= smem_max) {
        f = f2;
        b = b2;
      }
    }
    const int64_t smem = larger(f, b);
    // forward and backward GEMMs per step, plus the barriers and (cells) the rows each block walks
    const int64_t barriers = cells ? 4 : 2;
    const Costs& c = lim.costs;
    const int64_t sync = scheme == kGrid ? c.grid_sync + c.grid_sync_member * slices
                       : scheme == kCluster ? c.cluster_sync : 0;
    const int64_t rows = cells ? 2 * cdiv(bt, slices) * (kRowPassCycles * cdiv(G * H, kThreads) + kRowSyncCycles) : 0;
    // priced conflict-free first, then, for a candidate that would still win, the SIMT loop's bank conflicts
    // added (the unpadded strides' and what the pads leave: a stage with bg * span > 32, odd tile widths)
    const auto operand = [&](const Gemm& g) { return operand_cycles(g, !cells && exchanged(slices, g), c); };
    int64_t cost = gemm_cycles(f, c.mma) + gemm_cycles(b, c.mma) + operand(f) + operand(b) + rows + barriers * sync;
    if (best_cost >= 0 && cost >= best_cost) return;
    cost += conflict_cycles(f) + conflict_cycles(b);
    if (best_cost >= 0 && cost >= best_cost) return;
    best_cost = cost;
    best.cost = cost;
    best.scheme = scheme;
    best.units = U;
    best.slices = slices;
    best.bt = bt;
    best.tiles = tiles;
    best.smem = smem;
    best.mma = mma;
    best.pad = pad;
    best.kc[0] = f.kc;
    best.kc[1] = b.kc;
    best.push[0] = f.stages == 2;
    best.push[1] = b.stages == 2;
    const char* cluster_why =
        cells ? "W_hh split over the blocks of a thread-block cluster per batch tile, two cluster barriers per step "
                "(whole rows for the row phase)"
        : best.push[0] || best.push[1]
            ? "W_hh split over the blocks of a thread-block cluster per batch tile, a cluster barrier per step, the "
              "blocks writing each other's GEMM operand in distributed shared memory"
            : "W_hh split over the blocks of a thread-block cluster per batch tile, a cluster barrier per step";
    const char* grid_why =
        slices <= lim.cluster
            ? (cells ? "W_hh split over blocks by hidden units, two grid barriers per step (whole rows for the row "
                       "phase): the GPU holds too few clusters of that many blocks at once"
                     : "W_hh split over blocks by hidden units, a grid barrier per step: the GPU holds too few "
                       "clusters of that many blocks at once")
        : cells ? "W_hh split over blocks by hidden units, two grid barriers per step (whole rows for the row phase)"
                : "W_hh split over blocks by hidden units, a grid barrier per step";
    best.why = scheme == kGrid      ? grid_why
               : scheme == kCluster ? cluster_why
                                    : "each block holds all of W_hh for its batch rows: no barrier between blocks";
  };
  for (int64_t slices = 1; slices <= (max_slices > 1 ? max_slices : 1) && slices <= H; ++slices) {
    const int64_t U = cdiv(H, slices);
    if (cdiv(H, U) != slices) continue;  // the same U as a smaller slice count
    for (int64_t tiles = 1; tiles * slices <= sms && tiles <= B; ++tiles) {
      const int64_t bt = cdiv(B, tiles);
      if (cdiv(B, bt) != tiles) continue;
      consider(U, slices, bt, tiles, false);
      if (lim.mma && (esize == 2 || (esize == 4 && lim.tf32 && !cells))) consider(U, slices, bt, tiles, true);
    }
  }
  if (best.scheme == kNone && crowded) {
    best.why = "W_hh does not fit in one block, the GPU holds too few clusters of the blocks a split takes, and it has "
               "no cooperative launch for the grid barrier";
  }
  return best;
}

// Both directions of a bidirectional layer in one launch where that costs less than one launch after the other:
// each direction then plans on half the SMs (a grid barrier needs every block of both resident), and a step
// of the pair costs one step of that plan where two launches cost two of the whole device's. Otherwise the
// plan of one direction (dirs = 1), each launched on its own. Plain cells only: fastrnn's own keep a launch per
// direction.
inline Plan make_pair_plan(int64_t G, int64_t B, int64_t H, int64_t esize, const Limits& lim) {
  const Plan one = make_plan(G, B, H, esize, lim);
  Limits half = lim;
  half.sms = lim.sms / 2;
  // both directions' clusters at once: each direction's tiles within half of them
  for (int64_t& n : half.clusters_at_once) n = n >= 0 ? n / 2 : -1;
  if (one.scheme == kNone || half.sms == 0) return one;
  Plan both = make_plan(G, B, H, esize, half);
  if (both.scheme == kNone || both.cost >= 2 * one.cost) return one;
  both.dirs = 2;
  return both;
}

// The phase clocks of a launch (persist_clocks, benchmarks/persist_phases.py), per block: thread 0's SM cycles
// (clock64) in each slot, summed over the launch's steps, and the launch's nanoseconds (%globaltimer). A phase's
// time runs until thread 0 reaches the barrier after it (the block's own work, with the block barriers inside
// it); the barrier's, until the barrier lets it go (waiting for the slowest thread of the block, and at a step
// barrier for the other blocks). The programs have at most kMaxPhases phases.
constexpr int kMaxPhases = 2;
enum ClockSlot : int {
  kClockLoad = 0,                                // W_hh's slice into shared memory, once
  kClockPhase = 1,                               // + 2 * ph: phase ph
  kClockBarrier = 2,                             // + 2 * ph: the barrier after phase ph
  kClockLaunch = 1 + 2 * kMaxPhases,             // the whole launch, cycles
  kClockNs = kClockLaunch + 1,                   // the whole launch, nanoseconds
  kClockSlots = kClockNs + 1
};

// The kernels' argument: the args of each direction a launch runs (d[1] only with plan.dirs == 2; both carry
// the same plan). clocks: [blocks][kClockSlots] where a launch is timed, else null. sync: the counters of the grid
// scheme's step barriers, one per sync group (a cache line apart), zeroed before the launch (persist_cuda.cu's
// launch sets it), else null.
template <class Args>
struct Dirs {
  Args d[2];
  long long* clocks = nullptr;
  unsigned* sync = nullptr;
};

// The rows of the step processed k-th in the forward's order, and of the step before it (h_{t-1}, c_{t-1});
// rows past prev_rows start from h0/c0 (reverse direction of a packed batch).
struct StepRows {
  int64_t t, rows, off, prev_rows, prev_off;
};

struct Layout {
  int64_t T, B;
  const int64_t* size;  // [T] rows per step, nullptr when dense (B every step)
  const int64_t* off;   // [T] first row of each step, nullptr when dense (t*B)
  bool reverse;
};

FRNN_HD StepRows step_rows(const Layout& s, int64_t k) {
  const int64_t t = s.reverse ? s.T - 1 - k : k;
  StepRows r{t, s.size ? s.size[t] : s.B, s.off ? s.off[t] : t * s.B, 0, 0};
  if (k > 0) {
    const int64_t tp = s.reverse ? t + 1 : t - 1;
    const int64_t rp = s.size ? s.size[tp] : s.B;
    r.prev_rows = rp < r.rows ? rp : r.rows;
    r.prev_off = s.off ? s.off[tp] : tp * s.B;
  }
  return r;
}

// A load of data that another block wrote during this launch: through L2 only (ld.global.cg), since L1 is not
// coherent across SMs. 16-bit storage types are loaded as their bits.
template <typename T>
FRNN_HD float ld_l2(const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    return __ldcg(reinterpret_cast<const float*>(p));
  } else {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T v;
    memcpy(&v, &bits, sizeof(bits));
    return static_cast<float>(v);
  }
#else
  return static_cast<float>(*p);
#endif
}

FRNN_HD float fma_acc(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// One block's view of its shared memory.
template <typename T>
struct Smem {
  float* stage;  // SIMT: [bt][lds] floats; mma: [cdiv(bt, 8) * 8][mma_stride(kc, es)] of T
  float* red;    // SIMT: [ks][ldr], a slice's first kTile * items as [kTile][items]; mma: [ks][kTile][wg * 32]
  T* w;          // Ws as stored (w_index)

  int64_t next = 0;  // bytes from this staged operand to the other (0: one of them)

  FRNN_HD static Smem carve(void* base, const Gemm& g) {
    unsigned char* b = static_cast<unsigned char*>(base);
    float* red = reinterpret_cast<float*>(b + stage_bytes(g) * g.stages);
    return {reinterpret_cast<float*>(b), red, reinterpret_cast<T*>(red + red_floats(g)),
            g.stages > 1 ? stage_bytes(g) : 0};
  }
  // The view whose staged operand is number `parity` (of two; with one, that one).
  FRNN_HD Smem buffer(int64_t parity) const {
    Smem v = *this;
    v.stage = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(stage) + (parity & 1) * next);
    v.next = 0;
    return v;
  }
  FRNN_HD T* staged() const { return reinterpret_cast<T*>(stage); }
};

// An operand as the tensor cores take it: 16-bit values as they are; fp32 rounded to TF32 (10 mantissa bits, to
// nearest, ties away from zero: cvt.rna), which the instruction itself would truncate.
template <typename T>
FRNN_HD T mma_operand(float v) {
  if constexpr (sizeof(T) == 2) {
    return static_cast<T>(v);
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    uint32_t u;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(v));
    return __uint_as_float(u);
#else
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;
    std::memcpy(&v, &u, sizeof(u));
    return v;
#endif
  }
}

// Global loads whose values go to shared memory (load_w, the stages) issue this many at a time before their stores:
// one at a time, each store waiting for its load, a thread paid one round trip to L2 (or DRAM) per element in turn
// (a stage of a 64-row batch tile 64 of them per chunk; W_hh's slice up to ~200 once per launch).
constexpr int kLoadBatch = 8;

// W_hh's slice into shared memory: Ws(k, c) = w(k, c) for k < K, c < R (as an mma operand for the tensor cores),
// zeros in their padding. Consecutive threads take consecutive k of a column (`k_fastest`: the forward's
// W_hh rows) or consecutive columns of a k (the backward's), whichever the caller reads from consecutive
// addresses.
template <typename T, class W>
FRNN_HD void load_w(const Gemm& g, const Smem<T>& sm, int tid, bool k_fastest, const W& w) {
  const int Ks = static_cast<int>(k_stored(g)), Rs = static_cast<int>(r_stored(g)), n = Ks * Rs;
  // element i is (k, c) = (i % Ks, i / Ks) with k fastest, else (i / Rs, i % Rs): stepped by kThreads elements
  // without a division per element
  const int fast = k_fastest ? Ks : Rs, dfast = kThreads % fast, dslow = kThreads / fast;
  int slow = tid / fast, quick = tid - slow * fast;
  for (int i0 = tid; i0 < n; i0 += kThreads * kLoadBatch) {
    T v[kLoadBatch];
    int at[kLoadBatch];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int b = 0; b < kLoadBatch; ++b) {
      const bool in = i0 + b * kThreads < n;
      const int k = k_fastest ? quick : slow, c = k_fastest ? slow : quick;
      v[b] = in && k < g.K && c < g.R ? w(k, c) : T(0.0f);
      at[b] = in ? static_cast<int>(w_index(g, k, c)) : -1;
      quick += dfast;
      slow += dslow;
      if (quick >= fast) {
        quick -= fast;
        ++slow;
      }
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int b = 0; b < kLoadBatch; ++b) {
      if (at[b] >= 0) sm.w[at[b]] = g.mma ? mma_operand<T>(static_cast<float>(v[b])) : v[b];
    }
  }
}

static_assert(kThreads % kChunk == 0 && kThreads % kMmaChunk == 0, "the stages take whole rows per pass");

// The block GEMM's phases. A(r, k) gives the operand (row r of the block's rows), Sink(r, c, v) takes a result.
// Between phases the caller puts a block barrier; `acc` lives in the thread's registers across K chunks. The
// stages give each thread every unit-th column of the chunk from tid % unit and every (threads / unit)-th row:
// consecutive threads read consecutive k of a row, and no element's place needs a division. The unit is a power of
// two, 2^shift: kChunk (kMmaChunk on the tensor cores), halved down to 16 while half of it still covers a short
// chunk (the last of a K, or a small K), so that threads past its end take rows instead of idling.
constexpr int kChunkShift = 6, kMmaChunkShift = 7;
static_assert(int64_t(1) << kChunkShift == kChunk && int64_t(1) << kMmaChunkShift == kMmaChunk, "units");
FRNN_HD int stage_shift(int64_t len, int shift) {
  while (shift > 4 && (int64_t(1) << (shift - 1)) >= len) --shift;
  return shift;
}

// A thread's elements of a stage: rows r, r + rstep, ... below `rows` (from first + (tid >> sh)) times columns kk,
// kk + unit, ... below `cols` (from tid % unit), kLoadBatch at a time.
template <typename V, class Load, class Store>
FRNN_HD void stage_walk(int tid, int sh, int first, int rows, int cols, const Load& load, const Store& store) {
  const int unit = 1 << sh, rstep = kThreads >> sh, kk0 = tid & (unit - 1);
  if (kk0 >= cols) return;
  int r = first + (tid >> sh), kk = kk0;
  while (r < rows) {
    V v[kLoadBatch];
    int rb[kLoadBatch], kb[kLoadBatch];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int b = 0; b < kLoadBatch; ++b) {
      rb[b] = r;
      kb[b] = kk;
      v[b] = r < rows ? load(r, kk) : V(0.0f);
      kk += unit;
      if (kk >= cols) {
        kk = kk0;
        r += rstep;
      }
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int b = 0; b < kLoadBatch; ++b) {
      if (rb[b] < rows) store(rb[b], kb[b], v[b]);
    }
  }
}

// The chunk's rows [first, nrows) (rows below `first` are in place already: stage_own).
template <typename T, class A>
FRNN_HD void stage(const Gemm& g, const Smem<T>& sm, int tid, int64_t k0, int64_t first, int64_t nrows, const A& a) {
  const int klen = static_cast<int>(g.K - k0 < g.kc ? g.K - k0 : g.kc);
  stage_walk<float>(
      tid, stage_shift(klen, kChunkShift), static_cast<int>(first), static_cast<int>(nrows), klen,
      [&](int r, int kk) { return a(r, k0 + kk); }, [&](int r, int kk, float v) { sm.stage[stage_at(g, r, kk)] = v; });
}

// The SIMT K loop, the engine's inner loop: per K step a thread's 4 + 4 shared loads and 16 FMAs. Its addresses
// are 32-bit pointers stepped once per K step, and a row or column past the block's (r >= nrows, c >= R) reads
// the last one's value instead of taking a branch, which costs nothing in the results: only the accumulators of
// that row or column take it, and reduce() reads none of them. sm_90 SASS per K step: 33 instructions (88 with
// the bounds tested and the 64-bit addresses worked out per element).
template <typename T>
FRNN_HD void accumulate(const Gemm& g, const Smem<T>& sm, int tid, int64_t k0, int64_t nrows, float* acc) {
  if (tid >= g.items * g.ks || nrows <= 0) return;
  const SimtThread th = simt_thread(g, tid);
  const int klen = static_cast<int>(g.K - k0 < g.kc ? g.K - k0 : g.kc), ks = static_cast<int>(g.ks);
  const int ksl = static_cast<int>(th.ksl), wstep = ks * static_cast<int>(g.ldw);
  if (ksl >= klen) return;  // no K step here, and its first row would lie past Ws
  const T* w[kTileCols];
  const float* x[kTileRows];
  for (int j = 0; j < kTileCols; ++j) {
    const int64_t c = th.cg + j * g.cw;
    w[j] = sm.w + simt_w(g, k0 + ksl, c < g.R ? c : g.R - 1);
  }
  for (int i = 0; i < kTileRows; ++i) {
    const int64_t r = th.bg0 + i * g.bg;
    x[i] = sm.stage + stage_at(g, r < nrows ? r : nrows - 1, ksl);
  }
  // K steps ksl, ksl + ks, ... below klen
  const int steps = klen / ks + (ksl < klen % ks ? 1 : 0);
  for (int n = 0; n < steps; ++n) {
    float wv[kTileCols], xv[kTileRows];
    for (int j = 0; j < kTileCols; ++j) wv[j] = static_cast<float>(w[j][n * wstep]);
    for (int i = 0; i < kTileRows; ++i) xv[i] = x[i][n * ks];
    for (int i = 0; i < kTileRows; ++i)
      for (int j = 0; j < kTileCols; ++j) acc[i * kTileCols + j] = fma_acc(xv[i], wv[j], acc[i * kTileCols + j]);
  }
}

template <typename T>
FRNN_HD void spill(const Gemm& g, const Smem<T>& sm, int tid, const float* acc) {
  if (tid >= g.items * g.ks) return;
  const SimtThread th = simt_thread(g, tid);
  for (int e = 0; e < kTile; ++e) sm.red[red_at(g, th.ksl, e, th.item)] = acc[e];
}

template <typename T, class Sink>
FRNN_HD void reduce(const Gemm& g, const Smem<T>& sm, int tid, int64_t nrows, const Sink& sink) {
  for (int64_t o = tid; o < kTile * g.items; o += kThreads) {
    const int64_t e = div_small(o, g.items), item = o - e * g.items;
    const int64_t bg0 = div_small(item, g.cw), cg = item - bg0 * g.cw;
    const int64_t r = bg0 + (e / kTileCols) * g.bg, c = cg + (e % kTileCols) * g.cw;
    if (r >= nrows || c >= g.R) continue;
    float v = 0.0f;
    for (int64_t s = 0; s < g.ks; ++s) v += sm.red[red_at(g, s, e, item)];
    sink(r, c, v);
  }
}

// The tensor cores' phases (g.mma), with the same barriers between them. The chunk's operand is staged as the
// storage type (TF32-rounded fp32), zero-padded to whole 8-row and mma_k-column tiles (the padding meets zeros
// of Ws, and 0 * NaN of a stale value would not be 0). Rows below `first` are in place already (stage_own).
template <typename T, class A>
FRNN_HD void stage_mma(const Gemm& g, const Smem<T>& sm, int tid, int64_t k0, int64_t first, int64_t nrows,
                       const A& a) {
  const int klen = static_cast<int>(g.K - k0 < g.kc ? g.K - k0 : g.kc), kstep = static_cast<int>(mma_k(g.es));
  const int kp = (klen + kstep - 1) / kstep * kstep, stride = static_cast<int>(mma_stride(g.kc, g.es));
  const int n = static_cast<int>(nrows);
  T* st = sm.staged();
  stage_walk<T>(
      tid, stage_shift(kp, kMmaChunkShift), static_cast<int>(first), static_cast<int>(g.bg * 8), kp,
      [&](int r, int kk) { return r < n && kk < klen ? mma_operand<T>(a(r, k0 + kk)) : T(0.0f); },
      [&](int r, int kk, T v) { st[r * stride + kk] = v; });
}

// A value the block itself produced, put at row r, column kk of a one-chunk K's staged operand as stage or stage_mma
// would have put it there from the storage type: a step's rows that the block's own cells wrote need no stage.
template <typename T>
FRNN_HD void stage_own(const Gemm& g, const Smem<T>& sm, int64_t r, int64_t kk, float v) {
  const float t = static_cast<float>(static_cast<T>(v));
  if (g.mma) {
    sm.staged()[r * mma_stride(g.kc, g.es) + kk] = mma_operand<T>(t);
  } else {
    sm.stage[stage_at(g, r, kk)] = t;
  }
}

// Every staged operand zeroed once per launch: the padding no stage writes after stage_own or a push filled a step's
// rows (the tensor cores' columns past K, in each of two operands) must hold no stale NaN for 0 * NaN.
template <typename T>
FRNN_HD void zero_stages(const Gemm& g, const Smem<T>& sm, int tid) {
  uint32_t* z = reinterpret_cast<uint32_t*>(sm.stage);
  for (int64_t i = tid; i < stage_bytes(g) * g.stages / 4; i += kThreads) z[i] = 0;
}

// One lane's operands of an instruction, four and two 32-bit registers, in the PTX ISA's fragment layout: a
// from Ws's fragment order (8 16-bit values, the lower index in the low half, or 4 TF32), b from the staged
// rows: column n = tile row + lane / 4 of B, its rows k, k + 1 and k + 8, k + 9 with k = 2 * (lane % 4)
// (16-bit), or k and k + 4 with k = lane % 4 (TF32).
struct Frags {
  uint32_t a[4], b[2];
};

// A lane's fragments from its tile's first A values in Ws (wt) and its first staged row (st, rows `stride` apart),
// both at the step's k.
template <typename T>
FRNN_HD Frags load_frags(const T* wt, const T* st, int64_t stride, int lane) {
  constexpr int64_t per = 16 / sizeof(T), kstep = sizeof(T) == 2 ? 16 : 8;
  Frags f;
  const T* wa = wt + lane * per;
  const T* sb = st + (lane / 4) * stride + (lane % 4) * (4 / sizeof(T));
#if defined(__CUDA_ARCH__)
  const uint4 v = *reinterpret_cast<const uint4*>(wa);
  f.a[0] = v.x;
  f.a[1] = v.y;
  f.a[2] = v.z;
  f.a[3] = v.w;
  f.b[0] = *reinterpret_cast<const uint32_t*>(sb);
  f.b[1] = *reinterpret_cast<const uint32_t*>(sb + kstep / 2);
#else
  // the device's 16-byte and 4-byte loads need these alignments: a carving that broke them must fail here too
  if (reinterpret_cast<uintptr_t>(wa) % 16 != 0 || reinterpret_cast<uintptr_t>(sb) % 4 != 0) {
    throw std::logic_error("fastrnn: misaligned tensor-core fragment in the persistent engine's shared memory");
  }
  std::memcpy(f.a, wa, sizeof(f.a));
  std::memcpy(&f.b[0], sb, 4);
  std::memcpy(&f.b[1], sb + kstep / 2, 4);
#endif
  return f;
}

// `mma(d, frags)`: d[0..3] += the warp's 16 x 8 product over one instruction's K, the lane's part (the device's
// instruction, or the emulator's from every lane's frags(lane)). Warp-uniform: every lane of a warp takes the
// same tiles and steps. Tile by tile, each tile's base addresses worked out once per chunk.
// A tile's K steps alternate between two accumulators, summed at the chunk's end: an instruction waits for the
// one before it on the same accumulator (tens of cycles), and with one or two tiles per warp (every standard
// plan's) a single chain of them would leave the tensor cores idle most of the time.
template <typename T, class Mma>
FRNN_HD void accumulate_mma(const Gemm& g, const Smem<T>& sm, int tid, int64_t k0, float* acc, const Mma& mma) {
  constexpr int per = 16 / sizeof(T), kstep = sizeof(T) == 2 ? 16 : 8;
  const int stride = static_cast<int>(mma_stride(g.kc, sizeof(T)));
  const int warp = tid / 32, wg = kWarps / static_cast<int>(g.ks), slice = warp / wg, first = warp - slice * wg;
  const int ks = static_cast<int>(g.ks), items = static_cast<int>(g.items), bg = static_cast<int>(g.bg);
  const int steps = static_cast<int>(cdiv(g.K - k0 < g.kc ? g.K - k0 : g.kc, kstep));
  const int ktiles = static_cast<int>(cdiv(g.K, kstep));
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kWarpTiles; ++i) {
    const int j = first + i * wg;
    if (j >= items) break;
    const int ct = j / bg, rt = j - ct * bg;
    // addresses from the step, not pointers stepped: one stepped past the last K step would lie past Ws
    const T* wt = sm.w + (ct * ktiles + static_cast<int>(k0) / kstep) * 32 * per;
    const T* st = sm.staged() + rt * 8 * stride;
    float odd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int s = slice;
    for (; s + ks < steps; s += 2 * ks) {
      mma(acc + 4 * i, [&](int l) { return load_frags(wt + s * 32 * per, st + s * kstep, stride, l); });
      mma(odd, [&](int l) { return load_frags(wt + (s + ks) * 32 * per, st + (s + ks) * kstep, stride, l); });
    }
    if (s < steps) mma(acc + 4 * i, [&](int l) { return load_frags(wt + s * 32 * per, st + s * kstep, stride, l); });
    for (int e = 0; e < 4; ++e) acc[4 * i + e] += odd[e];
  }
}

// The accumulators by (K slice, tile slot i, value e, warp of the slice, lane), summed over the slices in a
// fixed order; value e of a lane's tile is column lane / 4 + 8 * (e / 2), row 2 * (lane % 4) + e % 2.
template <typename T>
FRNN_HD void spill_mma(const Gemm& g, const Smem<T>& sm, int tid, const float* acc) {
  const int64_t wg = kWarps / g.ks, slice = tid / 32 / wg, q = tid - slice * wg * 32;
  for (int e = 0; e < kTile; ++e) sm.red[(slice * kTile + e) * wg * 32 + q] = acc[e];
}

template <typename T, class Sink>
FRNN_HD void reduce_mma(const Gemm& g, const Smem<T>& sm, int tid, int64_t nrows, const Sink& sink) {
  const int64_t wg = kWarps / g.ks, lanes = wg * 32;
  for (int64_t o = tid; o < kTile * lanes; o += kThreads) {
    const int64_t e = div_small(o, lanes), q = o - e * lanes, lane = q % 32;
    const int64_t j = q / 32 + (e / 4) * wg;
    if (j >= g.items) continue;
    const int64_t ct = div_small(j, g.bg), rt = j - ct * g.bg;
    const int64_t c = ct * 16 + lane / 4 + 8 * ((e % 4) / 2), r = rt * 8 + 2 * (lane % 4) + e % 2;
    if (r >= nrows || c >= g.R) continue;
    float v = 0.0f;
    for (int64_t s = 0; s < g.ks; ++s) v += sm.red[(s * kTile + e) * lanes + q];
    sink(r, c, v);
  }
}

// A block GEMM's results handed to sink(r, c, v), from either loop's reduction buffer.
template <typename T, class Sink>
FRNN_HD void reduce_to(const Gemm& g, const Smem<T>& sm, int tid, int64_t nrows, const Sink& sink) {
  if (g.mma) {
    reduce_mma(g, sm, tid, nrows, sink);
  } else {
    reduce(g, sm, tid, nrows, sink);
  }
}

// The block GEMM's result at (row r, column c), read where spill or spill_mma left its K slices' partial sums (after
// the block barrier that follows them) and added in reduce's order. The forward's cells take their gates' recurrent
// products here, in fp32, where a sink would round them to the storage type and store them for the cells to load
// after one more barrier.
template <typename T>
struct Sums {
  const Gemm& g;
  const Smem<T>& sm;
  FRNN_HD float operator()(int64_t r, int64_t c) const {
    float v = 0.0f;
    if (g.mma) {
      // reduce_mma's inverse: column c is lane / 4 + 8 * ((e % 4) / 2) of column tile c / 16, row r is
      // 2 * (lane % 4) + e % 2 of row tile r / 8, and tile j is slot j / wg of warp j % wg of each slice
      const int64_t wg = kWarps / g.ks, lanes = wg * 32, c16 = c & 15, r8 = r & 7;
      const int64_t j = (c >> 4) * g.bg + (r >> 3), slot = div_small(j, wg);
      const int64_t e = slot * 4 + (c16 >> 3) * 2 + (r8 & 1), q = (j - slot * wg) * 32 + (c16 & 7) * 4 + (r8 >> 1);
      for (int64_t s = 0; s < g.ks; ++s) v += sm.red[(s * kTile + e) * lanes + q];
    } else {
      // the thread of item (r % bg) * cw + c % cw holds (r, c) as value (r / bg) * kTileCols + c / cw of its tile
      const int64_t jc = div_small(c, g.cw), i = div_small(r, g.bg);
      const int64_t e = i * kTileCols + jc, item = (r - i * g.bg) * g.cw + (c - jc * g.cw);
      for (int64_t s = 0; s < g.ks; ++s) v += sm.red[red_at(g, s, e, item)];
    }
    return v;
  }
};

// ---------------------------------------------------------------------------------------------------
// Forward. Pointers at row 0 of their tensors; the kernel offsets them per step.
struct Fwd {
  Plan plan;
  Layout lay;
  int64_t H, G;
  CellParams base;  // gates [N, G*H] x.W_ih^T, y [N, H], c [B, H], c_save [N, H] (or c), hn_save [N, H] (or a [B, H]
                    // scratch), h [B, H] running state; hg unused (the cells take the block GEMM's Sums)
  bool save_c, save_hn;
  const void* w_hh;  // [G*H, H]
  const void* h0;    // [B, H]
};

// Ws[k][g*U + jj] = W_hh[g*H + u0 + jj][k]
template <typename T, class F>
FRNN_HD void fwd_load_w(const F& f, const Smem<T>& sm, const Gemm& gm, int tid, int64_t u0) {
  const int64_t U = f.plan.units, H = f.H;
  const T* w = static_cast<const T*>(f.w_hh);
  load_w(gm, sm, tid, true, [&](int64_t k, int64_t c) {
    const int64_t g = div_small(c, U), u = u0 + (c - g * U);
    return u < H ? w[(g * H + u) * H + k] : T(0.0f);
  });
}

// The cell params of one step: the base's per-row pointers moved to the step's first row.
template <typename T>
FRNN_HD CellParams fwd_step_params(const Fwd& f, const StepRows& s) {
  CellParams p = f.base;
  const int64_t GH = f.G * f.H;
  p.rows = s.rows;
  p.gates = static_cast<T*>(p.gates) + s.off * GH;
  p.y = static_cast<T*>(p.y) + s.off * p.y_stride;
  if (f.save_c) p.c_save = static_cast<T*>(p.c_save) + s.off * f.H;
  if (f.save_hn) p.hn_save = static_cast<T*>(p.hn_save) + s.off * p.hn_stride;
  return p;
}

// Block `blk`'s rows and units.
struct Owned {
  int64_t r0, u0, units;
};
FRNN_HD Owned owned(const Plan& p, int64_t H, int64_t blk) {
  const int64_t tile = blk / p.slices, slice = blk - tile * p.slices;
  const int64_t u0 = slice * p.units;
  return {tile * p.bt, u0, H - u0 < p.units ? H - u0 : p.units};
}

template <typename T>
struct FwdOperand {  // h_{t-1} of the block's row r: the previous step's y row, else h0
  const T* y;
  const T* h0;
  int64_t H, r0;
  StepRows s;
  FRNN_HD float operator()(int64_t r, int64_t k) const {
    const int64_t b = r0 + r;
    return b < s.prev_rows ? ld_l2(y + (s.prev_off + b) * H + k) : static_cast<float>(h0[b * H + k]);
  }
};

template <typename T>
struct FwdSink {  // out[b][g*H + u0 + jj] of a [B, G*H] buffer: the recurrent products of fastrnn's own cells (hs)
  T* out;
  int64_t H, G, U, u0, r0;
  FRNN_HD void operator()(int64_t r, int64_t c, float v) const {
    const int64_t g = div_small(c, U), u = u0 + c - g * U;
    if (u < H) out[(r0 + r) * G * H + g * H + u] = static_cast<T>(v);
  }
};

// The block's rows of step s: [r0, r0 + n) with n <= bt (0 when the step's rows end before the tile).
FRNN_HD int64_t tile_rows(const Plan& p, const Owned& o, const StepRows& s) {
  const int64_t n = s.rows - o.r0;
  return n <= 0 ? 0 : (n < p.bt ? n : p.bt);
}

// A thread's forward elements are i = tid, tid + kThreads, ... of the block's n rows x own units, the same each step.
// Their inputs from memory other than hg (each gate's input projection, the state) are loaded before the step's
// GEMM for the first kPrefetch of them, so that the loads' round trip to L2 passes under the GEMM instead of
// standing between it and the cells. 4 covers a block of 1,024 elements, every LSTM's (its GEMM's 4 x 4 tiles over
// kThreads threads bound rows x units by 4,096 / G) and the standard shapes' block plans (8 rows x 128 units); the
// values held through the GEMM took the forward kernels from 143-152 registers to 160-202 (0 spills; one block per
// SM either way).
constexpr int kPrefetch = 4;
struct Prefetched {
  float x[kPrefetch][4];
  float state[kPrefetch];
};

// f(m, i) for the thread's first kPrefetch elements i below `total`, unrolled so that slot m is a constant (a
// register of Prefetched, not local memory).
template <class F>
FRNN_HD void prefetch_slots(int tid, int64_t total, const F& f) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int m = 0; m < kPrefetch; ++m) {
    const int64_t i = tid + int64_t(m) * kThreads;
    if (i >= total) return;
    f(m, i);
  }
}

// cell(i, pre, m) for each of the thread's elements i below `total`: pre a std::true_type for the first kPrefetch
// (their inputs in slot m of what prefetch_slots loaded), std::false_type for the rest.
template <class F>
FRNN_HD void each_element(int tid, int64_t total, const F& cell) {
  prefetch_slots(tid, total, [&](int m, int64_t i) { cell(i, std::true_type{}, m); });
  for (int64_t i = tid + int64_t(kPrefetch) * kThreads; i < total; i += kThreads) cell(i, std::false_type{}, 0);
}

// An input of a cell: the prefetched value where Pre, else load().
template <bool Pre, class F>
FRNN_HD float prefetched_or(float v, const F& load) {
  if constexpr (Pre) {
    return v;
  } else {
    return load();
  }
}

template <class Op, typename T>
FRNN_HD Prefetched fwd_prefetch(const CellParams& p, const Owned& o, int64_t n, int tid) {
  static_assert(Op::kGates <= 4, "a cell of at most 4 gates");
  Prefetched v{};
  prefetch_slots(tid, n * o.units, [&](int m, int64_t i) {
    const int64_t r = div_small(i, o.units);
    const InMemory<Op, T, T> mem{p, o.r0 + r, o.u0 + i - r * o.units};
    for (int k = 0; k < Op::kGates; ++k) v.x[m][k] = mem.x(k);
    v.state[m] = mem.state();
  });
  return v;
}

// A forward element's inputs (cell.h's `with`): hg(k) from the block GEMM's Sums (gate k of unit u is the GEMM's
// column k * U + u), the rest prefetched (Pre) or from memory.
template <class Op, typename T, bool Pre>
struct FwdIn {
  InMemory<Op, T, T> mem;
  const Sums<T>& sums;
  int64_t r, u, U;
  float px[4], pstate;
  FRNN_HD float x(int64_t k) const { return prefetched_or<Pre>(px[k], [&] { return mem.x(k); }); }
  FRNN_HD float hg(int64_t k) const { return sums(r, k * U + u); }
  FRNN_HD float state() const { return prefetched_or<Pre>(pstate, [&] { return mem.state(); }); }
};

// The backward's elements likewise (i = tid, tid + kThreads, ... of n rows x own units): the first kPrefetch's saved
// gates, saved value (c, hn or h), prev, dc, dy and dh_next are loaded before the step's dh GEMM. Most standard
// backward plans have 1 or 2 elements per thread, the LSTM's and GRU's (512,16,128,128) bf16 block plans 4 (8 rows x
// 128 units). The values held through the GEMM took the backward kernels from 147-161 registers to 187-248 (0
// spills; one block per SM either way).
struct BwdPrefetched {
  float gate[kPrefetch][4];
  float saved[kPrefetch], prev[kPrefetch], dc[kPrefetch], dy[kPrefetch], dh_next[kPrefetch];
};

// dh_next only where BwdIn::dh reads it: rows at or past `summed`, or every row where `add`.
template <class Op, typename T>
FRNN_HD BwdPrefetched bwd_prefetch(const CellGradParams& p, const Owned& o, int64_t n, int64_t summed, bool add,
                                   int tid) {
  static_assert(Op::kGates <= 4, "a cell of at most 4 gates");
  BwdPrefetched v{};
  prefetch_slots(tid, n * o.units, [&](int m, int64_t i) {
    const int64_t r = div_small(i, o.units);
    const GradInMemory<Op, T, T> mem{p, o.r0 + r, o.u0 + i - r * o.units};
    for (int k = 0; k < Op::kGates; ++k) v.gate[m][k] = mem.gate(k);
    v.saved[m] = mem.saved();
    if constexpr (Op::kPrev) v.prev[m] = mem.prev();
    if constexpr (Op::kDc) v.dc[m] = mem.dc();
    v.dy[m] = mem.dy();
    if (add || r >= summed) v.dh_next[m] = mem.dh_next();
  });
  return v;
}

// A backward element's inputs (cell.h's `with`): in rows the step before's dh GEMM reached (r < summed), dh_next is
// that GEMM's sum for unit u, plus (add: GRU) the direct part z * dh the cell of the step before left in memory;
// in the others (the first step, rows whose sequences end at this step) it is in memory, as on the per-step path.
// The rest prefetched (Pre) or from memory.
template <class Op, typename T, bool Pre>
struct BwdIn {
  GradInMemory<Op, T, T> mem;
  const Sums<T>& sums;
  int64_t r, u, summed;
  bool add;
  float pgate[4], psaved, pprev, pdc, pdy, pdh;
  FRNN_HD float gate(int64_t k) const { return prefetched_or<Pre>(pgate[k], [&] { return mem.gate(k); }); }
  FRNN_HD float saved() const { return prefetched_or<Pre>(psaved, [&] { return mem.saved(); }); }
  FRNN_HD float prev() const { return prefetched_or<Pre>(pprev, [&] { return mem.prev(); }); }
  FRNN_HD float dc() const { return prefetched_or<Pre>(pdc, [&] { return mem.dc(); }); }
  FRNN_HD float dh() const {
    const float dy = prefetched_or<Pre>(pdy, [&] { return mem.dy(); });
    const auto next = [&] { return prefetched_or<Pre>(pdh, [&] { return mem.dh_next(); }); };
    if (r >= summed) return next() + dy;
    const float v = sums(r, u);
    return (add ? next() + v : v) + dy;
  }
};

// How a step's cells hand their part of the next GEMM's operand (h_t forward, dgates backward) over: 1, into the
// block's own staged operand (it holds every unit and stages the whole K at once); the cluster's slices, into the
// staged operand of each block of its cluster (Plan::push, launched as a cluster); 0, not at all (the GEMM stages it
// from L2). Either way the GEMM stages only the rows that start from h0 (none in a dense batch).
FRNN_HD int64_t exchange_peers(const Plan& p, const Gemm& g) {
  // a push plan whose clusters the GPU cannot place runs at the grid barrier: no distributed shared memory there
  return exchanged(p.slices, g) && (p.slices == 1 || p.scheme == kCluster) ? p.slices : 0;
}

// put(r, kk, v): value v of row r of the tile, column kk of the K, to the staged operand `sm` of each of `peers`
// blocks (1: this block's; more: the cluster's, through distributed shared memory, x.peer).
template <typename T, class X>
struct Put {
  const X& x;
  const Gemm& g;
  Smem<T> sm;
  int64_t peers;
  FRNN_HD void operator()(int64_t r, int64_t kk, float v) const {
    for (int64_t q = 0; q < peers; ++q) stage_own(g, peers == 1 ? sm : x.peer(sm, q), r, kk, v);
  }
};

// The forward's cells on the block GEMM's sums: cell.h's op on the block's n rows x own units of one step, p pointed
// at the step's rows; each h_t also to put (column u0 + u).
template <class Op, typename T, class P>
FRNN_HD void fwd_cells(const CellParams& p, const Owned& o, int64_t U, int64_t n, int tid, const Sums<T>& sums,
                       const Prefetched& v, const P& put) {
  // element i's inputs, Pre: from v's slot m
  const auto cell = [&](int64_t i, auto pre, int m) {
    const int64_t r = div_small(i, o.units), u = i - r * o.units;
    FwdIn<Op, T, decltype(pre)::value> in{{p, o.r0 + r, o.u0 + u}, sums, r, u, U, {}, 0.0f};
    if constexpr (decltype(pre)::value) {
      for (int k = 0; k < 4; ++k) in.px[k] = v.x[m][k];
      in.pstate = v.state[m];
    }
    put(r, o.u0 + u, Op::template with<T>(p, o.r0 + r, o.u0 + u, in));
  };
  each_element(tid, n * o.units, cell);
}

// The backward's cells: cell.h's op on the block's n rows x own units of one step, p pointed at the step's rows,
// dh_next of rows below `summed` from sums (BwdIn); each gradient of a recurrent pre-activation also to put (the dh
// GEMM's column k * H + u0 + u).
template <class Op, typename T, class P>
FRNN_HD void bwd_cells(const CellGradParams& p, const Owned& o, int64_t H, int64_t n, int tid, const Sums<T>& sums,
                       int64_t summed, bool add, const BwdPrefetched& v, const P& put) {
  const auto cell = [&](int64_t i, auto pre, int m) {
    const int64_t r = div_small(i, o.units), u = i - r * o.units;
    BwdIn<Op, T, decltype(pre)::value> in{{p, o.r0 + r, o.u0 + u}, sums, r, u, summed, add, {}, 0, 0, 0, 0, 0};
    if constexpr (decltype(pre)::value) {
      for (int k = 0; k < 4; ++k) in.pgate[k] = v.gate[m][k];
      in.psaved = v.saved[m];
      in.pprev = v.prev[m];
      in.pdc = v.dc[m];
      in.pdy = v.dy[m];
      in.pdh = v.dh_next[m];
    }
    Op::template with<T>(p, o.r0 + r, o.u0 + u, in, [&](int64_t k, float d) { put(r, k * H + o.u0 + u, d); });
  };
  each_element(tid, n * o.units, cell);
}

// ---------------------------------------------------------------------------------------------------
// Backward. Pointers at row 0 of their tensors.
struct Bwd {
  Plan plan;
  Layout lay;
  int64_t H, G;
  // gates/c/hn/out/dy/dgx/dgh at row 0 of their [N, .] tensors; prev at row 0 of c_save (LSTM) or y (GRU); dh
  // [B, H] the running dh (also dh_prev), dc [B, H]
  CellGradParams base;
  bool gru, lstm;
  const void* w_hh;  // [G*H, H]
};

// Ws[k][jj] = W_hh[k][u0 + jj]
template <typename T, class F>
FRNN_HD void bwd_load_w(const F& f, const Smem<T>& sm, const Gemm& gm, int tid, int64_t u0) {
  const int64_t H = f.H;
  const T* w = static_cast<const T*>(f.w_hh);
  load_w(gm, sm, tid, false, [&](int64_t k, int64_t c) { return u0 + c < H ? w[k * H + u0 + c] : T(0.0f); });
}

template <typename T>
FRNN_HD CellGradParams bwd_step_params(const Bwd& f, const StepRows& s) {
  CellGradParams p = f.base;
  const int64_t GH = f.G * f.H;
  p.rows = s.rows;
  if (p.gates) p.gates = static_cast<const T*>(p.gates) + s.off * GH;
  if (p.c) p.c = static_cast<const T*>(p.c) + s.off * f.H;
  if (p.hn) p.hn = static_cast<const T*>(p.hn) + s.off * f.H;
  p.out = static_cast<const T*>(p.out) + s.off * p.out_stride;
  p.dy = static_cast<const T*>(p.dy) + s.off * p.dy_stride;
  p.dgx = static_cast<T*>(p.dgx) + s.off * GH;
  p.dgh = static_cast<T*>(p.dgh) + s.off * GH;
  if (p.prev) p.prev = s.prev_rows > 0 ? static_cast<const T*>(p.prev) + s.prev_off * p.prev_stride : p.init;
  p.n_prev = s.prev_rows;
  return p;
}

template <typename T>
struct BwdOperand {  // dgh of the step's row r0 + r, all G*H columns
  const T* dgh;
  int64_t GH, r0;
  StepRows s;
  FRNN_HD float operator()(int64_t r, int64_t k) const { return ld_l2(dgh + (s.off + r0 + r) * GH + k); }
};

template <typename T>
struct BwdSink {  // dh[b][u0 + c]; `add`: to the direct term the cell left there (GRU's z*dh, zoneout)
  T* dh;
  int64_t H, u0, r0;
  bool add;
  const T* mask = nullptr;  // [B, H] recurrent dropout: the product reached h_{t-1} * mask
  FRNN_HD void operator()(int64_t r, int64_t c, float v) const {
    if (u0 + c >= H) return;
    const int64_t i = (r0 + r) * H + u0 + c;
    if (mask) v *= static_cast<float>(mask[i]);
    dh[i] = static_cast<T>(add ? static_cast<float>(dh[i]) + v : v);
  }
};

// ---------------------------------------------------------------------------------------------------
// fastrnn's own cells (cell_ln.h, fp32: the drivers compute them in fp32). A LayerNorm needs a whole row of the
// recurrent projection before any of it is final, so a step has two phases with a barrier after each (a grid
// barrier with slices > 1, else the block's): forward the GEMM hs[rows, own columns] = operand . W_hh^T, then
// the row phase; backward the row phase (dgx, dgh, dc, and the part of dh_{t-1} that bypasses W_hh), then
// dh_{t-1}[rows, own units] += dgh . W_hh[:, own units] (times the recurrent-dropout mask). In the row phase
// block (tile, slice) takes its tile's rows r with r % slices == slice, whole, always the same ones, so that
// the running state of a row (c, cn, h, hm; dc) is read and written by one block only.
struct ExtFwd {
  Plan plan;
  Layout lay;
  int64_t H, G;
  ExtParams base;  // at row 0 of the [N, .] tensors (ext_fwd_step); h, hm, c, cn the running [B, .] state
  bool save;       // hs [N, G*H] kept per step, else a [B, G*H] scratch
  const void* w_hh;     // [G*H, H]
  const void* operand;  // [B, H] the GEMM's A: h_{t-1} (base.h), or h_{t-1} * rec_mask (base.hm)
};

struct ExtBwd {
  Plan plan;
  Layout lay;
  int64_t H, G;
  ExtGradParams base;  // at row 0 (ext_bwd_step); dh, dc the running [B, .] state; dgx, dgh [N, G*H]; part
                       // [blocks, part_width] one LayerNorm slot per block (slots = 1 after step_params)
  bool bypass;         // the row phase leaves a direct part of dh_{t-1} in dh (zoneout, GRU's z*h)
  const void* mask;    // [B, H] rec_mask or nullptr
  const void* w_hh;    // [G*H, H]
};

// The row phase's params of step s (the same for every block; ext_*_rows pick the block's rows), and in backward
// the block's LayerNorm slot.
FRNN_HD ExtParams ext_step_params(const ExtFwd& f, const StepRows& s) {
  return ext_fwd_step(f.base, s.rows, s.off, f.save, sizeof(float));
}

FRNN_HD ExtGradParams ext_step_params(const ExtBwd& f, const StepRows& s, int64_t blk) {
  ExtGradParams p = ext_bwd_step(f.base, s.rows, s.off, s.off, s.prev_rows, s.prev_off, sizeof(float));
  p.part = rows_down(p.part, blk, part_width(f.G * f.H, f.H), sizeof(float));
  p.slots = 1;
  return p;
}

struct RowsOperand {  // row r0 + r of a running [B, H] buffer
  const float* a;
  int64_t H, r0;
  FRNN_HD float operator()(int64_t r, int64_t k) const { return ld_l2(a + (r0 + r) * H + k); }
};

// The row phase: cell_ln.h's whole-row op on the rows of the block's tile that its slice takes, with executor x.
template <class Op, class X>
FRNN_HD void ext_fwd_rows(const X& x, const ExtParams& p, const Plan& plan, const Owned& o, int64_t n) {
  for (int64_t r = o.u0 / plan.units; r < n; r += plan.slices) ext_fwd_row<Op, X, float>(x, p, o.r0 + r);
}
template <class Op, class X>
FRNN_HD void ext_bwd_rows(const X& x, const ExtGradParams& p, const Plan& plan, const Owned& o, int64_t n) {
  for (int64_t r = o.u0 / plan.units; r < n; r += plan.slices) ext_bwd_row<Op, X, float>(x, p, o.r0 + r);
}

// ---------------------------------------------------------------------------------------------------
// The four block programs (plain cells and fastrnn's own, forward and backward) as the phases of one step, so
// that one kernel (persist_cuda.cu) and one emulator (persist.cpp) run them all. Every block runs each phase;
// after phase ph comes the step barrier where step_barrier_after(ph) (other blocks read what it wrote), else
// only the block's. X is the block's executor: gemm_then(g, sm, kept, n, a, pre, f) v = pre(tid) on each thread,
// the block GEMM of rows [0, n) up to its spilled partial sums (rows below `kept` staged already, by stage_own:
// one-chunk K only), then f(tid, v) on each thread (which reads the sums through Sums, or reduces them to a sink:
// gemm_to); threads(f) f(tid) for each of its threads, rows() cell_ln.h's row executor, peer(sm, q) the view of
// block q of its cluster whose staged operand is at sm's offset (distributed shared memory).
template <class X, typename T, class A, class Sink>
FRNN_HD void gemm_to(const X& x, const Gemm& g, const Smem<T>& sm, int64_t kept, int64_t n, const A& a,
                     const Sink& sink) {
  x.gemm_then(g, sm, kept, n, a, [](int) { return 0; }, [&](int tid, int) { reduce_to(g, sm, tid, n, sink); });
}

// A program whose last step leaves nothing to do (the kernel and the emulator call finish after the last step).
struct NoFinish {
  template <class... A>
  FRNN_HD static void finish(const A&...) {}
};

template <class Op, typename T>
struct FwdProgram : NoFinish {  // GEMM and cell of the block's units, then the step barrier
  using Args = Fwd;
  using Elem = T;
  static constexpr bool kForward = true;
  static constexpr int kPhases = 1;
  FRNN_HD static bool step_barrier_after(int) { return true; }
  FRNN_HD static Gemm gemm(const Args& f) {
    return make_gemm(f.H, f.G * f.plan.units, f.plan.bt, f.plan.mma, sizeof(T), f.plan.pad, f.plan.kc[0],
                     f.plan.push[0] ? 2 : 1);
  }
  FRNN_HD static void load(const Args& f, const Smem<T>& sm, const Gemm& g, int tid, int64_t u0) {
    fwd_load_w<T>(f, sm, g, tid, u0);
  }
  template <class X>
  FRNN_HD static void phase(const Args& f, int, const X& x, const Smem<T>& sm, const Gemm& g, const StepRows& s,
                            const Owned& o, int64_t n, int64_t) {
    if (n == 0) return;
    const CellParams p = fwd_step_params<T>(f, s);
    // h_{t-1} in shared memory where the cells of the step before put it there (exchange_peers), else from L2 (y):
    // a step reads staged operand t % 2 and puts h_t into the other (with one staged operand, the same one)
    const Smem<T> cur = sm.buffer(s.t), next = sm.buffer(s.t + 1);
    const int64_t peers = exchange_peers(f.plan, g);
    const int64_t kept = peers ? (s.prev_rows - o.r0 < 0 ? 0 : s.prev_rows - o.r0 < n ? s.prev_rows - o.r0 : n) : 0;
    const Sums<T> sums{g, cur};
    x.gemm_then(g, cur, kept, n,
                FwdOperand<T>{static_cast<const T*>(f.base.y), static_cast<const T*>(f.h0), f.H, o.r0, s},
                [&](int tid) { return fwd_prefetch<Op, T>(p, o, n, tid); },
                [&](int tid, const Prefetched& v) {
                  fwd_cells<Op, T>(p, o, f.plan.units, n, tid, sums, v, Put<T, X>{x, g, next, peers});
                });
  }
};

template <class Op, typename T>
struct BwdProgram {  // dh_t of the block's units (the step before's dgates . W_hh) and its cell backward, the step
                     // barrier; after the last step, dh of the initial state
  using Args = Bwd;
  using Elem = T;
  static constexpr bool kForward = false;
  static constexpr int kPhases = 1;
  FRNN_HD static bool step_barrier_after(int) { return true; }
  FRNN_HD static Gemm gemm(const Args& f) {
    return make_gemm(f.G * f.H, f.plan.units, f.plan.bt, f.plan.mma, sizeof(T), f.plan.pad, f.plan.kc[1],
                     f.plan.push[1] ? 2 : 1);
  }
  FRNN_HD static void load(const Args& f, const Smem<T>& sm, const Gemm& g, int tid, int64_t u0) {
    bwd_load_w<T>(f, sm, g, tid, u0);
  }
  // Step s's cells take dh_next of the rows that the step processed before it (sp, the next in time) had from that
  // step's dh GEMM, run here first: its sums go to the cells in shared memory, and their other inputs are loaded
  // under it. Rows the GEMM reached but this step has not (sequences of a reverse layer that start at sp) are done:
  // their sums go to the running dh, the gradient of their initial state. The cells put the step's dgates into
  // staged operand s.t % 2 (sp's is the other).
  template <class X>
  FRNN_HD static void phase(const Args& f, int, const X& x, const Smem<T>& sm, const Gemm& g, const StepRows& s,
                            const Owned& o, int64_t n, int64_t) {
    const int64_t k = f.lay.reverse ? f.lay.T - 1 - s.t : s.t;
    const StepRows sp = k + 1 < f.lay.T ? step_rows(f.lay, k + 1) : StepRows{};
    const int64_t np = k + 1 < f.lay.T ? tile_rows(f.plan, o, sp) : 0;
    const CellGradParams p = bwd_step_params<T>(f, s);
    const int64_t peers = exchange_peers(f.plan, g);
    const Put<T, X> put{x, g, sm.buffer(s.t), peers};
    const Smem<T> prev = sm.buffer(sp.t);
    const Sums<T> sums{g, prev};
    if (np == 0) {
      if (n == 0) return;
      x.threads([&](int tid) {
        bwd_cells<Op, T>(p, o, f.H, n, tid, sums, 0, f.gru, bwd_prefetch<Op, T>(p, o, n, 0, f.gru, tid), put);
      });
      return;
    }
    const BwdSink<T> done{static_cast<T*>(f.base.dh_prev), f.H, o.u0, o.r0, f.gru};
    x.gemm_then(g, prev, peers ? np : 0, np, BwdOperand<T>{static_cast<const T*>(f.base.dgh), f.G * f.H, o.r0, sp},
                [&](int tid) { return bwd_prefetch<Op, T>(p, o, n, np, f.gru, tid); },
                [&](int tid, const BwdPrefetched& v) {
                  for (int64_t i = tid + n * o.units; i < np * o.units; i += kThreads) {
                    const int64_t r = div_small(i, o.units);
                    done(r, i - r * o.units, sums(r, i - r * o.units));
                  }
                  bwd_cells<Op, T>(p, o, f.H, n, tid, sums, np, f.gru, v, put);
                });
  }
  // After the last step (k = 0): its dh GEMM, into the running dh (GRU: added to the direct part its cells left
  // there), the gradient of the initial state.
  template <class X>
  FRNN_HD static void finish(const Args& f, const X& x, const Smem<T>& sm, const Gemm& g, const Owned& o) {
    const StepRows s = step_rows(f.lay, 0);
    const int64_t n = tile_rows(f.plan, o, s);
    if (n == 0) return;
    gemm_to(x, g, sm.buffer(s.t), exchange_peers(f.plan, g) ? n : 0, n,
            BwdOperand<T>{static_cast<const T*>(f.base.dgh), f.G * f.H, o.r0, s},
            BwdSink<T>{static_cast<T*>(f.base.dh_prev), f.H, o.u0, o.r0, f.gru});
  }
};

template <class Op>
struct ExtFwdProgram : NoFinish {  // GEMM of the block's columns, the step barrier, the row phase, the step barrier
  using Args = ExtFwd;
  using Elem = float;
  static constexpr bool kForward = true;
  static constexpr int kPhases = 2;
  FRNN_HD static bool step_barrier_after(int) { return true; }
  FRNN_HD static Gemm gemm(const Args& f) {
    return make_gemm(f.H, f.G * f.plan.units, f.plan.bt, false, 4, f.plan.pad, f.plan.kc[0]);
  }
  FRNN_HD static void load(const Args& f, const Smem<float>& sm, const Gemm& g, int tid, int64_t u0) {
    fwd_load_w<float>(f, sm, g, tid, u0);
  }
  template <class X>
  FRNN_HD static void phase(const Args& f, int ph, const X& x, const Smem<float>& sm, const Gemm& g,
                            const StepRows& s, const Owned& o, int64_t n, int64_t) {
    const ExtParams p = ext_step_params(f, s);
    if (ph == 1) return ext_fwd_rows<Op>(x.rows(), p, f.plan, o, n);
    if (n == 0) return;
    gemm_to(x, g, sm, 0, n, RowsOperand{static_cast<const float*>(f.operand), f.H, o.r0},
            FwdSink<float>{static_cast<float*>(p.hs), f.H, f.G, f.plan.units, o.u0, o.r0});
  }
};

template <class Op>
struct ExtBwdProgram : NoFinish {  // the row phase, the step barrier, dh_{t-1} of the block's units, the step barrier
  using Args = ExtBwd;
  using Elem = float;
  static constexpr bool kForward = false;
  static constexpr int kPhases = 2;
  FRNN_HD static bool step_barrier_after(int) { return true; }
  FRNN_HD static Gemm gemm(const Args& f) {
    return make_gemm(f.G * f.H, f.plan.units, f.plan.bt, false, 4, f.plan.pad, f.plan.kc[1]);
  }
  FRNN_HD static void load(const Args& f, const Smem<float>& sm, const Gemm& g, int tid, int64_t u0) {
    bwd_load_w<float>(f, sm, g, tid, u0);
  }
  template <class X>
  FRNN_HD static void phase(const Args& f, int ph, const X& x, const Smem<float>& sm, const Gemm& g,
                            const StepRows& s, const Owned& o, int64_t n, int64_t blk) {
    if (ph == 0) return ext_bwd_rows<Op>(x.rows(), ext_step_params(f, s, blk), f.plan, o, n);
    if (n == 0) return;
    gemm_to(x, g, sm, 0, n, BwdOperand<float>{static_cast<const float*>(f.base.dgh), f.G * f.H, o.r0, s},
            BwdSink<float>{static_cast<float*>(const_cast<void*>(f.base.dh)), f.H, o.u0, o.r0, f.bypass,
                           static_cast<const float*>(f.mask)});
  }
};

// The cost model's pieces timed on a GPU (probe_cuda, for benchmarks/persist_calibrate.py): each block runs `iters`
// steps of the plan's step barrier, each after a block GEMM of g's shape where `gemm` is set, and writes the SM
// cycles (clock64) and nanoseconds (%globaltimer) of its loop. a: [rows * g.bt, g.K] in the storage type, the
// GEMM's operand, read through L2 as the engine reads h_{t-1}, block b reading rows (b % rows) * g.bt on (the
// engine's slices of a batch tile read the same rows: so many distinct rows keep its footprint in L2); out:
// [blocks * g.bt, g.R] in the storage type; cycles, ns: [blocks]. The plan gives the scheme, the blocks (tiles *
// slices; slices: a cluster's blocks) and the shared memory each block takes.
struct Probe {
  Plan plan;
  Gemm g;
  bool gemm;
  int64_t rows;
  bool exchange;  // the operand kept in shared memory from step to step (a one-chunk K): the stage loads nothing
  const void* a;
  void* out;
  int64_t iters;
  long long* cycles;
  long long* ns;
};

// CUDA: fp32, fp16, bf16, launched on `stream` (a cudaStream_t) of the current device; each returns the scheme
// launched (the grid barrier where a planned cluster does not fit). Defined in CUDA builds only (persist_cuda.cu),
// where only calls on CUDA tensors reach them.
int fwd_cuda(Mode m, Dtype d, const Dirs<Fwd>& f, void* stream);
int bwd_cuda(Mode m, Dtype d, const Dirs<Bwd>& f, void* stream);
// CUDA, fastrnn's own cells: fp32.
int ext_fwd_cuda(Mode m, const Dirs<ExtFwd>& f, void* stream);
int ext_bwd_cuda(Mode m, const Dirs<ExtBwd>& f, void* stream);
// The probe with Ws and the staged operand in d's storage (fp32 on the tensor cores: TF32); returns the scheme it
// ran, which is the grid barrier where a planned cluster does not fit (as for the engine's launches).
int probe_cuda(Dtype d, const Probe& p, void* stream);
#ifdef FASTRNN_WITH_CUDA
Limits limits(int device);
#endif

}  // namespace persist
}  // namespace fastrnn
