// Driver of the persistent engine (persist.h): when it runs, the plan from the device's limits, the buffers and
// params of one launch, the big GEMMs around it (input projection before; dx and the weight gradients after,
// shared with rnn.cpp through seq.h), and the CPU emulator of its block program.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/version.h>

#ifdef FASTRNN_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/row_serial.h"
#include "persist.h"
#include "seq.h"

namespace fastrnn {
namespace persist {
namespace {

using at::Tensor;

// Test hook (_C._set_persist_emulation): CPU fp32, fp16 and bf16 calls run the block program on the CPU as if on
// a GPU with these limits; sms == 0 turns it off.
Limits g_emulated;
// ... and whether its clusters fit, else a planned cluster runs at the grid barrier (persist_cuda.cu launch())
bool g_clusters_fit = true;

// The value in slot s of a lane's 16-bit fragment registers (slot 2i in the low half of register i).
template <typename T>
float half_at(const uint32_t* regs, int s) {
  const uint16_t bits = static_cast<uint16_t>(regs[s / 2] >> (16 * (s % 2)));
  T v;
  std::memcpy(&v, &bits, sizeof(bits));
  return static_cast<float>(v);
}

// fp32 register s of a lane's TF32 fragment.
float word_at(const uint32_t* regs, int s) {
  float v;
  std::memcpy(&v, &regs[s], sizeof(v));
  return v;
}

// mma.sync on the CPU for one lane: the warp's A (16 x K) and B (K x 8) gathered from every lane's fragments by
// the PTX ISA's tables (lane = 4 * group + t), which persist.h's w_index and load_frags must match for the sums
// to be right. m16n8k16 (16-bit): A's slot s at row group + 8 * (s / 2 % 2), column 2t + s % 2 + 8 * (s / 4);
// B's slot s at row 2t + s % 2 + 8 * (s / 2), column group. m16n8k8 (TF32): A's slot s at row group + 8 * (s % 2),
// column t + 4 * (s / 2); B's slot s at row t + 4 * s, column group. Both: D's value e at row group + 8 * (e / 2),
// column 2t + e % 2.
template <typename T>
struct EmulatedMma {
  static constexpr int K = sizeof(T) == 2 ? 16 : 8;
  int lane;
  template <class F>
  void operator()(float* d, const F& frags) const {
    float a[16][K], b[K][8];
    for (int l = 0; l < 32; ++l) {
      const Frags f = frags(l);
      const int grp = l / 4, t = l % 4;
      if constexpr (K == 16) {
        for (int s = 0; s < 8; ++s) a[grp + 8 * (s / 2 % 2)][2 * t + s % 2 + 8 * (s / 4)] = half_at<T>(f.a, s);
        for (int s = 0; s < 4; ++s) b[2 * t + s % 2 + 8 * (s / 2)][grp] = half_at<T>(f.b, s);
      } else {
        for (int s = 0; s < 4; ++s) a[grp + 8 * (s % 2)][t + 4 * (s / 2)] = word_at(f.a, s);
        for (int s = 0; s < 2; ++s) b[t + 4 * s][grp] = word_at(f.b, s);
      }
    }
    const int grp = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      float v = d[e];
      for (int k = 0; k < K; ++k) v = std::fma(a[grp + 8 * (e / 2)][k], b[k][2 * t + e % 2], v);
      d[e] = v;
    }
  }
};

// One block's GEMM of a step as persist_cuda.cu's block_gemm runs it: each phase on every thread before the next
// (the block barrier), each thread's accumulators kept across K chunks in `acc` ([kThreads][kTile]), each thread's
// pre(tid) from before the GEMM until then(tid, it) after.
template <typename T, class A, class Pre, class Then>
void emulate_gemm(const Gemm& g, const Smem<T>& sm, int64_t kept, int64_t n, const A& a, const Pre& pre,
                  const Then& then, std::vector<float>& acc) {
  std::vector<decltype(pre(0))> early;
  for (int tid = 0; tid < kThreads; ++tid) early.push_back(pre(tid));
  std::fill(acc.begin(), acc.end(), 0.0f);
  if (g.mma) {
    for (int64_t k0 = 0; k0 < g.K; k0 += g.kc) {
      for (int tid = 0; tid < kThreads; ++tid) stage_mma(g, sm, tid, k0, kept, n, a);
      for (int tid = 0; tid < kThreads; ++tid) accumulate_mma(g, sm, tid, k0, &acc[tid * kTile], EmulatedMma<T>{tid % 32});
    }
    for (int tid = 0; tid < kThreads; ++tid) spill_mma(g, sm, tid, &acc[tid * kTile]);
  } else {
    for (int64_t k0 = 0; k0 < g.K; k0 += g.kc) {
      for (int tid = 0; tid < kThreads; ++tid) stage(g, sm, tid, k0, kept, n, a);
      for (int tid = 0; tid < kThreads; ++tid) accumulate(g, sm, tid, k0, n, &acc[tid * kTile]);
    }
    for (int tid = 0; tid < kThreads; ++tid) spill(g, sm, tid, &acc[tid * kTile]);
  }
  for (int tid = 0; tid < kThreads; ++tid) then(tid, early[tid]);
}

// Every block's shared memory for the emulator, as the kernels carve theirs.
template <typename T>
struct Blocks {
  std::vector<std::vector<char>> smem;
  std::vector<float> acc = std::vector<float>(int64_t(kThreads) * kTile);
  Gemm g;  // the launch's GEMM, whose layout carves the memory

  // every block's shared memory, W_hh's slice loaded by `load(sm, tid, u0)`; the rest NaN bytes (fp32, fp16 and
  // bf16 alike), as a GPU's shared memory holds whatever was there: a read of a value never written shows
  template <class Load>
  Blocks(const Plan& p, const Gemm& gemm, int64_t H, const Load& load)
      : smem(dir_blocks(p), std::vector<char>(p.smem, static_cast<char>(0xff))), g(gemm) {
    // a carving beyond the plan's bytes would run past the launch's shared memory on the device
    if (smem_bytes(g) > p.smem) throw std::logic_error("fastrnn: the persistent engine's GEMM outgrows its plan");
    for (int64_t b = 0; b < blocks(); ++b) {
      for (int tid = 0; tid < kThreads; ++tid) load(sm(b), tid, owned(p, H, b).u0);
      for (int tid = 0; tid < kThreads; ++tid) zero_stages(g, sm(b), tid);
    }
  }
  int64_t blocks() const { return static_cast<int64_t>(smem.size()); }
  Smem<T> sm(int64_t b) { return Smem<T>::carve(smem[b].data(), g); }
};

// The block's executor for persist.h's programs on the CPU: each phase on every thread in turn, the GEMM as
// persist_cuda.cu's block_gemm runs it, rows on one thread (RowSerial, the CPU kernels' executor).
struct EmulatedBlock {
  std::vector<float>* acc;
  std::vector<std::vector<char>>* smem;  // the direction's blocks' shared memory
  int64_t first;                         // the block of slice 0 of this block's batch tile (its cluster's rank 0)
  char* base;                            // this block's shared memory
  bool cluster;                          // launched as clusters: outside one a GPU block has no peers to map
  template <typename T>
  Smem<T> peer(const Smem<T>& sm, int64_t q) const {
    if (!cluster) throw std::logic_error("fastrnn: the persistent engine mapped a peer's shared memory outside of a "
                                         "cluster");
    Smem<T> v = sm;
    v.stage = reinterpret_cast<float*>((*smem)[first + q].data() + (reinterpret_cast<char*>(sm.stage) - base));
    return v;
  }
  template <typename T, class A, class Pre, class Then>
  void gemm_then(const Gemm& g, const Smem<T>& sm, int64_t kept, int64_t n, const A& a, const Pre& pre,
                 const Then& then) const {
    emulate_gemm(g, sm, kept, n, a, pre, then, *acc);
  }
  template <class F>
  void threads(const F& f) const {
    for (int tid = 0; tid < kThreads; ++tid) f(tid);
  }
  RowSerial rows() const { return {}; }
};

// A block program (persist.h: FwdProgram, BwdProgram, ExtFwdProgram, ExtBwdProgram) on the CPU, over the launch's
// directions: one sync group (a direction's batch tile) after another, the last first, through every step and its
// finish, each phase on all of the group's blocks before the next. That is what the GPU's step barriers guarantee
// and no more: a block that read another group's rows would find them NaN (the tests poison the workspace) or from
// another step.
template <class Prog>
void emulate(Dirs<typename Prog::Args> ds) {
  using T = typename Prog::Elem;
  if (ds.d[0].plan.scheme == kCluster && !g_clusters_fit) ds.d[0].plan.scheme = ds.d[1].plan.scheme = kGrid;
  const Plan& p = ds.d[0].plan;
  const int64_t per = dir_blocks(p);
  std::vector<Blocks<T>> bl;
  for (int64_t d = 0; d < p.dirs; ++d) {
    const auto& f = ds.d[d];
    const Gemm g = Prog::gemm(f);
    bl.emplace_back(f.plan, g, f.H, [&](const Smem<T>& sm, int tid, int64_t u0) { Prog::load(f, sm, g, tid, u0); });
  }
  // fn(args, executor, shared memory, gemm, owned, blk) of every block of sync group grp, in launch order
  const auto each_block = [&](int64_t grp, const auto& fn) {
    for (int64_t b = 0; b < p.dirs * per; ++b) {
      if (sync_group(p, b) != grp) continue;
      const LaunchBlock lb = launch_block(p, b);
      const auto& f = ds.d[lb.dir];
      auto& mem = bl[lb.dir];
      const EmulatedBlock x{&mem.acc, &mem.smem, lb.blk - lb.blk % f.plan.slices, mem.smem[lb.blk].data(),
                            p.scheme == kCluster};
      fn(f, x, mem.sm(lb.blk), mem.g, owned(f.plan, f.H, lb.blk), lb.blk);
    }
  };
  for (int64_t grp = sync_groups(p) - 1; grp >= 0; --grp) {
    for (int64_t i = 0; i < ds.d[0].lay.T; ++i) {
      for (int ph = 0; ph < Prog::kPhases; ++ph) {
        each_block(grp, [&](const auto& f, const EmulatedBlock& x, const Smem<T>& sm, const Gemm& g, const Owned& o,
                            int64_t blk) {
          const StepRows s = step_rows(f.lay, Prog::kForward ? i : f.lay.T - 1 - i);
          Prog::phase(f, ph, x, sm, g, s, o, tile_rows(f.plan, o, s), blk);
        });
      }
    }
    each_block(grp, [&](const auto& f, const EmulatedBlock& x, const Smem<T>& sm, const Gemm& g, const Owned& o,
                        int64_t) { Prog::finish(f, x, sm, g, o); });
  }
}

// f(T{}) with the storage type of x: the emulator runs what the kernels store, fp32 or 16-bit.
template <class F>
void with_storage(const Tensor& x, const F& f) {
  switch (x.scalar_type()) {
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: return f(float{});
  }
}

// Host indices on x's device. To CUDA through pinned memory without blocking: the caching host allocator keeps
// the pinned block until the copy on the current stream has run.
Tensor indices_on(const std::vector<int64_t>& v, const Tensor& x) {
  Tensor host = at::tensor(v, at::TensorOptions().dtype(at::kLong));
  return x.is_cpu() ? host : host.pin_memory().to(x.device(), /*non_blocking=*/true);
}

// The step layout for the kernels: nullptr when dense; else size and off, on the device of x.
struct LayoutBuf {
  Tensor t;
  Layout lay;
  LayoutBuf(const Problem& pr, const Tensor& x, bool reverse) : lay{pr.T, pr.B, nullptr, nullptr, reverse} {
    if (!pr.packed) return;
    std::vector<int64_t> v(pr.size.begin(), pr.size.end());
    v.insert(v.end(), pr.off.begin(), pr.off.begin() + pr.T);
    t = indices_on(v, x);
    lay.size = t.data_ptr<int64_t>();
    lay.off = lay.size + pr.T;
  }
};

// The launch on x's device: the emulator on the CPU, else the CUDA kernels on the current stream.
template <class Emulate, class Cuda>
void run(const Tensor& x, const Emulate& emulate, const Cuda& cuda) {
  if (x.is_cpu()) {
    emulate();
    return;
  }
#ifdef FASTRNN_WITH_CUDA
  cuda(c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
#else
  (void)cuda;
#endif
}

}  // namespace

namespace {
Plan plan_uncached(const Limits& lim, int64_t G, int64_t B, int64_t H, int64_t esize, bool proj, bool cells,
                   bool pair) {
  Plan none;
  if (proj) {
    none.why = "proj_size: the per-step path";
    return none;
  }
  if (esize == 8) {
    none.why = "fp64: the per-step path";
    return none;
  }
  return pair && !cells ? make_pair_plan(G, B, H, esize, lim) : make_plan(G, B, H, esize, lim, cells);
}
}  // namespace

// Plans are kept per problem and device: pricing the bank conflicts of unpadded candidates takes up to a few
// hundred microseconds, once. A model's calls take a handful of shapes; past kPlans the cache starts over.
Plan plan_with(const Limits& lim, int64_t G, int64_t B, int64_t H, int64_t esize, bool proj, bool cells, bool pair) {
  constexpr size_t kPlans = 4096;
  using Key = std::tuple<int64_t, int64_t, bool, int64_t, bool, bool, int64_t, int64_t, int64_t, int64_t, int,
                         std::array<int64_t, 6>, std::array<int64_t, kMaxCluster + 1>>;
  static std::mutex mu;
  static std::map<Key, Plan> plans;
  const Costs& c = lim.costs;
  const Key key{lim.sms, lim.smem, lim.cooperative, lim.cluster, lim.mma, lim.tf32, G, B, H, esize,
                proj | cells << 1 | pair << 2 | lim.pad << 3,
                std::array<int64_t, 6>{c.grid_sync, c.grid_sync_member, c.cluster_sync, c.stage, c.mma, c.exchange},
                lim.clusters_at_once};
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = plans.find(key);
    if (it != plans.end()) return it->second;
  }
  const Plan p = plan_uncached(lim, G, B, H, esize, proj, cells, pair);
  const std::lock_guard<std::mutex> lock(mu);
  if (plans.size() >= kPlans) plans.clear();
  plans.emplace(key, p);
  return p;
}

// Off by default until the engine's first run on a GPU has passed the CUDA suite (benchmarks/gpu_check.sh runs it
// both ways).
bool cuda_enabled() {
  const char* v = std::getenv("FASTRNN_PERSISTENT");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// The getter's signature changed twice: per operator as an enum from torch 2.10, as a string in 2.9, one switch
// for conv and RNN alike before.
bool tf32_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::RNN);
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
  return at::globalContext().allowTF32CuDNN("rnn");
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

namespace {
// The device's limits for a call on x, or false where the engine does not run it (not CUDA with
// FASTRNN_PERSISTENT=1, nor the emulator's dtypes on the CPU under the test hook).
bool limits_for(const at::Tensor& x, Limits& lim) {
  if (x.is_cpu()) {
    if (!emulating(x)) return false;
    lim = g_emulated;
    return true;
  }
#ifdef FASTRNN_WITH_CUDA
  if (!x.is_cuda() || !cuda_enabled()) return false;
  lim = limits(x.device().index());
  lim.tf32 = tf32_allowed();
  return true;
#else
  return false;
#endif
}
}  // namespace

Plan plan_for(const Problem& pr, const at::Tensor& x, bool cells) {
  Limits lim;
  return limits_for(x, lim) ? plan_with(lim, pr.G, pr.B, pr.H, x.element_size(), pr.proj, cells) : Plan{};
}

Plan pair_plan_for(const Problem& pr, const at::Tensor& x) {
  Limits lim;
  return limits_for(x, lim) ? plan_with(lim, pr.G, pr.B, pr.H, x.element_size(), pr.proj, false, true) : Plan{};
}

namespace {
// One direction's launch args and the buffers behind their pointers.
struct FwdRun {
  Tensor gates, hs, cs, y, c_save, hn_save, h0c;
  LayoutBuf lb;
  Fwd f;

  FwdRun(const Problem& pr, const Plan& plan, const Tensor& x, const FwdDir& d, bool save)
      : lb(pr, x, d.reverse) {
    const auto opts = x.options();
    const int64_t H = pr.H, GH = pr.G * H;
    gates = gemm(x, d.w_ih.t());
    hs = d.h0.clone(at::MemoryFormat::Contiguous);
    cs = pr.lstm ? d.c0.clone(at::MemoryFormat::Contiguous) : empty0(x);
    y = ws_empty({pr.N, H}, opts);
    const bool save_c = save && pr.lstm, save_hn = save && pr.gru;
    c_save = save_c ? ws_empty({pr.N, H}, opts) : empty0(x);
    // GRU's W_hn h + b_hn per step where it is saved, else to a scratch of the running state's shape
    hn_save = pr.gru ? ws_empty({save_hn ? pr.N : pr.B, H}, opts) : empty0(x);
    h0c = d.h0.contiguous();
    f = Fwd{plan, lb.lay, H, pr.G, CellParams{}, save_c, save_hn, d.w_hh.data_ptr(), h0c.data_ptr()};
    CellParams& p = f.base;
    p.H = H;
    p.gw = H;
    p.gs = GH;
    p.gates = gates.data_ptr();
    p.bias = d.bias.data_ptr();
    p.b_hn = pr.gru ? d.b_hn.data_ptr() : nullptr;
    p.h = hs.data_ptr();
    p.h_prev = p.h;
    p.h_stride = H;
    p.y = y.data_ptr();
    p.y_stride = H;
    if (pr.lstm) {
      p.c = cs.data_ptr();
      p.c_save = save_c ? c_save.data_ptr() : p.c;
    }
    if (pr.gru) {
      p.hn_save = hn_save.data_ptr();
      p.hn_stride = H;
    }
  }
};

struct BwdRun {
  Tensor dhs, dcs, dgx, dgh;
  LayoutBuf lb;
  Bwd f;

  BwdRun(const Problem& pr, const Plan& plan, const Tensor& x, const BwdDir& d) : lb(pr, x, d.reverse) {
    const auto opts = x.options();
    const int64_t H = pr.H, GH = pr.G * H;
    dhs = d.dh_n.clone(at::MemoryFormat::Contiguous);
    dcs = pr.lstm ? d.dc_n.clone(at::MemoryFormat::Contiguous) : empty0(x);
    dgx = ws_empty({pr.N, GH}, opts);
    dgh = pr.gru ? ws_empty({pr.N, GH}, opts) : dgx;
    f = Bwd{plan, lb.lay, H, pr.G, CellGradParams{}, pr.gru, pr.lstm, d.w_hh.data_ptr()};
    CellGradParams& p = f.base;
    p.H = H;
    p.gw = H;
    p.gs = GH;
    p.gates = pr.lstm || pr.gru ? d.gates.data_ptr() : nullptr;
    p.c = pr.lstm ? d.c_save.data_ptr() : nullptr;
    p.hn = pr.gru ? d.hn_save.data_ptr() : nullptr;
    p.out = d.y.data_ptr();
    p.out_stride = H;
    if (pr.lstm || pr.gru) {
      p.init = pr.lstm ? d.c0.data_ptr() : d.h0.data_ptr();
      p.prev = pr.lstm ? d.c_save.data_ptr() : d.y.data_ptr();
      p.prev_stride = H;
    }
    p.dh = dhs.data_ptr();
    p.dh_stride = H;
    p.dy = d.dy.data_ptr();
    p.dy_stride = H;
    p.dc = pr.lstm ? dcs.data_ptr() : nullptr;
    p.dgx = dgx.data_ptr();
    p.dgh = dgh.data_ptr();
    p.dh_prev = dhs.data_ptr();
  }
};

// The launch's args, direction by direction.
template <class Args, class Run>
Dirs<Args> dirs_of(const std::vector<std::unique_ptr<Run>>& runs) {
  Dirs<Args> ds{};
  for (size_t i = 0; i < runs.size(); ++i) ds.d[i] = runs[i]->f;
  return ds;
}

std::mutex clock_mutex;
bool clocks_on = false;
std::vector<ClockRecord> clock_records;
int64_t clock_generation = 0;  // how often the records were handed over: a launch's index is good in its own

// A clock buffer for this launch where the clocks are on and it runs on a GPU (ds.clocks), and its record; then
// `ran(scheme)` notes the scheme the launch took (a planned cluster that does not fit runs at the grid barrier).
struct TimedLaunch {
  int64_t record = -1, generation = 0;
  void ran(int scheme) const {
    if (record < 0) return;
    std::lock_guard<std::mutex> lock(clock_mutex);
    if (generation == clock_generation) clock_records[record].plan.scheme = scheme;
  }
};
template <class Args>
TimedLaunch time_launch(Dirs<Args>& ds, const char* launch, const Problem& pr, const Plan& plan, const Tensor& x) {
  if (x.is_cpu()) return {};
  std::lock_guard<std::mutex> lock(clock_mutex);
  if (!clocks_on) return {};
  Tensor c = at::zeros({plan.dirs * dir_blocks(plan), kClockSlots}, x.options().dtype(at::kLong));
  static_assert(sizeof(long long) == sizeof(int64_t), "clock slots are int64");
  ds.clocks = reinterpret_cast<long long*>(c.data_ptr<int64_t>());
  clock_records.push_back({launch, pr.mode, pr.T, plan, c});
  return {static_cast<int64_t>(clock_records.size()) - 1, clock_generation};
}

void check_dirs(const Plan& plan, size_t n) {
  TORCH_CHECK(static_cast<int64_t>(n) == plan.dirs, "fastrnn: the persistent engine got ", n,
              " direction(s) for a plan of ", plan.dirs, "; this is a bug");
}
}  // namespace

std::vector<std::vector<Tensor>> fwd(const Problem& pr, const Plan& plan, const Tensor& x,
                                     const std::vector<FwdDir>& dirs, bool save) {
  check_dirs(plan, dirs.size());
  std::vector<std::unique_ptr<FwdRun>> runs;
  for (const FwdDir& d : dirs) runs.push_back(std::make_unique<FwdRun>(pr, plan, x, d, save));
  Dirs<Fwd> ds = dirs_of<Fwd>(runs);
  const TimedLaunch timed = time_launch(ds, "fwd", pr, plan, x);
  run(
      x,
      [&] {
        visit_fwd(pr.mode, [&](auto op) {
          with_storage(x, [&](auto t) { emulate<FwdProgram<decltype(op), decltype(t)>>(ds); });
        });
      },
      [&](void* stream) { timed.ran(fwd_cuda(pr.mode, dtype_of(x), ds, stream)); });
  const bool save_gates = save && (pr.lstm || pr.gru);
  std::vector<std::vector<Tensor>> out;
  for (const auto& r : runs) {
    out.push_back({r->y, r->hs, r->cs, save_gates ? r->gates : empty0(x), r->c_save, save ? r->hn_save : empty0(x)});
  }
  return out;
}

std::vector<std::vector<Tensor>> bwd(const Problem& pr, const Plan& plan, const Tensor& x,
                                     const std::vector<BwdDir>& dirs, bool need_dx) {
  check_dirs(plan, dirs.size());
  std::vector<std::unique_ptr<BwdRun>> runs;
  for (const BwdDir& d : dirs) runs.push_back(std::make_unique<BwdRun>(pr, plan, x, d));
  Dirs<Bwd> ds = dirs_of<Bwd>(runs);
  const TimedLaunch timed = time_launch(ds, "bwd", pr, plan, x);
  run(
      x,
      [&] {
        visit_bwd(pr.mode, [&](auto op) {
          with_storage(x, [&](auto t) { emulate<BwdProgram<decltype(op), decltype(t)>>(ds); });
        });
      },
      [&](void* stream) { timed.ran(bwd_cuda(pr.mode, dtype_of(x), ds, stream)); });

  std::vector<std::vector<Tensor>> out;
  for (size_t i = 0; i < dirs.size(); ++i) {
    const BwdDir& d = dirs[i];
    const BwdRun& r = *runs[i];
    // The weight gradients as one chunk of all N rows: packed h_{t-1} rows gathered by one index_select from
    // [y; h0] (the per-step driver copies them step by step).
    Tensor hprev;
    if (pr.packed) {
      std::vector<int64_t> idx(pr.N);
      for (int64_t t = 0; t < pr.T; ++t) {
        const PrevStep prev = prev_step(pr, t, d.reverse);
        for (int64_t b = 0; b < pr.size[t]; ++b) idx[pr.off[t] + b] = b < prev.rows ? pr.off[prev.t] + b : pr.N + b;
      }
      hprev = at::cat({d.y, d.h0}).index_select(0, indices_on(idx, x));
    }
    GradSums sums = grad_sums(pr, x, d.w_ih, d.w_hh, d.has_b_ih, d.has_b_hh, need_dx, pr.N);
    flush_chunk(pr, d.reverse, 0, pr.N, r.dgx, r.dgh, x, d.y, d.h0, hprev, d.w_ih, sums);
    const auto [db_ih, db_hh] = bias_grads(sums, d.has_b_ih, d.has_b_hh, pr.gru, x);
    out.push_back({sums.dx, r.dhs, r.dcs, sums.dw_ih, sums.dw_hh, db_ih, db_hh, empty0(x)});
  }
  return out;
}

void ext_fwd(const Problem& pr, const Plan& plan, const Tensor& x, const ExtParams& base, bool save,
             const Tensor& w_hh, const Tensor& operand, bool reverse) {
  TORCH_CHECK(!plan.mma, "fastrnn: the persistent engine's cells run on fp32 FMAs; a plan with tensor cores is a bug");
  const LayoutBuf lb(pr, x, reverse);
  Dirs<ExtFwd> ds{{ExtFwd{plan, lb.lay, pr.H, pr.G, base, save, w_hh.data_ptr(), operand.data_ptr()}}};
  const TimedLaunch timed = time_launch(ds, "ext_fwd", pr, plan, x);
  run(
      x, [&] { visit_ext(pr.mode, [&](auto op) { emulate<ExtFwdProgram<decltype(op)>>(ds); }); },
      [&](void* stream) { timed.ran(ext_fwd_cuda(pr.mode, ds, stream)); });
}

void ext_bwd(const Problem& pr, const Plan& plan, const Tensor& x, const ExtGradParams& base, bool bypass,
             const OptTensor& mask, const Tensor& w_hh, bool reverse) {
  TORCH_CHECK(!plan.mma, "fastrnn: the persistent engine's cells run on fp32 FMAs; a plan with tensor cores is a bug");
  const LayoutBuf lb(pr, x, reverse);
  Dirs<ExtBwd> ds{{ExtBwd{plan, lb.lay, pr.H, pr.G, base, bypass, mask ? mask->data_ptr() : nullptr, w_hh.data_ptr()}}};
  const TimedLaunch timed = time_launch(ds, "ext_bwd", pr, plan, x);
  run(
      x, [&] { visit_ext(pr.mode, [&](auto op) { emulate<ExtBwdProgram<decltype(op)>>(ds); }); },
      [&](void* stream) { timed.ran(ext_bwd_cuda(pr.mode, ds, stream)); });
}

std::vector<ClockRecord> clocks(bool on) {
  std::lock_guard<std::mutex> lock(clock_mutex);
  clocks_on = on;
  std::vector<ClockRecord> out;
  out.swap(clock_records);
  ++clock_generation;
  return out;
}

std::map<std::string, std::pair<int64_t, int64_t>> bank_report(int64_t K, int64_t R, int64_t bt, int64_t es,
                                                                int64_t ldw, int64_t lds, int64_t ldr) {
  Gemm g = make_gemm(K, R, bt, false, es);
  if (ldw > 0) g.ldw = ldw;
  if (lds > 0) g.lds = lds;
  if (ldr > 0) g.ldr = ldr;
  const int64_t klen = std::min(K, kChunk), threads = g.items * g.ks;
  std::map<std::string, std::pair<int64_t, int64_t>> out;
  // one warp instruction, lane l's word at(w0 + l) (-1: none)
  auto count = [&](const char* phase, int64_t w0, const std::function<int64_t(int64_t)>& at) {
    int64_t word[32];
    for (int l = 0; l < 32; ++l) word[l] = at(w0 + l);
    const int64_t w = warp_wavefronts(word);
    auto& o = out[phase];
    o.first += w;
    o.second += w > 0;
  };
  for (int64_t w0 = 0; w0 < kThreads; w0 += 32) {
    // the first K chunk's first pass of each loop, as stage / accumulate / spill / reduce index it
    count("stage", w0, [&](int64_t tid) {
      const int sh = stage_shift(klen, kChunkShift);
      const int64_t r = tid >> sh, kk = tid & ((int64_t(1) << sh) - 1);
      return kk < klen && r < bt ? stage_at(g, r, kk) : -1;
    });
    for (int load = 0; load < kTileCols + kTileRows; ++load) {
      count(load < kTileCols ? "ws" : "xs", w0, [&](int64_t tid) { return k_step_word(g, tid, load); });
    }
    for (int e = 0; e < kTile; ++e) {
      count("spill", w0, [&](int64_t tid) {
        if (tid >= threads) return int64_t(-1);
        const SimtThread th = simt_thread(g, tid);
        return red_at(g, th.ksl, e, th.item);
      });
    }
    count("reduce", w0, [&](int64_t o) { return o < kTile * g.items ? red_at(g, 0, o / g.items, o % g.items) : -1; });
  }
  return out;
}

namespace {
Gemm priced_gemm(int64_t K, int64_t R, int64_t bt, bool mma, int64_t es, int64_t kc, bool pad) {
  TORCH_CHECK(K >= 1 && R >= 1 && bt >= 1, "fastrnn: a block GEMM needs positive K, R and bt, got ", K, ", ", R, ", ",
              bt);
  TORCH_CHECK(es == 2 || es == 4, "fastrnn: es must be 2 (16-bit) or 4 (fp32), got ", es);
  const int64_t unit = mma ? kMmaChunk : kChunk;
  TORCH_CHECK(kc >= unit && kc % unit == 0, "fastrnn: kc must be a multiple of ", unit, ", got ", kc);
  return make_gemm(K, R, bt, mma, es, pad, kc);
}
}  // namespace

GemmPrice gemm_price(int64_t K, int64_t R, int64_t bt, bool mma, int64_t es, int64_t kc, bool pad, int64_t stages,
                     bool exchange) {
  TORCH_CHECK(stages == 1 || stages == 2, "fastrnn: stages must be 1 or 2, got ", stages);
  Gemm g = priced_gemm(K, R, bt, mma, es, kc, pad);
  g.stages = stages;
  TORCH_CHECK(!exchange || kc >= K, "fastrnn: only a K of one chunk is exchanged in shared memory: kc must be at least "
              "K (", K, "), got ", kc);
  // as make_plan prices a layout: the K loop (a warp's mma rounds at one unit each: its steps), and the SIMT loop's
  // bank conflicts on top; the operand's chunks staged from L2, or its one chunk exchanged
  const int64_t steps = mma ? gemm_cycles(g, 1) : cdiv(g.K, g.ks);
  return {gemm_cycles(g) + conflict_cycles(g), steps, exchange ? 0 : cdiv(g.K, g.kc), exchange ? 1 : 0,
          smem_bytes(g), gemm_fits(g)};
}

// Steps per probe launch at most: a launch of more could run for minutes (no watchdog on a compute GPU).
constexpr int64_t kProbeIters = 10000000;

ProbeResult probe(int device, const std::string& scheme, int64_t blocks, int64_t cluster, int64_t K, int64_t R,
                  int64_t bt, bool mma, int64_t es, int64_t kc, bool pad, int64_t rows, int64_t iters, bool exchange) {
  // what needs no GPU first
  Plan p;
  p.scheme = scheme == "block" ? kBlock : scheme == "grid" ? kGrid : scheme == "cluster" ? kCluster : kNone;
  TORCH_CHECK(p.scheme != kNone, "fastrnn: probe: scheme must be \"block\", \"grid\" or \"cluster\", got \"",
              scheme, "\"");
  TORCH_CHECK(iters >= 1 && iters <= kProbeIters, "fastrnn: probe: iters must be 1 to ", kProbeIters, ", got ", iters);
  TORCH_CHECK(K >= 0, "fastrnn: probe: K must be 0 (the barrier alone) or positive, got ", K);
  TORCH_CHECK(K == 0 || (rows >= 1 && rows <= blocks), "fastrnn: probe: rows (the operand's batch tiles) must be 1 to "
              "blocks (", blocks, "), got ", rows);
  Gemm g{};
  if (K > 0) g = priced_gemm(K, R, bt, mma, es, kc, pad);
  TORCH_CHECK(!exchange || (K > 0 && kc >= K), "fastrnn: probe: exchange needs a GEMM of one chunk (K > 0, kc >= K), "
              "got K ", K, ", kc ", kc);
#ifdef FASTRNN_WITH_CUDA
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "fastrnn: probe: device must be a CUDA device "
              "index below ", static_cast<int>(c10::cuda::device_count()), ", got ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const Limits lim = limits(device);
  TORCH_CHECK(blocks >= 1 && blocks <= lim.sms, "fastrnn: probe: blocks must be 1 to ", lim.sms,
              " (one per SM), got ", blocks);
  TORCH_CHECK(p.scheme != kGrid || lim.cooperative, "fastrnn: probe: this GPU has no cooperative launch");
  if (p.scheme == kCluster) {
    TORCH_CHECK(cluster >= 2 && cluster <= lim.cluster && blocks % cluster == 0, "fastrnn: probe: cluster must be 2 to ",
                lim.cluster, " blocks (0: this GPU has no clusters, or FASTRNN_PERSISTENT_CLUSTER=0) and divide blocks (",
                blocks, "), got ", cluster);
  }
  // one sync group: the cluster's blocks, the grid's all of them (step_barrier waits for its group only)
  p.slices = p.scheme == kCluster ? cluster : p.scheme == kGrid ? blocks : 1;
  p.tiles = blocks / p.slices;
  p.bt = bt;
  p.mma = mma;
  // a block's whole shared memory, so that one block runs per SM as in the engine's plans
  p.smem = lim.smem;
  if (K > 0) {
    TORCH_CHECK(!mma || lim.mma, "fastrnn: probe: mma asks for tensor cores, which this GPU or build does not have");
    TORCH_CHECK(gemm_fits(g) && smem_bytes(g) <= lim.smem, "fastrnn: probe: a ", K, " x ", R, " GEMM over ", bt,
                " rows does not fit one block (", smem_bytes(g), " bytes of shared memory, ", lim.smem, " available)");
    p.kc[0] = p.kc[1] = g.kc;
  }
  const auto opts = at::TensorOptions().device(at::kCUDA, device);
  const auto storage = es == 2 ? at::kBFloat16 : at::kFloat;
  const Tensor a = at::rand({K > 0 ? rows * bt : 1, K > 0 ? K : 1}, opts.dtype(storage));
  const Tensor out = at::empty({K > 0 ? blocks * bt : 1, K > 0 ? R : 1}, opts.dtype(storage));
  Tensor cycles = at::zeros({blocks}, opts.dtype(at::kLong)), ns = at::zeros({blocks}, opts.dtype(at::kLong));
  const Probe pr{p, g, K > 0, K > 0 ? rows : 1, exchange, a.data_ptr(), out.data_ptr(), iters,
                 reinterpret_cast<long long*>(cycles.data_ptr<int64_t>()),
                 reinterpret_cast<long long*>(ns.data_ptr<int64_t>())};
  const int ran = probe_cuda(es == 2 ? Dtype::BF16 : Dtype::F32, pr, c10::cuda::getCurrentCUDAStream(device).stream());
  return {cycles, ns, ran};
#else
  (void)device, (void)blocks, (void)cluster, (void)g;
  TORCH_CHECK(false, "fastrnn: _C was built without CUDA: the probe times the persistent engine's pieces on a GPU");
#endif
}

bool emulating(const Tensor& x) {
  const auto d = x.scalar_type();
  return x.is_cpu() && g_emulated.sms > 0 && (d == at::kFloat || d == at::kHalf || d == at::kBFloat16);
}

const Limits& emulated_limits() { return g_emulated; }

void set_clusters_at_once(Limits& lim, const std::map<int64_t, int64_t>& at_once) {
  for (const auto& [size, n] : at_once) {
    TORCH_CHECK(size >= 1 && size <= kMaxCluster, "fastrnn: clusters_at_once: a cluster has 1 to ", kMaxCluster,
                " blocks, got ", size);
    TORCH_CHECK(n >= 0, "fastrnn: clusters_at_once: clusters of ", size,
                " blocks held at once must be at least 0, got ", n);
    lim.clusters_at_once[size] = n;
  }
}

void set_emulation(int64_t sms, int64_t smem, int64_t cluster, bool mma, bool tf32, bool clusters_fit,
                   const std::map<int64_t, int64_t>& clusters_at_once) {
  Limits lim{sms, smem, /*cooperative=*/true, cluster, mma, tf32};
  set_clusters_at_once(lim, clusters_at_once);
  g_emulated = lim;
  g_clusters_fit = clusters_fit;
}

}  // namespace persist
}  // namespace fastrnn
