"""The persistent CUDA engine's cost model measured on the GPU at hand.

The plan (``csrc/persist.h`` ``make_plan``) chooses how a layer's hidden units and batch rows split over blocks by
pricing a step: the block GEMMs in the model's unit (a thread's SIMT FMA; a K step of the 4 x 4 tile is 16 of
them), each K chunk staged from L2 (``kStageCycles``) or exchanged in shared memory (``kExchangeCycles``), a
warp's round of tensor-core instructions (``kMmaCycles``) and the barrier between blocks (``kGridSyncCycles``,
plus ``kGridSyncMemberCycles`` per block of the group that meets at it, and ``kClusterSyncCycles``). Those
constants are estimates written before any GPU ran the engine. This script times the engine's own pieces with
its own code (``fastrnn._C._persist_probe``: its block GEMM and step barrier in a loop, SM cycles from ``clock64``
and nanoseconds from ``%globaltimer`` per block, one block per SM) and fits them:

- barriers: a block's own (``__syncthreads``), the grid's (cooperative launch) over all SMs and fewer, and a
  thread-block cluster's of 2, 4 and 8 blocks (sm_90), as many clusters as the GPU holds at once (``cuda_limits``'s
  ``clusters_at_once``) and as one cluster alone;
- block GEMMs: those of the plans the standard configurations get on this GPU (fp32 planned without TF32, on the
  SIMT loop; with TF32 and in bf16, on the tensor cores), their operand as many batch tiles as the plan's, and a
  sweep over K at one shape per loop for leverage, each also in the smallest chunks, so that the chunks' price
  separates from the K loop's, and each of one chunk also with its operand kept in shared memory (``exchange``:
  as the engine's cells hand it over where a block holds every unit or a cluster's blocks push it), so that the
  L2 round trip's price separates from the chunk's block barriers (``kExchangeCycles``);
- cycles per step = a * units + b * chunks + e * exchanged + c over the SIMT GEMMs (least squares; ``units`` is the
  model's price of the GEMM, bank conflicts included, ``chunks`` those staged from L2, ``exchanged`` 1 for a kept
  operand, ``c`` what the model does not price: spill, reduction, results), and m * (a warp's mma rounds) +
  b' * chunks + e' * exchanged + c' over each tensor-core kind; a fit needs more samples than terms and distinct
  chunk counts, else it says so; the grid barrier as fixed + per member * blocks over its sizes, where that line
  rises from above zero (else flat, at the most blocks).

It prints (and with ``--out`` writes) each measurement beside the model's price and the constants the fits imply
in the model's unit (``a`` cycles), beside those in ``csrc/persist.h``, with the SM clock the run saw. Setting
them is a code change left to whoever reads the result.

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
from rnnbench.report import publish  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.ops import GATES, cpp  # noqa: E402

MODES = ("LSTM", "GRU", "RNN_TANH")
BARRIER_ITERS = 2000
GEMM_ITERS = 200
# the sweeps' shapes: (kind, R, bt) at K of SWEEP_K
SWEEPS = (("simt", 32, 16), ("mma-bf16", 64, 16), ("mma-tf32", 64, 16))
SWEEP_K = (128, 256, 512, 1024, 2048)


@dataclass
class Sample:
    kind: str  # "barrier", "simt", "mma-bf16" or "mma-tf32"
    label: str
    scheme: str  # the scheme asked for
    ran: str  # the scheme that ran (a cluster that does not fit runs at the grid barrier)
    blocks: int
    cycles: float  # per step, the median over blocks
    ns: float  # per step, the median over blocks
    units: int = 0
    steps: int = 0
    chunks: int = 0  # staged from L2
    exchanged: int = 0  # 1: the one chunk kept in shared memory


# probe(scheme, blocks, cluster=0, K=0, R=0, bt=0, mma=False, es=4, kc=64, pad=True, rows=1, iters=...,
# exchange=False) ->
# _C._persist_probe's dict with its tensors as lists
Probe = Callable[..., dict]


def gpu_probe(device: int) -> Probe:
    """``_C._persist_probe`` on ``device``, its per-block counts on the host."""
    lib = fastrnn._C

    def probe(scheme: str, blocks: int, **kw) -> dict:
        with torch.cuda.device(device):
            out = dict(lib._persist_probe(device, scheme, blocks, **kw))
            return dict(out, cycles=out["cycles"].tolist(), ns=out["ns"].tolist())

    return probe


def _sample(probe: Probe, kind: str, label: str, scheme: str, blocks: int, iters: int, **kw) -> Sample:
    r = probe(scheme, blocks, iters=iters, **kw)
    s = Sample(kind, label, scheme, r["scheme"], blocks, statistics.median(r["cycles"]) / iters,
               statistics.median(r["ns"]) / iters)
    if kw.get("K"):
        price = fastrnn._C._persist_gemm_price(kw["K"], kw["R"], kw["bt"], kw["mma"], kw["es"], kw["kc"], kw["pad"],
                                               exchange=kw.get("exchange", False))
        s.units, s.steps, s.chunks, s.exchanged = price["units"], price["steps"], price["chunks"], price["exchanged"]
    return s


def gemm_kind(mma: bool, es: int) -> str:
    return "simt" if not mma else "mma-bf16" if es == 2 else "mma-tf32"


def plan_gemms(limits: dict) -> List[tuple]:
    """(label, kind, K, R, bt, mma, es, kc, pad, tiles, blocks) of the forward and backward GEMM of every standard
    configuration's layer the engine runs on a device of ``limits``: fp32 planned without TF32 and, where the
    device has tensor cores, with it, and bf16; each GEMM once."""
    variants = [(torch.float32, False)] + ([(torch.float32, True), (torch.bfloat16, False)] if limits.get("mma") else
                                           [(torch.bfloat16, False)])
    out, seen = [], set()
    for dtype, tf32 in variants:
        lim = dict(limits, tf32=tf32)
        for cfg in STANDARD_CONFIGS:
            for mode in MODES:
                p = cpp.persistent_plan(mode, cfg.B, cfg.H, dtype, limits=lim)
                if p["scheme"] == "per-step":
                    continue
                G, U, es = GATES[mode], p["units"], 2 if dtype == torch.bfloat16 else 4
                for what, K, R, kc in (("fwd", cfg.H, G * U, p["chunks"][0]), ("bwd", G * cfg.H, U, p["chunks"][1])):
                    key = (K, R, p["batch_tile"], p["mma"], es, kc, p["padded"], p["tiles"], p["blocks"])
                    if key in seen:
                        continue
                    seen.add(key)
                    name = f"{mode} B={cfg.B} H={cfg.H} {'tf32' if tf32 and p['mma'] else str(dtype)[6:]} {what}"
                    out.append((name, gemm_kind(p["mma"], es), *key))
    return out


def sweep_gemms(limits: dict) -> List[tuple]:
    """One shape per loop over K (SWEEP_K), the operand of a batch tile per 8 blocks, where it fits a block."""
    out = []
    blocks = int(limits["sms"])
    for kind, R, bt in SWEEPS:
        mma, es = kind != "simt", 2 if kind == "mma-bf16" else 4
        if mma and not limits.get("mma"):
            continue
        unit = 128 if mma else 64
        for K in SWEEP_K:
            kc = -(-K // unit) * unit
            price = fastrnn._C._persist_gemm_price(K, R, bt, mma, es, kc, bool(limits.get("pad", True)))
            if price["fits"] and price["smem"] <= limits["smem"]:
                out.append((f"sweep {kind} K={K}", kind, K, R, bt, mma, es, kc, bool(limits.get("pad", True)),
                            max(blocks // 8, 1), blocks))
    return out


def measure(probe: Probe, limits: dict, quick: bool = False) -> List[Sample]:
    """Every measurement, in the order the report lists them; ``quick``: fewer steps per launch, for a test."""
    sms, cluster = int(limits["sms"]), int(limits.get("cluster", 0))
    b_iters, g_iters = (50, 5) if quick else (BARRIER_ITERS, GEMM_ITERS)
    out = [_sample(probe, "barrier", "block barrier, one block", "block", 1, b_iters),
           _sample(probe, "barrier", f"block barrier, {sms} blocks", "block", sms, b_iters)]
    if limits.get("cooperative", True):
        for n in sorted({sms, max(sms // 2, 1), min(16, sms)}, reverse=True):
            out.append(_sample(probe, "barrier", f"grid barrier, {n} blocks", "grid", n, b_iters))
    # the GPCs may hold fewer clusters than the SMs allow (more would take the grid barrier, as the engine's launch
    # does): each size as many clusters as the GPU holds at once, and as one cluster alone
    at_once = limits.get("clusters_at_once", {})
    for size in (2, 4, 8):
        most = at_once.get(size, sms // size) * size
        for n in sorted({most, size} - {0} if size <= cluster else (), reverse=True):
            out.append(_sample(probe, "barrier", f"cluster barrier of {size}, {n} blocks", "cluster", n, b_iters,
                               cluster=size))
    for name, kind, K, R, bt, mma, es, kc, pad, tiles, blocks in plan_gemms(limits) + sweep_gemms(limits):
        unit = 128 if mma else 64
        for chunk in sorted({kc, unit}, reverse=True):
            if chunk > K and chunk != kc:
                continue
            for exchange in (False, True) if chunk >= K else (False,):
                how = ", exchanged" if exchange else ""
                out.append(_sample(probe, kind, f"{name} ({K} x {R}, {bt} rows, kc {chunk}{how})", "block",
                                   min(blocks, sms), g_iters, K=K, R=R, bt=bt, mma=mma, es=es, kc=chunk, pad=pad,
                                   rows=min(tiles, blocks), exchange=exchange))
    return out


@dataclass
class Fit:
    coef: Sequence[float]  # per unit (SIMT) or mma round, per chunk staged, per GEMM call
    worst: float  # largest |residual| / measured over the samples fitted
    n: int
    exchange: Optional[float] = None  # per exchanged chunk, where samples had one


def _fit(samples: List[Sample], x_of: Callable[[Sample], float], base: float) -> Optional[Fit]:
    """Least squares of cycles - base on (x, chunks, 1), and exchanged where a sample has it; None where the samples
    do not identify the terms."""
    exchange = any(s.exchanged for s in samples)
    cols = [x_of, lambda s: s.chunks] + ([lambda s: s.exchanged] if exchange else []) + [lambda s: 1.0]
    if len(samples) <= len(cols):
        return None
    a = np.array([[col(s) for col in cols] for s in samples], dtype=float)
    y = np.array([s.cycles - base for s in samples])
    coef, _, rank, _ = np.linalg.lstsq(a, y, rcond=None)
    if rank < len(cols):
        return None
    resid = np.abs(a @ coef - y) / np.maximum(np.abs(y), 1e-9)
    c = [float(v) for v in coef]
    return Fit((c[0], c[1], c[-1]), float(resid.max()), len(samples), c[2] if exchange else None)


MMA_KINDS = ("mma-bf16", "mma-tf32")


def grid_barrier(samples: List[Sample], unit: float) -> Dict[str, float]:
    """The grid barrier's price in the model's unit from the barriers asked as grid ones (a cluster that did not fit
    ran at a barrier of its own blocks in global memory, as the engine's launches do then: not the grid's): a fixed
    part and one per member (each arrives with an atomic on one counter) where the sizes give a line that rises from
    above zero, else the barrier over the most blocks, flat (a price per member of 0, which the measured costs keep,
    so that a flat GPU is priced flat whatever persist.h says)."""
    grids = [s for s in samples if s.kind == "barrier" and s.scheme == "grid" and s.ran == "grid"]
    if not grids:
        return {}
    if len({s.blocks for s in grids}) >= 2:
        member, fixed = np.polyfit([s.blocks for s in grids], [s.cycles for s in grids], 1)
        if member > 0 and fixed > 0:
            return {"grid_sync": fixed / unit, "grid_sync_member": member / unit}
    return {"grid_sync": max(grids, key=lambda s: s.blocks).cycles / unit, "grid_sync_member": 0.0}


def fit(samples: List[Sample]) -> Dict[str, object]:
    """The fits and the constants they imply in the model's unit (one SIMT FMA of a thread, ``a`` cycles)."""
    block = next((s.cycles for s in samples if s.kind == "barrier" and s.scheme == "block" and s.blocks > 1), 0.0)
    out: Dict[str, object] = {"block_barrier": block,
                              "simt": _fit([s for s in samples if s.kind == "simt"], lambda s: s.units, block)}
    for kind in MMA_KINDS:
        out[kind] = _fit([s for s in samples if s.kind == kind], lambda s: s.steps, block)
    simt = out["simt"]
    if simt is None or simt.coef[0] <= 0:
        return out
    unit = simt.coef[0]
    implied = {"unit_cycles": unit, "stage": simt.coef[1] / unit, "unpriced": simt.coef[2] / unit}
    if simt.exchange is not None:
        implied["exchange"] = simt.exchange / unit
    implied.update(grid_barrier(samples, unit))
    clusters = [s for s in samples if s.kind == "barrier" and s.ran == "cluster"]
    if clusters:
        implied["cluster_sync"] = max(s.cycles for s in clusters) / unit
    for kind in MMA_KINDS:
        if out[kind] is not None:
            implied[kind] = out[kind].coef[0] / unit
            implied[f"{kind} stage"] = out[kind].coef[1] / unit
            if out[kind].exchange is not None:
                implied[f"{kind} exchange"] = out[kind].exchange / unit
    out["implied"] = implied
    return out


PLAN_KEYS = ("scheme", "units", "batch_tile", "mma", "chunks")


def measured_costs(implied: Dict[str, float]) -> Dict[str, int]:
    """The prices the fits imply, by persistent_plan's ``costs`` names (the tensor cores' from bf16's fit, else
    TF32's), rounded; those not measured or not positive once rounded left out (persist.h's stay), but for the grid
    barrier's price per member, whose 0 says it measured flat."""
    names = {"grid_sync": "grid_sync", "grid_sync_member": "grid_sync_member", "cluster_sync": "cluster_sync",
             "stage": "stage", "exchange": "exchange"}
    mma = "mma-bf16" if "mma-bf16" in implied else "mma-tf32"
    out = {name: implied[key] for name, key in names.items() if key in implied}
    if mma in implied:
        out["mma"] = implied[mma]
    rounded = {k: int(round(v)) for k, v in out.items()}
    return {k: v for k, v in rounded.items() if v > 0 or (k == "grid_sync_member" and v == 0)}


def plan_changes(limits: dict, costs: Dict[str, int]) -> List[tuple]:
    """(configuration, plan now, plan with ``costs``) of every standard configuration's layer (fp32 without TF32,
    bf16; plain cells, and the LSTM with fastrnn's own cells) whose plan the measured prices would change."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for cfg in STANDARD_CONFIGS:
            for mode, cells in [(m, False) for m in MODES] + [("LSTM", True)]:
                if cells and dtype != torch.float32:
                    continue
                lim = dict(limits, tf32=False)
                now, then = (cpp.persistent_plan(mode, cfg.B, cfg.H, dtype, cells=cells, limits=lim_c)
                             for lim_c in (lim, dict(lim, costs=costs)))
                if any(now[k] != then[k] for k in PLAN_KEYS):
                    name = f"{mode}{' cells' if cells else ''} B={cfg.B} H={cfg.H} {str(dtype)[6:]}"
                    out.append((name, now, then))
    return out


def _plan_text(p: dict) -> str:
    if p["scheme"] == "per-step":
        return "per-step"
    return (f"{p['scheme']}, {p['units']} units x {p['batch_tile']} rows{', mma' if p['mma'] else ''}, "
            f"chunks {p['chunks'][0]}/{p['chunks'][1]}")


def clock_ghz(samples: List[Sample]) -> Optional[float]:
    """The SM clock the run saw: each launch's cycles over its nanoseconds, both read in the kernel (median)."""
    rates = [s.cycles / s.ns for s in samples if s.ns > 0]
    return statistics.median(rates) if rates else None


def markdown(samples: List[Sample], fitted: Dict[str, object], model: dict, title: str,
             changes: Optional[List[tuple]] = None, at_once: Optional[Dict[int, int]] = None,
             measured: bool = True) -> str:
    lines = [f"# Persistent engine cost model on {title}", "",
             "`python benchmarks/persist_calibrate.py`: the engine's block GEMM and step barrier "
             "(`fastrnn._C._persist_probe`), one block per SM; per step, the median over blocks of `clock64` cycles "
             "and of `%globaltimer` µs. `units`: the model's price of the GEMM (csrc/persist.h `gemm_cycles`, bank "
             "conflicts included); `steps`: a thread's K steps (SIMT) or a warp's mma rounds.", ""]
    ghz = clock_ghz(samples)
    if ghz:
        lines += [f"SM clock seen: {ghz:.2f} GHz.", ""]
    if at_once:
        held = ", ".join(f"{n} of {size}" for size, n in sorted(at_once.items()))
        source = ("`cudaOccupancyMaxActiveClusters`" if measured else
                  "the runtime did not say, so SMs ÷ size, where the launch's own check decides")
        lines += [f"Thread-block clusters the GPU holds at once, a block per SM ({source}; the plans take these): "
                  f"{held}.", ""]
    lines += ["| measurement | kind | scheme ran | blocks | cycles / step | µs / step | units | steps | chunks | "
              "exchanged |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in samples:
        gemm = s.kind != "barrier"
        lines.append(f"| {s.label} | {s.kind} | {s.ran} | {s.blocks} | {s.cycles:.0f} | {s.ns / 1e3:.3g} | "
                     f"{s.units if gemm else ''} | {s.steps if gemm else ''} | {s.chunks if gemm else ''} | "
                     f"{s.exchanged if gemm else ''} |")
    lines.append("")
    for name, what in (("simt", "units"), *((k, "mma rounds") for k in MMA_KINDS)):
        f = fitted.get(name)
        n = sum(s.kind == name for s in samples)
        if f is None:
            if n:
                lines.append(f"- {name}: {n} GEMMs do not identify cycles = x {what} + y chunks (+ e exchanged) + z "
                             "(more samples than terms and distinct chunk counts needed): no fit")
            continue
        a, b, c = f.coef
        flag = "" if a > 0 and b > 0 else " (a non-positive slope: the model does not describe these)"
        kept = "" if f.exchange is None else f"{f.exchange:.3g} x exchanged + "
        lines.append(f"- {name} fit over {f.n} GEMMs (block barrier subtracted): cycles = {a:.3g} x {what} + "
                     f"{b:.3g} x chunks + {kept}{c:.3g}; worst residual {f.worst:.0%}{flag}")
    implied = fitted.get("implied")
    if implied:
        lines += ["", f"Constants in the model's unit ({implied['unit_cycles']:.3g} cycles), against csrc/persist.h:", "",
                  "| constant | persist.h | measured |", "| --- | --- | --- |"]
        rows = [("grid_sync", "kGridSyncCycles", model["grid_sync"]),
                ("grid_sync_member", "kGridSyncMemberCycles", model["grid_sync_member"]),
                ("cluster_sync", "kClusterSyncCycles", model["cluster_sync"]),
                ("stage", "kStageCycles", model["stage"]),
                ("mma-bf16 stage", "kStageCycles, tensor cores (bf16)", model["stage"]),
                ("mma-tf32 stage", "kStageCycles, tensor cores (TF32)", model["stage"]),
                ("exchange", "kExchangeCycles", model["exchange"]),
                ("mma-bf16 exchange", "kExchangeCycles, tensor cores (bf16)", model["exchange"]),
                ("mma-tf32 exchange", "kExchangeCycles, tensor cores (TF32)", model["exchange"]),
                ("mma-bf16", "kMmaCycles (bf16)", model["mma"]), ("mma-tf32", "kMmaCycles (TF32)", model["mma"]),
                ("unpriced", "per GEMM call, unpriced (spill, reduction, results)", 0)]
        lines += [f"| {name} | {const} | {implied[key]:.0f} |" for key, name, const in rows if key in implied]
    else:
        lines += ["", "No SIMT fit with a positive slope: the model's unit is unknown, no constants implied."]
    if changes is not None:
        lines += ["", "Plans of the standard configurations that the measured prices would change "
                  "(`persistent_plan(..., limits={..., \"costs\": ...})`, fp32 without TF32 and bf16):", ""]
        lines += ["| layer | plan with persist.h's prices | with the measured ones |", "| --- | --- | --- |"]
        lines += [f"| {name} | {_plan_text(now)} | {_plan_text(then)} |" for name, now, then in changes]
        if not changes:
            lines.append("| none | | |")
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
    device = torch.device("cuda", args.device)
    samples = measure(gpu_probe(args.device), limits, quick=args.quick)
    model = dict(fastrnn._C._persist_gemm_price(64, 1, 1)["model"])
    fitted = fit(samples)
    changes = plan_changes(limits, measured_costs(fitted["implied"])) if fitted.get("implied") else None
    text = markdown(samples, fitted, model,
                    f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, {limits['sms']} SMs)", changes,
                    limits.get("clusters_at_once"), limits.get("clusters_measured", True))
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
