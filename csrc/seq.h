// What the sequence drivers (rnn.cpp, rnn_ext.cpp) and the CPU engine (engine_cpu.cpp) share: the validated
// problem, the workspace allocator and the backward's chunked weight-gradient GEMMs.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cell/dispatch.h"
#include "persist.h"

namespace fastrnn {

using OptTensor = std::optional<at::Tensor>;

// Problem sizes and the step layout, validated once per call.
struct Problem {
  Mode mode;
  bool lstm, gru, proj, packed;
  int64_t G, I, H, Hout, B, N, T;
  std::vector<int64_t> size;  // size[t]: active rows of step t
  std::vector<int64_t> off;   // off[t]: first row of step t; off[T] = N
};

Mode parse_mode(const std::string& s);
const char* mode_name(Mode m);  // parse_mode's inverse
inline int64_t gates_of(Mode m) { return m == Mode::LSTM ? 4 : m == Mode::GRU ? 3 : 1; }
Dtype dtype_of(const at::Tensor& t);
std::string shape_str(at::IntArrayRef s);

// `x` is the tensor t must match in device and dtype, `like` its name in the message.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& x, std::vector<int64_t> shape,
                const char* like = "x");

// The sizes and step layout of a call. `validate` adds the dtype/device/shape checks of every input, done in
// forward only: backward receives the very tensors forward validated (autograd saved them for it), so it
// re-derives the layout and checks just what is its own (dy, dh_n, dc_n, the saved activations).
Problem check_inputs(Mode m, const at::Tensor& x, const OptTensor& batch_sizes, const at::Tensor& h0,
                     const OptTensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                     const OptTensor& b_hh, const OptTensor& w_hr, bool validate);

// Address of row `row` of a contiguous matrix with `width` columns.
void* row_ptr(const at::Tensor& t, int64_t row, int64_t width);

at::Tensor contig(const OptTensor& t);
OptTensor as_float(const OptTensor& t);

// The ops compute in their inputs' dtype, which the caller chose (the modules follow torch.nn under autocast);
// without this guard an enclosing autocast region would turn the internal GEMMs' outputs into bf16/fp16.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The big GEMMs (all steps' input projection, dx and the weight gradients): c = a . b, plus c's old values
// with `add`. fp32 CPU tensors go to oneDNN's matmul (25-30 % faster than at::mm's MKL sgemm at these shapes
// on Zen 4) where torch has it and torch.backends.mkldnn is enabled; everything else to at::mm/addmm_.
void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool add);
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b);
// the engine gemm() takes for CPU tensors of this dtype now, for build_info()
std::string big_gemm_engine(at::ScalarType t);

// An uninitialised workspace or output; NaN-filled under the _C._set_nan_fill test hook, so a test can prove
// no uninitialised element reaches a result.
at::Tensor ws_empty(at::IntArrayRef shape, const at::TensorOptions& opts);

inline at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Scratch that stays with the calling thread: slot `slot` is reused by the next call that asks for it, so an
// internal temporary (packed weights, gradient sums in the engine's row order) touches fresh memory once per
// thread instead of once per call. Fresh memory costs a page fault per 4 KiB (~2 us each on the 2-core Zen 4
// VM); with this scratch, fwd+bwd at (T,B,I,H,L) = (100,1,128,512,2) went from 40.7 to 31.4 ms (LSTM) and
// 26.5 to 22.4 (GRU). Only for a tensor that dies with the call; NaN-filled under the test hook like
// ws_empty, which serves a request instead once kScratchBytes are kept by the thread. CPU only.
enum ScratchSlot {
  kWsPanelX, kWsPanelH, kWsRowsX, kWsRowsH, kWsPanelDh, kWsDgx, kWsDgh, kWsDwIh, kWsDwHh,
  kWsPackGx, kWsPackGh, kWsStatesT, kWsDwT, kWsPanelDx, kWsSlots
};
constexpr int64_t kScratchBytes = 64 << 20;
at::Tensor ws_scratch(ScratchSlot slot, at::IntArrayRef shape, const at::TensorOptions& opts);

// The dtype of the workspaces and saved activations: fp32 for 16-bit sequences on the CPU (the engine keeps
// state and gates in fp32 and rounds only what it returns), the sequence dtype otherwise.
at::ScalarType ws_dtype(const at::Tensor& x);

// The backward's steps grouped into chunks [t_begin, t_end) of consecutive t (so of consecutive rows);
// rmax: the most rows in one chunk. `single`: one chunk, so that each 16-bit weight gradient is a single
// GEMM with fp32 accumulation instead of a sum of rounded partials.
struct Chunks {
  std::vector<std::pair<int64_t, int64_t>> list;
  int64_t rmax = 0;
};
Chunks backward_chunks(const Problem& pr, bool single);

// Calls f(t_begin, t_end) for each chunk in the backward's order (against the direction of the forward).
void for_each_chunk(const Problem& pr, const Chunks& chunks, bool reverse,
                    const std::function<void(int64_t, int64_t)>& f);

// The backward's time loop: chunk by chunk (for_each_chunk), step(t, row of t's first row within the chunk) for
// each step against the forward's direction, then flush(lo, R) with the chunk's rows [lo, lo + R).
void backward_steps(const Problem& pr, const Chunks& chunks, bool reverse,
                    const std::function<void(int64_t, int64_t)>& step,
                    const std::function<void(int64_t, int64_t)>& flush);

// The step whose saved rows hold step t's h_{t-1} and c_{t-1} (the one before it in the forward's order), and how
// many of step t's rows it covers; the others start at step t from the initial state (reverse direction).
struct PrevStep {
  int64_t t;     // meaningful only when rows > 0
  int64_t rows;  // 0: no step before t
};
PrevStep prev_step(const Problem& pr, int64_t t, bool reverse);

// hp: [b, Hout] h_{t-1} of step t's rows: the previous step's y rows, then h0's.
void gather_hprev(const Problem& pr, const PrevStep& prev, const at::Tensor& y, const at::Tensor& h0, at::Tensor hp);

// A backward's checks of the gradients it is given: y, dy [N, Hout], dh_n [B, Hout], dc_n [B, H] (LSTM).
void check_grad_outputs(const Problem& pr, const at::Tensor& x, const at::Tensor& y, const at::Tensor& dy,
                        const at::Tensor& dh_n, const OptTensor& dc_n);

// An LSTM projection (proj_size) in a backward: dtot [rmax, Hout] the gradient reaching each row's projected h
// (dW_hr's operand, with the chunk's hr [rmax, H] = o*tanh(.)), dhr [B, H] its share in o*tanh(.), zeros [B, H]
// the dy the cell kernel reads beside it. All undefined without a projection.
struct ProjGrad {
  at::Tensor dtot, hr, dhr, zeros;

  ProjGrad(const Problem& pr, int64_t rmax, const at::TensorOptions& opts);
  // dtot's rows of a step at chunk row `local`: dh_b + dy_b, the gradient reaching its h_t
  at::Tensor total(int64_t local, const at::Tensor& dh_b, const at::Tensor& dy_b) const;
  // dhr = dt w_hr, and the cell kernel's dh/dy (params P) pointed at it
  template <class P>
  void to_cell(P& p, const at::Tensor& dt, const at::Tensor& w_hr) const {
    at::Tensor dhr_b = dhr.narrow(0, 0, dt.size(0));
    at::mm_out(dhr_b, dt, w_hr);
    p.dh = dhr.data_ptr();
    p.dh_stride = dhr.size(1);
    p.dy = zeros.data_ptr();
    p.dy_stride = zeros.size(1);
  }
};

// Test hooks (_C._set_nan_fill, _C._set_chunk_rows, _C._set_in_place_share, _C._set_engine_steps,
// _C._set_intel_rules): NaN-fill every workspace; the backward's chunk size in rows (0: the default), so that small
// problems cross many chunk boundaries; the share of W_hh per thread in bytes from which a one-row forward reads W_hh in place
// (engine_cpu.cpp's DotWeight; 0: the default, half the L2), so that small problems take that path; the steps from
// which a call takes the CPU engine, with gradients or without (0: the defaults, engine_cpu.cpp's kTrainSteps and
// kInferSteps), so that short sequences test it; whether the CPU engine applies the rules measured on an Intel CPU
// (-1: the default, by the CPU's vendor), so that either vendor's choices run anywhere.
void set_nan_fill(bool on);
void set_chunk_rows(int64_t rows);
void set_in_place_share(int64_t bytes);
void set_engine_steps(int64_t steps);
void set_intel_rules(int64_t on);
// Whether the CPU engine and gemm() apply the rules measured on an Intel CPU (its vendor's, or set_intel_rules)
bool intel_rules_on();

// Gradients the chunks accumulate into, each in the row order of the weights handed to flush_chunk.
// dx undefined without need_dx, db_x without bias, db_h unless GRU with b_hh.
struct GradSums {
  at::Tensor dx, dw_ih, dw_hh, db_x, db_h, ones;
  // Whether a chunk has written the weight and bias sums yet: the first chunk writes them and later ones add, so
  // that the sums need no zero fill (weight-sized: at one step of a cell in a training loop, a zeroed 8 MiB for
  // an LSTM of H = 512 that the first GEMM then reads back). A call of no rows gets them zeroed.
  bool dw_written = false, db_written = false;
};

// Folds the dgates rows [lo, lo + R) of one chunk (gx, gh: [R, G*H], gh = gx but for GRU) into g with big
// GEMMs: dx rows, dW_ih += gx^T x, dW_hh += gh^T h_prev, the bias sums. h_prev comes from hprev ([R, Hout],
// gathered by the caller: packed, or the recurrent GEMM's masked operand) where defined, else from y shifted by
// one step and h0 (dense).
// scratch_dw: dw_ih and dw_hh in ws_scratch (the caller copies them out, as the engine does into PyTorch's order)
GradSums grad_sums(const Problem& pr, const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   bool has_b_ih, bool has_b_hh, bool need_dx, int64_t rmax, bool scratch_dw = false);
// db_ih, db_hh from g ([0] where the bias is absent): both are the input-side sum but for GRU's b_hh.
std::pair<at::Tensor, at::Tensor> bias_grads(const GradSums& g, bool has_b_ih, bool has_b_hh, bool gru,
                                             const at::Tensor& like);

// Where a dense backward chunk's h_prev rows (rows [lo, lo + R)) come from: y's rows one step back, except the
// sequence's first step (forward: the chunk's first B rows; reverse: its last), whose h_prev is h0.
struct DenseHprev {
  int64_t h0_at;   // chunk row of h0's first row; -1 when no row of the chunk takes h0
  int64_t y_at;    // chunk row of the first of from_y rows taken from y
  int64_t from_y;  // rows taken from y
  int64_t y_row;   // y's row for chunk row y_at
};
DenseHprev dense_hprev(const Problem& pr, bool reverse, int64_t lo, int64_t R);

// A backward chunk's rows [lo, lo + R) into g: the bias sums and, with products, dx = gx . w_ih and the weight
// gradients dW_ih += gx^T . x and dW_hh += gh^T . h_prev (h_prev: hprev's rows where defined (packed), else y
// shifted by one step and h0).
void flush_chunk(const Problem& pr, bool reverse, int64_t lo, int64_t R, const at::Tensor& gx, const at::Tensor& gh,
                 const at::Tensor& x, const at::Tensor& y, const at::Tensor& h0, const at::Tensor& hprev,
                 const at::Tensor& w_ih, GradSums& g, bool products = true);

// Whether the CPU engine (per-step fused brgemm + cell, engine_cpu.cpp) runs this problem with x's dtype, and
// why not ("" when it does). `training`: the forward saves for a backward (or is that backward); the engine
// starts from fewer rows where nothing is saved, so a forward and its backward must pass the same.
bool engine_takes(const Problem& pr, const at::Tensor& x, bool training);
std::string engine_refusal(const Problem& pr, const at::Tensor& x, bool training);
// Which weights the engine's forward reads in place (a matrix-vector product per step, no packed panels): 0 none,
// 1 W_hh, 2 W_hh and W_ih.
int engine_in_place(const Problem& pr, const at::Tensor& x);
// Whether the engine's forward computes x_t . W_ih^T inside each step (else up front for all rows, or in place)
bool engine_projects_in_step(const Problem& pr, const at::Tensor& x);
// Which GEMM engine the CPU runs per dtype, for build_info().
std::vector<std::pair<std::string, std::string>> engine_report();
// what the CPU engine read from the machine (ISA level, caches) and the block sizes it derived, in words
std::string engine_machine();

// layer_fwd / layer_bwd of the engine; bias is b_ih + b_hh as rnn.cpp folds it (GRU: without b_hn), in
// PyTorch's gate order. Same returns as rnn.cpp's layer_fwd / layer_bwd, with the saved gates in the
// engine's blocked layout.
std::vector<at::Tensor> engine_fwd(const Problem& pr, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& bias,
                                   const at::Tensor& b_hn, bool reverse, bool save);
std::vector<at::Tensor> engine_bwd(const Problem& pr, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh, bool has_b_ih, bool has_b_hh,
                                   bool reverse, const at::Tensor& y, const at::Tensor& gates,
                                   const at::Tensor& c_save, const at::Tensor& hn_save, const at::Tensor& dy,
                                   const at::Tensor& dh_n, const at::Tensor& dc_n, bool need_dx);

// The CPU engine's team and ukernel for a driver whose per-step row work needs every column of the step's
// GEMM first (fastrnn's own cells: a LayerNorm spans the whole row). C = A . W with W [K, N] fp32, packed once
// into panels of column blocks; each of the team's threads owns whole blocks.
class StepGemm {
 public:
  // fp32 on the CPU with oneDNN's ukernel present (else the driver keeps its at::mm path)
  static bool takes(const at::Tensor& x);
  explicit StepGemm(const at::Tensor& w_kn);
  ~StepGemm();
  StepGemm(const StepGemm&) = delete;
  StepGemm& operator=(const StepGemm&) = delete;
  int threads() const;
  // thread tid's columns [n0, n1)
  std::pair<int64_t, int64_t> cols(int tid) const;
  // C[:M, own columns] = A[:M, :K] . W[:, own columns], plus C's old values with `add`; lda, ldc in elements.
  // `backwards` walks the thread's blocks last to first: odd steps do, forward and backward (engine_fwd says why).
  void run(int tid, int64_t M, const float* A, int64_t lda, float* C, int64_t ldc, bool add, bool backwards) const;
  // body(tid, step, phase) on every thread of the team for steps x phases, a barrier after each phase
  void steps(int64_t n, int phases, const std::function<void(int, int64_t, int)>& body) const;

 private:
  struct Impl;
  Impl* impl_;
};

// rnn_ext.cpp, fastrnn's own cells: the LayerArgs, then `ext`, the nine CellExt fields in their order
// (fastrnn/ops/__init__.py). Forward returns y, h_n, c_n (LSTM, else [0]) and the saved xs, hs, stats, c
// (fastrnn.ops.SavedExt); backward the gradients of rnn.cpp's layer_bwd, then the six LayerNorm parameters'
// ([0] where absent).
std::vector<at::Tensor> layer_ext_fwd(const std::string& mode, const at::Tensor& x, const OptTensor& batch_sizes,
                                      const at::Tensor& h0, const OptTensor& c0, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                      const OptTensor& w_hr, bool reverse, const std::vector<OptTensor>& ext,
                                      bool save);
std::vector<at::Tensor> layer_ext_bwd(const std::string& mode, const at::Tensor& x, const OptTensor& batch_sizes,
                                      const at::Tensor& h0, const OptTensor& c0, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                      const OptTensor& w_hr, bool reverse, const std::vector<OptTensor>& ext,
                                      const at::Tensor& y, const at::Tensor& xs, const at::Tensor& hs,
                                      const at::Tensor& stats, const at::Tensor& c, const at::Tensor& dy,
                                      const at::Tensor& dh_n, const OptTensor& dc_n, bool need_dx);

namespace persist {
// persist.cpp: the plan a call gets (scheme kNone: the per-step path, with the reason in `why`): CUDA with
// FASTRNN_PERSISTENT=1, or CPU fp32 / fp16 / bf16 under the emulation test hook (16-bit then keeps its
// workspaces and saved activations in its own dtype, as on CUDA, not in fp32 as the CPU otherwise does); then its forward and backward, with
// layer_fwd / layer_bwd's returns (saved activations in PyTorch's layout, as the per-step path).
// With `cells`: for fastrnn's own cells (fp32 calls; 16-bit ones are widened before they plan).
Plan plan_for(const Problem& pr, const at::Tensor& x, bool cells = false);
// The plan for both directions of a bidirectional layer of plain cells (persist.h make_pair_plan): dirs == 2 when
// they share one launch, else a direction's own plan (kNone: the per-step path).
Plan pair_plan_for(const Problem& pr, const at::Tensor& x);
// The plan on a device of limits `lim` for G gates, batch B, hidden H, element size esize (8: fp64), with or
// without proj_size, plain cells or fastrnn's own, one direction or a bidirectional layer's two (`pair`): what
// plan_for and pair_plan_for decide once they know the device, and what persistent_plan() reports.
Plan plan_with(const Limits& lim, int64_t G, int64_t B, int64_t H, int64_t esize, bool proj, bool cells = false,
               bool pair = false);
// One direction of a launch, as layer_fwd / layer_bwd hold it (contiguous; bias: b_ih with b_hh folded in as
// the per-step driver adds it, b_hn GRU's).
struct FwdDir {
  at::Tensor h0, c0, w_ih, w_hh, bias, b_hn;
  bool reverse;
};
struct BwdDir {
  at::Tensor h0, c0, w_ih, w_hh;
  bool has_b_ih, has_b_hh, reverse;
  at::Tensor y, gates, c_save, hn_save, dy, dh_n, dc_n;
};
// One launch over plan.dirs directions; per direction layer_fwd's (y, h_n, c_n, gates, c, hn) and layer_bwd's
// (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr) returns.
std::vector<std::vector<at::Tensor>> fwd(const Problem& pr, const Plan& plan, const at::Tensor& x,
                                         const std::vector<FwdDir>& dirs, bool save);
std::vector<std::vector<at::Tensor>> bwd(const Problem& pr, const Plan& plan, const at::Tensor& x,
                                         const std::vector<BwdDir>& dirs, bool need_dx);
// fastrnn's own cells (rnn_ext.cpp's buffers and params, base at row 0 as ext_fwd_step / ext_bwd_step take
// it): the forward's recurrence with `operand` its GEMM's A (h, or h * rec_mask); the backward's, leaving dgx,
// dgh of all rows and the LayerNorm slots (one per block) for the driver's weight gradients.
void ext_fwd(const Problem& pr, const Plan& plan, const at::Tensor& x, const ExtParams& base, bool save,
             const at::Tensor& w_hh, const at::Tensor& operand, bool reverse);
void ext_bwd(const Problem& pr, const Plan& plan, const at::Tensor& x, const ExtGradParams& base, bool bypass,
             const OptTensor& mask, const at::Tensor& w_hh, bool reverse);
// Test hook (_C._set_persist_emulation): run CPU fp32 and 16-bit calls through the emulator as on a GPU with
// `sms` SMs, `smem` bytes of shared memory per block, clusters of up to `cluster` blocks (0: none) and, with
// `mma`, tensor cores for 16-bit (and fp32 with `tf32`); sms == 0: off; !clusters_fit: a planned cluster runs at the
// grid barrier, as a launch does where the GPU cannot place its clusters; clusters_at_once: as
// set_clusters_at_once. emulating(x): whether it is on for x's device and dtype; emulated_limits(): the stand-in.
void set_emulation(int64_t sms, int64_t smem, int64_t cluster, bool mma, bool tf32, bool clusters_fit,
                   const std::map<int64_t, int64_t>& clusters_at_once);
// A stand-in device's Limits::clusters_at_once from {blocks per cluster: clusters held at once}; sizes left out
// stay unknown (sms / size). A size outside 1 to kMaxCluster, or a negative count, is refused.
void set_clusters_at_once(Limits& lim, const std::map<int64_t, int64_t>& at_once);
bool emulating(const at::Tensor& x);
const Limits& emulated_limits();
// Test hook (_C._persist_bank_report): the shared-memory wavefronts of one K step of the SIMT block GEMM over K x R
// with bt rows (storage element size es), per warp instruction of each phase (stage, ws, xs, spill, reduce: the
// stage's stores, accumulate's loads of Ws and of the stage, spill's stores, reduce's loads): {phase: (wavefronts,
// instructions)}, a phase free of bank conflicts having as many of each. ldw, lds, ldr > 0 replace make_gemm's.
std::map<std::string, std::pair<int64_t, int64_t>> bank_report(int64_t K, int64_t R, int64_t bt, int64_t es,
                                                                int64_t ldw, int64_t lds, int64_t ldr);
// Calibration hooks (benchmarks/persist_calibrate.py). gemm_price (_C._persist_gemm_price): the cost model's view
// of a block GEMM of K x R over bt rows (on the tensor cores with `mma`; es bytes per Ws element and staged operand,
// 4: fp32, TF32 on the tensor cores, 2: 16-bit; the operand staged in chunks of kc): its price in the model's units
// with the bank conflicts the plan adds (`units`), a thread's K steps (SIMT) or a warp's mma rounds (`steps`), its
// chunks staged from L2 and exchanged in shared memory (with `exchange`, as the plan's cells hand its one chunk
// over: none staged, one exchanged) and shared memory (with `stages` staged operands: 2 where the plan pushes, its
// "push"); `pad`: the SIMT loop's padded strides (a plan's "padded"). probe (_C._persist_probe): on
// CUDA device `device`, `blocks` blocks (one per SM) each run `iters` steps of `scheme`'s barrier ("block", "grid",
// or "cluster" of `cluster` blocks), each after that GEMM where K > 0, its operand `rows` batch tiles of bt rows
// (a plan's tiles), staged from L2 each step or, with `exchange`, kept in shared memory; returns each block's SM
// cycles and nanoseconds and the scheme that ran (a cluster that does not fit runs at the grid barrier, as the
// engine's launches do).
struct GemmPrice {
  int64_t units, steps, chunks, exchanged, smem;
  bool fits;
};
GemmPrice gemm_price(int64_t K, int64_t R, int64_t bt, bool mma, int64_t es, int64_t kc, bool pad, int64_t stages,
                     bool exchange);
struct ProbeResult {
  at::Tensor cycles, ns;
  int scheme;
};
ProbeResult probe(int device, const std::string& scheme, int64_t blocks, int64_t cluster, int64_t K, int64_t R,
                  int64_t bt, bool mma, int64_t es, int64_t kc, bool pad, int64_t rows, int64_t iters, bool exchange);
// Phase clocks (_C._persist_clocks, benchmarks/persist_phases.py): while they are on, every CUDA launch of the
// engine is timed per block (persist.h's ClockSlot) and recorded: which launch ("fwd", "bwd", "ext_fwd",
// "ext_bwd"), its mode, steps and plan (its scheme the one that ran), and the clocks, [blocks][kClockSlots] int64 on
// its device (read them after the launch's stream has run it). clocks(on) turns them on or off and returns the
// records made since they were last turned on (turning them on starts afresh; until then each record stays).
struct ClockRecord {
  std::string launch;
  Mode mode;
  int64_t T;
  Plan plan;
  at::Tensor clocks;
};
std::vector<ClockRecord> clocks(bool on);
// Whether torch allows TF32 for cuDNN's RNN (torch.backends.cudnn.rnn.fp32_precision, or the older
// torch.backends.cudnn.allow_tf32), read per call as torch.nn's cuDNN path does: fp32 CUDA calls then plan the
// persistent engine's GEMMs on tensor cores in TF32.
bool tf32_allowed();
// Whether CUDA calls take the persistent engine where a plan fits (FASTRNN_PERSISTENT=1), read per call; the one
// place the switch is decided, which explain and `python -m fastrnn` report through _C.persistent_enabled.
bool cuda_enabled();
}  // namespace persist

}  // namespace fastrnn
