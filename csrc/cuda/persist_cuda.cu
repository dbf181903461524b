// The persistent CUDA engine: one launch runs every step of a layer's recurrence, in both directions of a
// bidirectional layer where the plan says so (the block program is in persist.h, shared with the CPU
// emulator). Only c10 headers, as in cell_cuda.cu.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda/atomic>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "cuda/row_block.cuh"
#include "persist.h"

namespace fastrnn {
namespace persist {
namespace {

namespace cg = cooperative_groups;

// Whether an environment switch (FASTRNN_PERSISTENT_*) is on: unset or anything but "0".
bool allowed(const char* var) {
  const char* v = std::getenv(var);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The row phase runs cell_ln.h's rows on the block's threads through the row kernels' executor.
static_assert(kRowThreads == kThreads, "RowBlock strides over the block's kThreads threads");

// The end of a phase: other blocks read this step's h (forward) or dgates (backward) only with slices > 1, and
// only their own batch tile's (sync_group), so a cluster (one per tile) needs no more than its own barrier, which
// orders global memory among its blocks (release / acquire at cluster scope; clusters exist from sm_90 on, and the
// plan takes them only on such devices), and the grid scheme waits only for its group: each block's thread 0 adds
// one to the group's counter with release semantics (after the block's barrier, so for every thread's writes, as
// grid.sync's fence covers them) and spins on acquire loads until the group's every block has arrived for this
// barrier, the n-th of the launch (from 1; the counter only rises, to n * slices). Where the launch has no counters
// (FASTRNN_PERSISTENT_GROUP_SYNC=0, to measure one against the other) the grid scheme waits for the whole grid
// (cooperative groups' grid.sync), tiles and directions for each other. Stateless, so that the kernels hold no
// registers for it beyond the step's index.
// Counters kCounterStride apart, a 128-byte line each: the groups' atomics and polling do not share one.
constexpr int64_t kCounterStride = 128 / sizeof(unsigned);
__device__ __forceinline__ void step_barrier(const Plan& p, unsigned* counters, unsigned n) {
  if (p.scheme == kGrid && counters != nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) {
      cuda::atomic_ref<unsigned, cuda::thread_scope_device> count(counters[sync_group(p, blockIdx.x) * kCounterStride]);
      count.fetch_add(1u, cuda::memory_order_release);
      // modulo 2^32 throughout: no block of the group passes the next barrier before this one arrives there, so the
      // count is within slices of the target
      const unsigned target = n * static_cast<unsigned>(p.slices);
      while (static_cast<int>(count.load(cuda::memory_order_acquire) - target) < 0) {
      }
    }
    __syncthreads();
  } else if (p.scheme == kGrid) {
    cg::this_grid().sync();
  } else if (p.scheme == kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::this_cluster().sync();
#else
    __trap();
#endif
  } else {
    __syncthreads();
  }
}

// One warp's mma.sync with fp32 accumulation (sm_80 on; the plan takes tensor cores only on such devices):
// d += A . B from the lane's fragments; m16n8k16 for 16-bit storage, m16n8k8 in TF32 for fp32. Not volatile: the
// instruction is a function of its operands alone, so the compiler may issue the loads of accumulate_mma's two
// chains together and interleave their instructions.
template <typename T>
struct WarpMma {
  int lane;
  template <class F>
  __device__ __forceinline__ void operator()(float* d, const F& frags) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const Frags f = frags(lane);
    if constexpr (std::is_same_v<T, float>) {
      asm(
          "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(f.a[0]), "r"(f.a[1]), "r"(f.a[2]), "r"(f.a[3]), "r"(f.b[0]), "r"(f.b[1]));
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      asm(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(f.a[0]), "r"(f.a[1]), "r"(f.a[2]), "r"(f.a[3]), "r"(f.b[0]), "r"(f.b[1]));
    } else {
      asm(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(f.a[0]), "r"(f.a[1]), "r"(f.a[2]), "r"(f.a[3]), "r"(f.b[0]), "r"(f.b[1]));
    }
#else
    (void)d;
    (void)frags;
    __trap();
#endif
  }
};

// One block's GEMM of a step (persist.h's phases with the block barriers between them): out[n rows, g.R] =
// A . Ws over K chunks, its partial sums spilled to the reduction buffer, then `then(tid, pre(tid))` (a reduce to a
// sink, or the forward's cells on the Sums with the inputs pre loaded before the GEMM); on the tensor cores where
// the plan says so. Rows below `kept` are staged already.
template <typename T, class A, class Pre, class Then>
__device__ __forceinline__ void block_gemm(const Gemm& g, const Smem<T>& sm, int tid, int64_t kept, int64_t n,
                                           const A& a, const Pre& pre, const Then& then) {
  const auto early = pre(tid);
  float acc[kTile] = {};
  if (g.mma) {
    for (int64_t k0 = 0; k0 < g.K; k0 += g.kc) {
      __syncthreads();
      stage_mma(g, sm, tid, k0, kept, n, a);
      __syncthreads();
      accumulate_mma(g, sm, tid, k0, acc, WarpMma<T>{tid % 32});
    }
    spill_mma(g, sm, tid, acc);
  } else {
    for (int64_t k0 = 0; k0 < g.K; k0 += g.kc) {
      __syncthreads();
      stage(g, sm, tid, k0, kept, n, a);
      __syncthreads();
      accumulate(g, sm, tid, k0, n, acc);
    }
    spill(g, sm, tid, acc);
  }
  __syncthreads();
  then(tid, early);
}

// The block's executor for persist.h's programs: its threads run the phases side by side. Host stubs only keep
// the host pass of the __host__ __device__ programs compiling.
struct BlockExec {
  int tid;
  template <typename T, class A, class Pre, class Then>
  FRNN_HD void gemm_then(const Gemm& g, const Smem<T>& sm, int64_t kept, int64_t n, const A& a, const Pre& pre,
                         const Then& then) const {
#if defined(__CUDA_ARCH__)
    block_gemm(g, sm, tid, kept, n, a, pre, then);
#endif
  }
  template <class F>
  FRNN_HD void threads(const F& f) const {
    f(tid);
  }
  FRNN_HD RowBlock rows() const { return {}; }
  // Block q of the launch's cluster (its rank: a tile's slices are consecutive blocks), sm's staged operand mapped
  // into its shared memory; only cluster launches (sm_90) take it (exchange_peers).
  template <typename T>
  FRNN_HD Smem<T> peer(const Smem<T>& sm, int64_t q) const {
    Smem<T> v = sm;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    v.stage = cg::this_cluster().map_shared_rank(sm.stage, static_cast<int>(q));
#elif defined(__CUDA_ARCH__)
    __trap();
#endif
    (void)q;
    return v;
  }
};

__device__ __forceinline__ long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<long long>(t);
}

// A timed launch's clocks (persist.h's ClockSlot), kept by thread 0 of each block in registers (every slot index
// a constant after unrolling) and stored once at the end.
struct Clocks {
  bool on;
  long long sum[kClockLaunch] = {};
  long long start = 0, last = 0, ns0 = 0;
  __device__ explicit Clocks(bool timed) : on(timed) {
    if (on) {
      ns0 = global_ns();
      start = last = clock64();
    }
  }
  __device__ __forceinline__ void lap(int slot) {
    if (on) {
      const long long now = clock64();
      sum[slot] += now - last;
      last = now;
    }
  }
  // block b's row of clocks: [blocks][kClockSlots]
  __device__ void store(long long* clocks, unsigned b) const {
    if (!on) return;
    long long* out = clocks + static_cast<size_t>(b) * kClockSlots;
    for (int i = 0; i < kClockLaunch; ++i) out[i] = sum[i];
    out[kClockLaunch] = last - start;
    out[kClockNs] = global_ns() - ns0;
  }
};

// dirs: one layer's directions (Prog::Args each, plan.dirs of them); grid: plan.dirs * dir_blocks(plan) blocks of
// kThreads, direction-major. Every block reaches every barrier, with rows this step or not; a barrier's group (a
// cluster, or a grid plan's counter) never spans two directions (dir_blocks is a multiple of its size).
// __grid_constant__: a block reads its direction's args in place, through a run-time index. ptxas then holds
// their fields in registers (96-168 per thread, 14-34 more than with one direction's args as constant operands;
// taking each direction through a constant index in its own branch costs as many): within the one block per SM.
template <class Prog>
__global__ void __launch_bounds__(kThreads, 1) persist_kernel(const __grid_constant__ Dirs<typename Prog::Args> dirs) {
  using T = typename Prog::Elem;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const LaunchBlock lb = launch_block(dirs.d[0].plan, blockIdx.x);
  const typename Prog::Args& f = dirs.d[lb.dir];
  const int64_t blk = lb.blk;
  const BlockExec x{static_cast<int>(threadIdx.x)};
  const Owned o = owned(f.plan, f.H, blk);
  const Gemm g = Prog::gemm(f);
  const Smem<T> sm = Smem<T>::carve(smem_raw, g);
  static_assert(Prog::kPhases <= kMaxPhases, "a phase without its clock slots");
  Clocks clk(dirs.clocks != nullptr && x.tid == 0);
  Prog::load(f, sm, g, x.tid, o.u0);
  zero_stages(g, sm, x.tid);
  // a cluster's blocks write each other's staged operands from the first step on (Plan::push): every block of the
  // cluster started, and zeroed its own, before any writes into it (a cluster's barrier: no counter counts it)
  if (f.plan.scheme == kCluster) {
    step_barrier(f.plan, nullptr, 0);
  } else {
    __syncthreads();
  }
  clk.lap(kClockLoad);
  unsigned barriers = 0;  // the step barriers passed (step_barrier counts from 1)
  for (int64_t i = 0; i < f.lay.T; ++i) {
    const StepRows s = step_rows(f.lay, Prog::kForward ? i : f.lay.T - 1 - i);
    const int64_t n = tile_rows(f.plan, o, s);
#pragma unroll
    for (int ph = 0; ph < Prog::kPhases; ++ph) {
      Prog::phase(f, ph, x, sm, g, s, o, n, blk);
      clk.lap(kClockPhase + 2 * ph);
      if (Prog::step_barrier_after(ph)) {
        step_barrier(f.plan, dirs.sync, ++barriers);
      } else {
        __syncthreads();
      }
      clk.lap(kClockBarrier + 2 * ph);
    }
  }
  // counted with phase 0: a backward's dh GEMM after its last step (BwdProgram), one more than its steps have
  Prog::finish(f, x, sm, g, o);
  clk.lap(kClockPhase);
  clk.store(dirs.clocks, blockIdx.x);
}

// A launch of `blocks` blocks of kThreads in clusters of `size`, with `smem` bytes of dynamic shared memory each;
// `attr` holds its cluster attribute.
cudaLaunchConfig_t cluster_launch(unsigned blocks, int64_t size, int64_t smem, cudaStream_t stream,
                                  cudaLaunchAttribute& attr) {
  attr = cudaLaunchAttribute{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(size);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether all of the launch's clusters with this kernel's shared memory are resident at once (the blocks of a
// cluster share one GPC, so the GPCs may hold fewer clusters than SMs / blocks). The plan asked the same of one
// kernel at a block per SM (Limits::clusters_at_once); this asks it of the launch's own. Clusters never wait on each
// other, so more would still be right but run in a second wave, the layer's time twice over: the grid barrier is
// cheaper then.
bool clusters_fit(const void* kernel, const cudaLaunchConfig_t& cfg) {
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // a cluster this GPU cannot place: not an error, the grid barrier runs instead
    return false;
  }
  return static_cast<unsigned>(clusters) * cfg.attrs[0].val.clusterDim.x >= cfg.gridDim.x;
}

// Whether the kernel runs sm_90 code, where the cluster barrier exists: a build without it (FASTRNN_CUDA_ARCHS
// below 90) runs its PTX on a Hopper GPU, where step_barrier's cluster branch would trap. No code for this device
// at all: no clusters either (its launch says why).
bool has_clusters(const void* kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.ptxVersion >= 90;
}

// Lets the kernel ask for all the dynamic shared memory a block may have on the current device, once per kernel and
// device: the attribute is a ceiling, and each launch asks for its plan's within it. Set per launch to the plan's
// own size instead, a host thread could lower it between another thread's setting and that thread's launch of the
// same kernel with a larger plan, which the launch would then refuse.
void allow_all_smem(const void* kernel) {
  static std::mutex m;
  static std::set<std::pair<const void*, int>> done;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(m);
  if (done.count({kernel, device}) != 0) return;
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int64_t most = limits(device).smem - static_cast<int64_t>(attr.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(most)));
  done.insert({kernel, device});
}

// Returns the scheme launched: the plan's, or the grid barrier where a planned cluster does not fit.
template <class Args>
int launch(const void* kernel, const Dirs<Args>& dirs, cudaStream_t stream) {
  const Plan& plan = dirs.d[0].plan;
  allow_all_smem(kernel);
  const dim3 grid(static_cast<unsigned>(plan.dirs * dir_blocks(plan))), block(kThreads);
  Dirs<Args> copy = dirs;
  Plan& p = copy.d[0].plan;
  void* params[] = {&copy};
  if (p.scheme == kCluster) {
    // a tile's slices are consecutive blocks (persist.h owned()): one cluster each
    cudaLaunchAttribute attr{};
    const cudaLaunchConfig_t cfg = cluster_launch(grid.x, p.slices, p.smem, stream, attr);
    if (has_clusters(kernel) && clusters_fit(kernel, cfg)) {
      C10_CUDA_CHECK(cudaLaunchKernelExC(&cfg, kernel, params));
      return kCluster;
    }
    // the same blocks, meeting at the grid barrier instead (the plan keeps its blocks within the SM count)
    int device = 0, coop = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
    TORCH_CHECK(coop != 0, "fastrnn: the persistent engine planned a thread-block cluster of ", p.slices,
                " blocks that this GPU cannot place all at once or this build cannot run (no sm_90 code), and the GPU "
                "has no cooperative launch for the grid barrier instead; unset FASTRNN_PERSISTENT for the per-step "
                "path");
    p.scheme = copy.d[1].plan.scheme = kGrid;
  }
  if (p.scheme == kGrid) {
    // the step barriers' counters (step_barrier), zeroed on the stream; handed back to torch's caching allocator once
    // the launch is queued, which reuses them only for work queued on this stream after it
    static const bool group_sync = allowed("FASTRNN_PERSISTENT_GROUP_SYNC");
    c10::DataPtr counters;
    if (group_sync) {
      const size_t bytes = static_cast<size_t>(sync_groups(p) * kCounterStride) * sizeof(unsigned);
      counters = c10::cuda::CUDACachingAllocator::get()->allocate(bytes);
      C10_CUDA_CHECK(cudaMemsetAsync(counters.get(), 0, bytes, stream));
      copy.sync = static_cast<unsigned*>(counters.get());
    }
    // a cooperative launch guarantees every block is resident at once, which any barrier among blocks needs
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, grid, block, params, static_cast<size_t>(p.smem), stream));
  } else {
    C10_CUDA_CHECK(cudaLaunchKernel(kernel, grid, block, params, static_cast<size_t>(p.smem), stream));
  }
  return p.scheme;
}

// Probe (persist.h): the engine's own block GEMM and step barrier, timed per block. Ws holds 1/64 (any finite
// value serves: the GPU's FMAs take the same time for every operand). A barrier before the clocks start takes the
// launch's skew between blocks out of the first step.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) probe_kernel(const __grid_constant__ Dirs<Probe> dirs) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Probe& p = dirs.d[0];
  const int tid = static_cast<int>(threadIdx.x);
  const Smem<T> sm = Smem<T>::carve(smem_raw, p.g);
  const int64_t b = blockIdx.x, r0 = (b % p.rows) * p.g.bt;
  if (p.gemm) {
    for (int64_t i = tid; i < w_elems(p.g); i += kThreads) sm.w[i] = T(1.0f / 64);
    // an exchanged operand is never staged: zeros in place of what the engine's cells would have put there
    if (p.exchange) zero_stages(p.g, sm, tid);
  }
  const T* src = static_cast<const T*>(p.a);
  T* dst = static_cast<T*>(p.out);
  const auto a = [&](int64_t r, int64_t k) { return ld_l2(src + (r0 + r) * p.g.K + k); };
  const auto sink = [&](int64_t r, int64_t c, float v) { dst[(b * p.g.bt + r) * p.g.R + c] = static_cast<T>(v); };
  step_barrier(p.plan, dirs.sync, 1);
  const long long t0 = clock64(), n0 = global_ns();
  for (int64_t i = 0; i < p.iters; ++i) {
    if (p.gemm) {
      block_gemm(p.g, sm, tid, p.exchange ? p.g.bt : 0, p.g.bt, a, [](int) { return 0; },
                 [&](int t, int) { reduce_to(p.g, sm, t, p.g.bt, sink); });
    }
    step_barrier(p.plan, dirs.sync, static_cast<unsigned>(i + 2));
  }
  const long long t1 = clock64(), n1 = global_ns();
  if (tid == 0) {
    p.cycles[b] = t1 - t0;
    p.ns[b] = n1 - n0;
  }
}

template <class Visit, class Args>
int run(Mode m, Dtype d, const Dirs<Args>& args, void* stream, Visit visit) {
  auto s = static_cast<cudaStream_t>(stream);
  int ran = kNone;
  visit(m, [&](auto op) {
    using Op = decltype(op);
    auto go = [&](auto zero) {
      using T = decltype(zero);
      if constexpr (std::is_same_v<Args, Fwd>) {
        ran = launch(reinterpret_cast<const void*>(&persist_kernel<FwdProgram<Op, T>>), args, s);
      } else {
        ran = launch(reinterpret_cast<const void*>(&persist_kernel<BwdProgram<Op, T>>), args, s);
      }
    };
    switch (d) {
      case Dtype::F32: return go(float{});
      case Dtype::F16: return go(c10::Half{});
      case Dtype::BF16: return go(c10::BFloat16{});
      case Dtype::F64: TORCH_CHECK(false, "fastrnn: the persistent CUDA engine has no fp64 kernels");
    }
  });
  return ran;
}

}  // namespace

int fwd_cuda(Mode m, Dtype d, const Dirs<Fwd>& f, void* stream) {
  return run(m, d, f, stream, [](Mode mm, auto&& fn) { visit_fwd(mm, fn); });
}

int bwd_cuda(Mode m, Dtype d, const Dirs<Bwd>& f, void* stream) {
  return run(m, d, f, stream, [](Mode mm, auto&& fn) { visit_bwd(mm, fn); });
}

int probe_cuda(Dtype d, const Probe& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (d) {
    case Dtype::F32: return launch(reinterpret_cast<const void*>(&probe_kernel<float>), Dirs<Probe>{{p}}, s);
    case Dtype::BF16: return launch(reinterpret_cast<const void*>(&probe_kernel<c10::BFloat16>), Dirs<Probe>{{p}}, s);
    default: break;
  }
  TORCH_CHECK(false, "fastrnn: the probe times fp32 and bf16 storage only");
}

int ext_fwd_cuda(Mode m, const Dirs<ExtFwd>& f, void* stream) {
  int ran = kNone;
  visit_ext(m, [&](auto op) {
    ran = launch(reinterpret_cast<const void*>(&persist_kernel<ExtFwdProgram<decltype(op)>>), f,
                 static_cast<cudaStream_t>(stream));
  });
  return ran;
}

int ext_bwd_cuda(Mode m, const Dirs<ExtBwd>& f, void* stream) {
  int ran = kNone;
  visit_ext(m, [&](auto op) {
    ran = launch(reinterpret_cast<const void*>(&persist_kernel<ExtBwdProgram<decltype(op)>>), f,
                 static_cast<cudaStream_t>(stream));
  });
  return ran;
}

namespace {
// The kernel that answers for all of the engine's in the queries below: one build compiles them all for the same
// architectures, and each runs a block per SM (persist.h Limits::clusters_at_once).
const void* any_kernel() {
  return reinterpret_cast<const void*>(&persist_kernel<FwdProgram<LstmFwd, c10::BFloat16>>);
}

// FASTRNN_PERSISTENT_CLUSTER=0 plans as if the GPU had no clusters (split plans then meet at the grid barrier),
// to measure one barrier against the other; read once per device, with its limits, as are
// FASTRNN_PERSISTENT_MMA and FASTRNN_PERSISTENT_PAD (0: the SIMT loop's strides unpadded, bank conflicts and all).
// Tensor cores for 16-bit: sm_80 and later, in a build whose code for this device has the mma instruction (a
// build for sm_75 alone would run PTX without it). FASTRNN_PERSISTENT_MMA=0 keeps 16-bit on the SIMT loop, to
// measure one against the other.
bool tensor_cores(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, any_kernel()) != cudaSuccess) {
    (void)cudaGetLastError();  // no code for this device: no tensor cores (a launch would say why)
    return false;
  }
  return major >= 8 && attr.ptxVersion >= 80 && allowed("FASTRNN_PERSISTENT_MMA");
}

// Limits::clusters_at_once for clusters of 2 to l.cluster blocks, each block asking for all the shared memory it may
// have: a block per SM, as every launch of the engine runs (its registers see to that).
// Where the runtime will not answer, the counts stay unknown (sms / n) and a launch's own check decides.
void query_clusters(Limits& l) {
  if (l.cluster == 0) return;
  const void* kernel = any_kernel();
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  const int64_t smem = l.smem - static_cast<int64_t>(attr.sharedSizeBytes);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  for (int64_t n = 2; n <= l.cluster; ++n) {
    cudaLaunchAttribute cluster{};
    const cudaLaunchConfig_t cfg = cluster_launch(static_cast<unsigned>(n), n, smem, nullptr, cluster);
    int at_once = 0;
    if (cudaOccupancyMaxActiveClusters(&at_once, kernel, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();  // a size this GPU cannot place: none at once
      at_once = 0;
    }
    l.clusters_at_once[n] = at_once;
  }
}

Limits query_limits(int device) {
  Limits l;
  int sms = 0, smem = 0, coop = 0, cluster = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, device));
  l.sms = sms;
  l.smem = smem;
  l.cooperative = coop != 0;
  // clusters where the device launches them and this build has sm_90 code for it (has_clusters)
  l.cluster = cluster != 0 && allowed("FASTRNN_PERSISTENT_CLUSTER") && has_clusters(any_kernel()) ? kMaxCluster : 0;
  l.mma = tensor_cores(device);
  l.pad = allowed("FASTRNN_PERSISTENT_PAD");
  query_clusters(l);
  return l;
}
}  // namespace

// Asked once per device: every layer call plans with them.
Limits limits(int device) {
  static std::mutex m;
  static std::unordered_map<int, Limits> known;
  const std::lock_guard<std::mutex> lock(m);
  auto it = known.find(device);
  if (it == known.end()) {
    // tensor_cores' cudaFuncGetAttributes asks the current device: this one, whichever the caller's is
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    it = known.emplace(device, query_limits(device)).first;
  }
  return it->second;
}

}  // namespace persist
}  // namespace fastrnn
