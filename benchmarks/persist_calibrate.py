"""The persistent CUDA engine's cost model measured on the GPU at hand.

The plan (``csrc/persist.h`` ``make_plan``) chooses how a layer's hidden units and batch rows split over blocks by
pricing a step: the block GEMMs in the model's unit (a thread's SIMT FMA; a K step of the 4 x 4 tile is 16 of
them), each staged K chunk (``kStageCycles``), a warp's round of tensor-core instructions (``kMmaCycles``) and the
barrier between blocks (``kGridSyncCycles``, ``kClusterSyncCycles``). Those constants are estimates written
before any GPU ran the engine. This script times the engine's own pieces with its own code
(``fastrnn._C._persist_probe``: its block GEMM and step barrier in a loop, ``clock64`` per block, one block per
SM) and fits them:

- barriers: a block's own (``__syncthreads``), the grid's (cooperative launch) over all SMs and fewer, and a
  thread-block cluster's of 2, 4 and 8 blocks (sm_90);
- the block GEMMs of the plans the standard configurations get on this GPU (forward and backward, fp32 on the
  SIMT loop, bf16 on the tensor cores), each again in the smallest chunks, so that the chunks' price separates
  from the K loop's;
- cycles per step = a * units + b * chunks + c over the SIMT GEMMs (least squares; ``units`` is the model's price
  of the GEMM, bank conflicts included), and m * (a warp's mma rounds) + b' * chunks + c' over the tensor cores'.

It prints (and with ``--out`` writes) each measurement beside the model's price and the constants the fit
implies in the model's unit (``a`` cycles), beside those in ``csrc/persist.h``, with the SM clock the run saw.
Setting them is a code change left to whoever reads the result.

    python benchmarks/persist_calibrate.py --out benchmarks/results/gpu/calibration.md
"""

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rnnbench.cases import STANDARD_CONFIGS  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.ops import GATES, cpp  # noqa: E402

MODES = ("LSTM", "GRU", "RNN_TANH")
BARRIER_ITERS = 2000
GEMM_ITERS = 200


@dataclass
class Sample:
    kind: str  # "barrier", "simt" or "mma"
    label: str
    scheme: str  # the scheme asked for
    ran: str  # the scheme that ran (a cluster that does not fit runs at the grid barrier)
    blocks: int
    cycles: float  # per step, the median over blocks
    us: float  # per step, wall time of the launch (CUDA events) over its steps
    units: int = 0
    steps: int = 0
    chunks: int = 0


# probe(scheme, blocks, cluster=0, K=0, R=0, bt=0, mma=False, es=4, kc=64, iters=...) -> _C._persist_probe's dict
Probe = Callable[..., dict]


def gpu_probe(device: int) -> Probe:
    """``_C._persist_probe`` on ``device``, its cycles on the host and the launch's time beside them."""
    lib = fastrnn._C

    def probe(scheme: str, blocks: int, **kw) -> dict:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = dict(lib._persist_probe(device, scheme, blocks, **kw))
        end.record()
        end.synchronize()
        out["cycles"] = out["cycles"].tolist()
        out["ms"] = start.elapsed_time(end)
        return out

    return probe


def _sample(probe: Probe, kind: str, label: str, scheme: str, blocks: int, iters: int, pad: bool = True,
            **kw) -> Sample:
    r = probe(scheme, blocks, iters=iters, **kw)
    s = Sample(kind, label, scheme, r["scheme"], blocks, statistics.median(r["cycles"]) / iters, r["ms"] * 1e3 / iters)
    if kw.get("K"):
        price = fastrnn._C._persist_gemm_price(kw["K"], kw["R"], kw["bt"], kw["mma"], kw["es"], kw["kc"], pad)
        s.units, s.steps, s.chunks = price["units"], price["steps"], price["chunks"]
    return s


def plans(plan_of: Callable[[str, int, int, torch.dtype], dict]) -> List[tuple]:
    """(label, plan, G, H, dtype) of every standard configuration's layer that the engine runs, fp32 and bf16."""
    out, seen = [], set()
    for dtype in (torch.float32, torch.bfloat16):
        for cfg in STANDARD_CONFIGS:
            for mode in MODES:
                p = plan_of(mode, cfg.B, cfg.H, dtype)
                key = (p["units"], p["batch_tile"], p["mma"], p["chunks"], GATES[mode], cfg.H, dtype)
                if p["scheme"] == "per-step" or key in seen:
                    continue
                seen.add(key)
                name = f"{mode} B={cfg.B} H={cfg.H} {str(dtype).removeprefix('torch.')}"
                out.append((name, p, GATES[mode], cfg.H, dtype))
    return out


def measure(probe: Probe, limits: dict, plan_of: Callable[[str, int, int, torch.dtype], dict],
            quick: bool = False) -> List[Sample]:
    """Every measurement, in the order the report lists them; ``quick``: fewer steps per launch, for a test."""
    sms, cluster = int(limits["sms"]), int(limits.get("cluster", 0))
    b_iters, g_iters = (50, 5) if quick else (BARRIER_ITERS, GEMM_ITERS)
    out = [_sample(probe, "barrier", "block barrier, one block", "block", 1, b_iters),
           _sample(probe, "barrier", f"block barrier, {sms} blocks", "block", sms, b_iters)]
    if limits.get("cooperative", True):
        for n in sorted({sms, max(sms // 2, 1), min(16, sms)}, reverse=True):
            out.append(_sample(probe, "barrier", f"grid barrier, {n} blocks", "grid", n, b_iters))
    # the GPCs may hold fewer clusters than the SMs allow (the launch then takes the grid barrier, as the engine's
    # does): each size also as one cluster alone
    for size in (2, 4, 8):
        for n in sorted({sms // size * size, size} if size <= cluster else (), reverse=True):
            out.append(_sample(probe, "barrier", f"cluster barrier of {size}, {n} blocks", "cluster", n, b_iters,
                               cluster=size))
    for name, p, G, H, dtype in plans(plan_of):
        es = 2 if dtype == torch.bfloat16 else 4
        kind = "mma" if p["mma"] else "simt"
        unit = 128 if p["mma"] else 64
        blocks = min(int(p["blocks"]), sms)
        for what, K, R, kc in (("fwd", H, G * p["units"], p["chunks"][0]), ("bwd", G * H, p["units"], p["chunks"][1])):
            for chunk in sorted({kc, unit}, reverse=True):
                if chunk > K and chunk != kc:
                    continue
                out.append(_sample(probe, kind, f"{name} {what} ({K} x {R}, {p['batch_tile']} rows, kc {chunk})",
                                   "block", blocks, g_iters, pad=bool(limits.get("pad", True)), K=K, R=R,
                                   bt=p["batch_tile"], mma=p["mma"], es=es, kc=chunk))
    return out


@dataclass
class Fit:
    coef: Sequence[float]  # per unit (SIMT) or mma round, per chunk, per GEMM call
    worst: float  # largest |residual| / measured over the samples fitted
    n: int


def _fit(samples: List[Sample], x_of: Callable[[Sample], float], base: float) -> Optional[Fit]:
    if len(samples) < 3:
        return None
    a = np.array([[x_of(s), s.chunks, 1.0] for s in samples])
    y = np.array([s.cycles - base for s in samples])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = np.abs(a @ coef - y) / np.maximum(np.abs(y), 1e-9)
    return Fit(tuple(float(c) for c in coef), float(resid.max()), len(samples))


def fit(samples: List[Sample]) -> Dict[str, object]:
    """The fits and the constants they imply in the model's unit (one SIMT FMA of a thread, ``a`` cycles)."""
    block = next((s.cycles for s in samples if s.kind == "barrier" and s.scheme == "block" and s.blocks > 1), 0.0)
    simt = _fit([s for s in samples if s.kind == "simt"], lambda s: s.units, block)
    mma = _fit([s for s in samples if s.kind == "mma"], lambda s: s.steps, block)
    out: Dict[str, object] = {"simt": simt, "mma": mma, "block_barrier": block}
    if simt is None or simt.coef[0] <= 0:
        return out
    unit = simt.coef[0]
    implied = {"unit_cycles": unit, "stage": simt.coef[1] / unit}
    grids = [s for s in samples if s.kind == "barrier" and s.ran == "grid"]
    if grids:
        implied["grid_sync"] = max(grids, key=lambda s: s.blocks).cycles / unit
    clusters = [s for s in samples if s.kind == "barrier" and s.ran == "cluster"]
    if clusters:
        implied["cluster_sync"] = max(s.cycles for s in clusters) / unit
    if mma is not None:
        implied["mma"] = mma.coef[0] / unit
    out["implied"] = implied
    return out


def clock_ghz(samples: List[Sample]) -> Optional[float]:
    """The SM clock the run saw: cycles over wall time of the barrier launches (the longest, launch overhead
    least)."""
    rates = [s.cycles / (s.us * 1e3) for s in samples if s.kind == "barrier" and s.us > 0]
    return statistics.median(rates) if rates else None


def markdown(samples: List[Sample], fitted: Dict[str, object], model: dict, title: str) -> str:
    lines = [f"# Persistent engine cost model on {title}", "",
             "`python benchmarks/persist_calibrate.py`: the engine's block GEMM and step barrier "
             "(`fastrnn._C._persist_probe`), one block per SM, cycles per step the median over blocks of `clock64`; "
             "µs per step from CUDA events over the launch. `units`: the model's price of the GEMM (csrc/persist.h "
             "`gemm_cycles`, bank conflicts included); `steps`: a thread's K steps (SIMT) or a warp's mma rounds.", ""]
    ghz = clock_ghz(samples)
    if ghz:
        lines += [f"SM clock seen: {ghz:.2f} GHz.", ""]
    lines += ["| measurement | kind | scheme ran | blocks | cycles / step | µs / step | units | steps | chunks |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in samples:
        gemm = s.kind != "barrier"
        lines.append(f"| {s.label} | {s.kind} | {s.ran} | {s.blocks} | {s.cycles:.0f} | {s.us:.3g} | "
                     f"{s.units if gemm else ''} | {s.steps if gemm else ''} | {s.chunks if gemm else ''} |")
    lines.append("")
    for name, what in (("simt", "units"), ("mma", "mma rounds")):
        f = fitted.get(name)
        if f is not None:
            a, b, c = f.coef
            lines.append(f"- {name} fit over {f.n} GEMMs (block barrier subtracted): cycles = {a:.3g} x {what} + "
                         f"{b:.3g} x chunks + {c:.3g}; worst residual {f.worst:.0%}")
    implied = fitted.get("implied")
    if implied:
        lines += ["", f"Constants in the model's unit ({implied['unit_cycles']:.3g} cycles), against csrc/persist.h:", "",
                  "| constant | persist.h | measured |", "| --- | --- | --- |"]
        for key, const in (("grid_sync", "kGridSyncCycles"), ("cluster_sync", "kClusterSyncCycles"),
                           ("stage", "kStageCycles"), ("mma", "kMmaCycles")):
            if key in implied:
                lines.append(f"| {const} | {model[key]} | {implied[key]:.0f} |")
    else:
        lines += ["", "Too few SIMT GEMMs (or a non-positive slope) to fit the model's unit: no constants implied."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", type=int, default=0, help="CUDA device index")
    ap.add_argument("--out", help="write the markdown here as well")
    ap.add_argument("--quick", action="store_true", help="few steps per launch (a smoke run, not a measurement)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("persist_calibrate: no CUDA GPU visible to torch: nothing measured", file=sys.stderr)
        return 2
    limits = dict(fastrnn._C.cuda_limits(args.device))
    probe = gpu_probe(args.device)
    device = torch.device("cuda", args.device)

    def plan_of(mode: str, batch: int, hidden: int, dtype: torch.dtype) -> dict:
        return cpp.persistent_plan(mode, batch, hidden, dtype, device=device)

    samples = measure(probe, limits, plan_of, quick=args.quick)
    model = dict(fastrnn._C._persist_gemm_price(64, 1, 1)["model"])
    text = markdown(samples, fit(samples), model,
                    f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, {limits['sms']} SMs)")
    print(text, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
