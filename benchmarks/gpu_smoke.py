"""Every fused kernel once, forward and backward, on a small case: the workload compute-sanitizer checks.

``python benchmarks/gpu_smoke.py`` runs the cpp backend's kernels and the three Triton variants ("step",
"seq", and "persist" at an H of three hidden slices, so its barrier runs) for every cell, plus the LSTM
projection and fastrnn's cells with every feature (LayerNorm, zoneout, recurrent dropout: the cpp kernels and
Triton's "step", "seq" and "persist" ones, the last at an H of several slices), and the cpp backend's plain and new cells again at an H whose W_hh its
persistent engine (FASTRNN_PERSISTENT=1) splits over blocks, and the plain cells in bf16 (the engine's tensor
cores) and bidirectional (both directions in one launch), and Triton's step loops replayed from a CUDA graph
(the plain cells' and fastrnn's own), on the GPU, and compares each result and gradient (the LayerNorm
parameters' too) with the plain-PyTorch reference backend on the same inputs (in fp32 from the same rounded
values). On a machine without a GPU, ``--device cpu`` runs the cpp cases on the CPU kernels (and the Triton
ones when TRITON_INTERPRET=1 is set); ``--list`` prints the cases, ``--graphs`` keeps the CUDA-graph ones alone
(which need torch's caching allocator, so they skip under PYTORCH_NO_CUDA_MEMORY_CACHING=1). Exit status 1 when
any case fails or differs.
"""

import argparse
import importlib
import os
import sys
from typing import List, NamedTuple, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastrnn import backend as fr_backend  # noqa: E402
from fastrnn.ops import GATES, MODES, CellExt, LayerArgs  # noqa: E402

T, B, I, H, PROJ = 5, 3, 8, 16, 8  # H small enough for the whole-sequence Triton kernels
H_SLICES = 48  # Triton's "persist" kernels split this H over three programs that meet at a barrier each step
# fastrnn's cells' "persist" kernels (from H = 128 on a GPU) split it over G*H / 16 programs forward, H / 16 backward
H_CELL_SLICES = 128
H_GRID = 256  # the cpp persistent engine's W_hh slices over several blocks on any GPU (fp32 RNN: 256 KiB)
B_TILES = 16  # at H_GRID, the persistent engine's batch in several tiles, each its own cluster or barrier group
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# largest difference from the reference, relative to the largest value, by storage dtype
TOLERANCE = {"fp32": 1e-4,  # TF32 off: only summation order differs from the reference
             "bf16": 3e-2}  # h rounded to 8 bits every step; a wrong fragment or tile is off by O(1)


class SmokeCase(NamedTuple):
    backend: str
    mode: str
    variant: Optional[str] = None  # Triton's kernel variant; the cpp backend has one per device
    proj: bool = False
    hidden: int = H
    cells: bool = False  # fastrnn's cells with every feature
    dtype: str = "fp32"  # storage dtype (DTYPES); the reference computes in fp32 from the same rounded values
    pair: bool = False  # both directions of a bidirectional layer through the backend's layer.pair
    graph: bool = False  # Triton's step loop with cuda_graph=True, called until a capture has replayed
    batch: int = B

    @property
    def name(self) -> str:
        return "-".join(filter(None, [self.backend, self.variant, self.mode.lower(), "proj" if self.proj else "",
                                      f"h{self.hidden}" if self.hidden != H else "", "cells" if self.cells else "",
                                      self.dtype if self.dtype != "fp32" else "", "bidir" if self.pair else "",
                                      "graph" if self.graph else "", f"b{self.batch}" if self.batch != B else ""]))


CASES = [SmokeCase("cpp", m) for m in MODES] + [SmokeCase("triton", m, v) for v in ("step", "seq") for m in MODES] + [
    SmokeCase("triton", m, "persist", hidden=H_SLICES) for m in MODES] + [
    SmokeCase("cpp", "LSTM", proj=True),
    SmokeCase("triton", "LSTM", "step", proj=True),  # "seq" has no projection
] + [SmokeCase("cpp", m, cells=True) for m in MODES] + [
    # with FASTRNN_PERSISTENT=1: W_hh of H_GRID fits no single block, so the persistent engine splits it over
    # blocks meeting at a cluster's barrier (sm_90) or the grid's (FASTRNN_PERSISTENT_CLUSTER=0, or before
    # sm_90); at H the whole W_hh sits in each block
    SmokeCase("cpp", m, hidden=H_GRID, cells=c) for m in MODES for c in (False, True)] + [
    # several batch tiles, each split over blocks: each tile's blocks meet at a barrier of their own
    SmokeCase("cpp", m, hidden=H_GRID, batch=B_TILES) for m in ("LSTM", "GRU")] + [
    SmokeCase("triton", m, v, cells=True) for v in ("step", "seq") for m in MODES] + [
    SmokeCase("triton", m, "persist", hidden=H_CELL_SLICES, cells=True) for m in MODES] + [
    # bf16: with FASTRNN_PERSISTENT=1 the persistent engine's GEMMs on tensor cores (mma.sync), in one block at
    # H and split over blocks at H_GRID; not ReLU, whose derivative flips where rounding h to 8 bits moves a
    # pre-activation across 0 (its GEMMs are the tanh RNN's)
    SmokeCase("cpp", m, hidden=h, dtype="bf16") for m in ("LSTM", "GRU", "RNN_TANH") for h in (H, H_GRID)] + [
    # both directions in one launch of the persistent engine: each on half the SMs, their blocks one grid
    SmokeCase("cpp", m, hidden=h, dtype=d, pair=True) for m in ("LSTM", "GRU", "RNN_TANH") for h in (H, H_GRID)
    for d in ("fp32", "bf16")] + [
    # the step loops replayed from a CUDA graph: the plain cells' with a projection, fastrnn's own cells'
    SmokeCase("triton", "LSTM", "step", proj=True, graph=True),
    SmokeCase("triton", "GRU", "step", cells=True, graph=True),
]  # fmt: skip
# calls of a graph case: a shape is captured on its second call (and replayed at once) and replayed from the cache
# on its third (host.run_loop); the calls before the last take other inputs, so that a replay that kept any of
# theirs differs from the reference
GRAPH_CALLS = 3


def inputs(case: SmokeCase, device: torch.device, seed: int = 0) -> List[Optional[torch.Tensor]]:
    """x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr of one dense layer in fp32, rounded to the case's dtype."""
    g = torch.Generator().manual_seed(sum(map(ord, case.name)) + seed)
    hid, b = case.hidden, case.batch
    h_out = PROJ if case.proj else hid
    shapes = [(T * b, I), (b, h_out), (b, hid) if case.mode == "LSTM" else None, (GATES[case.mode] * hid, I),
              (GATES[case.mode] * hid, h_out), (GATES[case.mode] * hid,), (GATES[case.mode] * hid,),
              (h_out, hid) if case.proj else None]  # fmt: skip
    dt = DTYPES[case.dtype]
    # 16-bit at std 0.5 and H = 256 saturates tanh, and 1 - y^2 of a y rounded to 8 bits near 1 is noise: 16-bit
    # cases scale as 1/sqrt(H), as torch.nn's initialisation does
    std = 0.5 if dt == torch.float32 else min(0.5, 2 / hid**0.5)
    return [None if s is None else (std * torch.randn(s, generator=g)).to(dt).float().to(device) for s in shapes]


def cell_ext(case: SmokeCase, device: torch.device) -> Optional[CellExt]:
    """With ``case.cells``: LayerNorm parameters off their 1/0 initialisation (requiring grad), zoneout draws of
    0/1 and a recurrent-dropout mask scaled by 1/(1-p)."""
    if not case.cells:
        return None
    g = torch.Generator().manual_seed(sum(map(ord, case.name)) + 1)
    hid, gh, lstm, b = case.hidden, GATES[case.mode] * case.hidden, case.mode == "LSTM", case.batch

    def param(n: int, center: float) -> torch.Tensor:
        return (center + 0.3 * torch.randn(n, generator=g)).to(device).requires_grad_()

    def draws(shape, p: float) -> torch.Tensor:
        return torch.bernoulli(torch.full(shape, p), generator=g).to(device)

    return CellExt(param(gh, 1.0), param(gh, 0.0), param(gh, 1.0), param(gh, 0.0),
                   param(hid, 1.0) if lstm else None, param(hid, 0.0) if lstm else None,
                   draws((T * b, hid), 0.25), draws((T * b, hid), 0.25) if lstm else None, draws((b, hid), 0.7) / 0.7)


def rel_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def run(case: SmokeCase, device: torch.device) -> float:
    """The largest relative difference from the reference over outputs and every gradient."""
    values = inputs(case, device)
    reverse = inputs(case, device, seed=1)[1:] if case.pair else []  # the reverse direction's own tensors
    ext = cell_ext(case, device)
    results = []
    for name in (case.backend, "reference"):
        dt = DTYPES[case.dtype] if name == case.backend else torch.float32
        layer = importlib.import_module(f"fastrnn.ops.{name}").layer
        extra = {"variant": case.variant} if case.variant and name == case.backend else {}
        if name == case.backend == "triton":
            # asked either way: FASTRNN_PERSISTENT=1 would have a step loop's second call of a shape capture a
            # graph, which the sanitizers' uncached allocator refuses
            extra["cuda_graph"] = case.graph
        if ext is not None:
            extra["ext"] = ext
        calls = GRAPH_CALLS if case.graph and name == case.backend else 1
        for call in range(calls):
            given = values + reverse if call == calls - 1 else inputs(case, device, seed=2 + call)
            x, *own = [None if v is None else v.to(dt).requires_grad_() for v in given]
            a = LayerArgs(case.mode, x, None, *own[:7], False)
            if case.pair:
                r = a._replace(**dict(zip(LayerArgs._fields[3:10], own[7:])), reverse=True)
                outs = layer.pair(a, r) if name == case.backend else (layer(a), layer(r))
            else:
                outs = (layer(a, **extra),)
            outs = [t for out in outs for t in out if t is not None]
            leaves = [t for t in [x] + own + list(ext or ())[:6] if t is not None and t.requires_grad]
            torch.manual_seed(0)
            up = [torch.randn(t.shape).to(DTYPES[case.dtype]).to(t) for t in outs]
            grads = torch.autograd.grad(outs, leaves, up)
        results.append([t.float() for t in outs + list(grads)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return max(rel_err(a, b) for a, b in zip(*results))


def why_not(case: SmokeCase, device: torch.device) -> Optional[str]:
    if case.graph and device.type != "cuda":
        return "CUDA graphs need a GPU"
    if case.graph and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        # torch's uncached allocator refuses allocations during a capture (gpu_check.sh's memcheck-graphs step)
        return "CUDA graphs need torch's caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1 is set)"
    return fr_backend.reason_unavailable(case.backend, device, DTYPES[case.dtype])


def case_plan(case: SmokeCase, limits: Optional[dict] = None) -> Optional[dict]:
    """For a cpp case with FASTRNN_PERSISTENT=1, the persistent engine's plan for it (``cpp.persistent_plan``; on
    ``limits`` where given, else the current GPU's), so that a run says which schemes it reached; else None."""
    if case.backend != "cpp" or os.environ.get("FASTRNN_PERSISTENT") != "1":
        return None
    cpp = importlib.import_module("fastrnn.ops.cpp")
    return cpp.persistent_plan(case.mode, case.batch, case.hidden, DTYPES[case.dtype], cells=case.cells,
                               proj_size=PROJ if case.proj else 0, bidirectional=case.pair, limits=limits)


def describe(plan: Optional[dict]) -> str:
    """`` [scheme xslices, mma, 2 dirs]`` of a plan, empty without one."""
    if plan is None:
        return ""
    split = f" x{plan['slices']}" if plan["scheme"] in ("grid", "cluster") else ""
    return f" [{plan['scheme']}{split}{', mma' if plan['mma'] else ''}{', 2 dirs' if plan['dirs'] == 2 else ''}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the point of it) or cpu (to check the script)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--graphs", action="store_true", help="only the CUDA-graph cases")
    args = p.parse_args(argv)
    cases = [c for c in CASES if c.graph] if args.graphs else CASES
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_smoke: no CUDA device visible; use --device cpu to check the script", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    failed = ran = 0
    schemes = set()
    for case in cases:
        reason = why_not(case, device)
        if reason is not None:
            print(f"SKIP {case.name}: {reason}")
            continue
        ran += 1
        try:
            err = run(case, device)
        except Exception as exc:  # one broken kernel must not hide the others
            failed += 1
            print(f"FAIL {case.name}: {type(exc).__name__}: {exc}")
            continue
        ok = err <= TOLERANCE[case.dtype]
        failed += not ok
        plan = case_plan(case) if device.type == "cuda" else None
        if plan is not None:
            schemes.add(plan["scheme"])
        print(f"{'ok  ' if ok else 'FAIL'} {case.name}: max relative difference from the reference {err:.2e}"
              f"{describe(plan)}")
    print(f"{ran - failed} of {ran} cases passed, {len(cases) - ran} skipped")
    if schemes:
        print(f"persistent engine schemes planned: {', '.join(sorted(schemes))}")
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
