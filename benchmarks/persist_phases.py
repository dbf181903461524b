"""Where the persistent CUDA engine's time goes, phase by phase, on the GPU at hand.

Runs each standard configuration (``rnnbench.cases.STANDARD_CONFIGS``) and cell through fastrnn's modules on CUDA
with the persistent engine on (``FASTRNN_PERSISTENT=1``), forward and backward, once to warm up and once with the
engine's phase clocks on (``fastrnn._C._persist_clocks``; then the LayerNorm LSTM at the first configuration). In
a timed launch thread 0 of each block reads its SM's clock after W_hh's load, after each phase of a step and after
the barrier that follows it: a phase's cycles are the block's own work (its block barriers inside included), a
barrier's the wait for the slowest thread of the block and, at a step barrier, for the other blocks. Per launch
it reports each phase's and barrier's cycles per step (the mean over blocks, and the slowest block's), W_hh's load
(once per launch), the launch's cycles and microseconds per step and the SM clock it ran at. A backward launch's
dh GEMM after its last step (the initial state's gradient) counts with its phase: one GEMM more than its steps.

    python benchmarks/persist_phases.py --out benchmarks/results/gpu/phases.md
"""

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rnnbench.cases import STANDARD_CONFIGS, Config  # noqa: E402
from rnnbench.report import publish  # noqa: E402

import fastrnn  # noqa: E402

# persist.h's ClockSlot, as the extension has it: W_hh's load, phase ph at phase + 2 ph and the barrier after it at
# barrier + 2 ph, the launch's cycles and nanoseconds
SLOTS = dict(fastrnn._C._PERSIST_CLOCK_SLOTS) if fastrnn._C is not None else {}
# the block programs' phases and the barrier after each (persist.h: FwdProgram, BwdProgram, ExtFwdProgram,
# ExtBwdProgram)
PHASES = {
    "fwd": (("GEMM + cell", "step barrier"),),
    "bwd": (("dh GEMM + cell backward", "step barrier"),),
    "ext_fwd": (("GEMM", "step barrier"), ("rows", "step barrier")),
    "ext_bwd": (("rows backward", "step barrier"), ("dh GEMM", "step barrier")),
}
CELLS = {"LSTM": ("LSTM", {}), "GRU": ("GRU", {}), "RNN_TANH": ("RNN", {"nonlinearity": "tanh"})}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def summarize(record: dict) -> dict:
    """One timed launch (a ``_persist_clocks`` record): per phase and barrier the mean and the slowest block's
    cycles per step, W_hh's load, the launch's cycles and microseconds per step, its SM clock in GHz."""
    clocks = record["clocks"].cpu().double()
    steps = max(int(record["T"]), 1)
    per_step = clocks / steps
    parts = []
    for ph, (phase, barrier) in enumerate(PHASES[record["launch"]]):
        for name, slot in ((phase, SLOTS["phase"]), (barrier, SLOTS["barrier"])):
            col = per_step[:, slot + 2 * ph]
            parts.append((name, float(col.mean()), float(col.max())))
    launch_cycles, launch_ns = float(clocks[:, SLOTS["launch"]].mean()), float(clocks[:, SLOTS["ns"]].mean())
    return {
        "launch": record["launch"], "mode": record["mode"], "T": steps, "plan": dict(record["plan"]),
        "parts": parts, "load": float(clocks[:, SLOTS["load"]].mean()),
        "cycles_per_step": launch_cycles / steps, "us_per_step": launch_ns / steps / 1000,
        "ghz": launch_cycles / launch_ns if launch_ns > 0 else float("nan"),
    }


def timed_records(cell: str, cfg: Config, dtype: torch.dtype, device: torch.device, **kw) -> List[dict]:
    """The persistent launches of one forward and backward of a fresh module, timed (after an untimed warm-up);
    the engine runs where FASTRNN_PERSISTENT=1 (main sets it)."""
    name, extra = CELLS[cell]
    torch.manual_seed(0)
    module = getattr(fastrnn, name)(cfg.I, cfg.H, num_layers=cfg.L, **extra, **kw).to(device=device, dtype=dtype)
    x = torch.randn(cfg.T, cfg.B, cfg.I, device=device, dtype=dtype)

    def call():
        module(x)[0].float().sum().backward()

    call()
    torch.cuda.synchronize(device)
    fastrnn._C._persist_clocks(True)
    try:
        call()
        torch.cuda.synchronize(device)
    finally:
        records = fastrnn._C._persist_clocks(False)
    return list(records)


def markdown(rows: List[dict], title: str) -> str:
    out = [f"# The persistent engine's phases: {title}", "", "```", "python benchmarks/persist_phases.py", "```", "",
           "Cycles per step of each phase and of the barrier after it, thread 0 of each block reading its SM's "
           "clock: the mean over the launch's blocks, and the slowest block's in brackets. `load`: W_hh's slice into "
           "shared memory, once per launch. The launch's cycles and microseconds per step include it.", "",
           "| config | cell | dtype | launch | plan (as it ran) | per step | load | phases (cycles per step) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s, p = r["summary"], r["summary"]["plan"]
        plan = f"{p['scheme']}, {p['blocks']} blocks of {p['units']} units x {p['batch_tile']} rows" + (
            ", mma" if p["mma"] else "")
        parts = "; ".join(f"{name} {mean:,.0f} ({worst:,.0f})" for name, mean, worst in s["parts"])
        out.append(f"| {r['config']} | {r['cell']} | {r['dtype']} | {s['launch']} layer {r.get('layer', 0)} | "
                   f"{plan} | {s['cycles_per_step']:,.0f} cycles, {s['us_per_step']:.2f} us ({s['ghz']:.2f} GHz) | "
                   f"{s['load']:,.0f} | {parts} |")
    if not rows:
        out.append("| (no persistent launch: every call took another path) | | | | | | | |")
    return "\n".join(out) + "\n"


def measure(device: torch.device, configs: Sequence[Config], cells: Sequence[str],
            dtypes: Sequence[str]) -> List[dict]:
    rows = []
    cases = [(cfg, cell, dt, {}) for cfg in configs for cell in cells for dt in dtypes]
    cases.append((configs[0], "LSTM", "fp32", {"layer_norm": True}))
    for cfg, cell, dt, kw in cases:
        label = cell + (" (LayerNorm)" if kw else "")
        for record, layer in zip_layers(timed_records(cell, cfg, DTYPES[dt], device, **kw), cfg.L):
            rows.append({"config": cfg.label, "cell": label, "dtype": dt, "layer": layer, "summary": summarize(record)})
    return rows


def zip_layers(records: List[dict], layers: int) -> List[tuple]:
    """Each record with its layer: a forward launches layer 0 first, a backward the last layer first (one launch
    per layer, both directions of a bidirectional one in it)."""
    seen: Dict[str, int] = {}
    out = []
    for r in records:
        k = seen.get(r["launch"], 0)
        seen[r["launch"]] = k + 1
        out.append((r, layers - 1 - k if r["launch"].endswith("bwd") else k))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", type=int, default=0, help="CUDA device index")
    ap.add_argument("--out", help="write the markdown here as well")
    ap.add_argument("--config", type=Config.parse, action="append", help="T,B,I,H,L (default: the standard five)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("persist_phases: no CUDA GPU visible to torch: nothing measured", file=sys.stderr)
        return 2
    device = torch.device("cuda", args.device)
    os.environ["FASTRNN_PERSISTENT"] = "1"
    rows = measure(device, args.config or STANDARD_CONFIGS, tuple(CELLS), tuple(DTYPES))
    publish(markdown(rows, f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
