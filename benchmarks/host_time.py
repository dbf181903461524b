"""Host time per recurrent step of fastrnn's CUDA calls: what the CPU spends on a call (Python, dispatch,
allocations, launches), per sequential step, beside the GPU's time for the same call.

Each call starts after ``torch.cuda.synchronize()`` and is timed on the host from its start to its return
(``perf_counter``); CUDA work is asynchronous, so that is the host's own time unless the call waits for the GPU,
and then the host time reaches the GPU time (CUDA events around the same call): the note column says so where
the host took over 80 % of the GPU's time. Steps: T per layer and direction, twice with the backward (as
``bench_rnn.py``'s µs/step). Implementations: torch.nn (cuDNN), the ``cpp`` backend (its persistent engine where
``FASTRNN_PERSISTENT=1`` is set), and the Triton backend's variants: ``persist`` (one launch per layer and
direction), ``step`` with its launches replayed from a CUDA graph, and ``step`` launched from Python.

    python benchmarks/host_time.py --out benchmarks/results/gpu/host-time.md
"""

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rnnbench.cases import Config  # noqa: E402
from rnnbench.report import publish  # noqa: E402

import fastrnn  # noqa: E402

CONFIGS = (Config(512, 16, 128, 128, 1), Config(100, 1, 128, 512, 2), Config(100, 64, 256, 256, 1))
# implementation -> (backend, backend options); None: torch.nn itself
IMPLS: Dict[str, Optional[Tuple[str, dict]]] = {
    "torch.nn": None,
    "fastrnn-cpp": ("cpp", {}),
    "triton-persist": ("triton", {"variant": "persist"}),
    "triton-step-graph": ("triton", {"variant": "step", "cuda_graph": True}),
    "triton-step": ("triton", {"variant": "step", "cuda_graph": False}),
}
MODES = ("fwd", "fwd+bwd")
WAITED = 0.8  # host time over GPU time above which the call waited for the GPU


@dataclass
class Row:
    cfg: Config
    cell: str
    mode: str
    impl: str
    host_us: float = 0.0  # per call, median
    gpu_us: float = 0.0
    note: str = ""

    @property
    def steps(self) -> int:
        return self.cfg.T * self.cfg.L * (2 if self.mode == "fwd+bwd" else 1)


def build(impl: str, cell: str, cfg: Config, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    ref = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](cfg.I, cfg.H, num_layers=cfg.L).to(device)
    spec = IMPLS[impl]
    if spec is None:
        return ref
    backend, options = spec
    cls = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[cell]
    return cls.from_torch(ref, backend=backend, backend_options={backend: options} if options else None)


def time_calls(call: Callable[[], None], calls: int, warmup: int) -> Tuple[float, float]:
    """Median host µs and GPU µs (CUDA events) per call, each call from an idle device."""
    host, gpu = [], []
    for i in range(warmup + calls):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        if i >= warmup:
            host.append((t1 - t0) * 1e6)
            gpu.append(start.elapsed_time(end) * 1e3)
    return statistics.median(host), statistics.median(gpu)


def measure(row: Row, device: torch.device, calls: int, warmup: int) -> Row:
    try:
        m = build(row.impl, row.cell, row.cfg, device)
        x = torch.randn(row.cfg.T, row.cfg.B, row.cfg.I, device=device, requires_grad=row.mode == "fwd+bwd")
        if row.mode == "fwd":
            def call():
                with torch.no_grad():
                    m(x)
        else:
            grad = torch.randn(row.cfg.T, row.cfg.B, row.cfg.H, device=device)

            def call():
                m(x)[0].backward(grad)
        row.host_us, row.gpu_us = time_calls(call, calls, warmup)
    except Exception as e:  # noqa: BLE001 (a variant that does not run this shape, or fails, says why; the rest run)
        row.note = f"not run: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        return row
    if row.gpu_us > 0 and row.host_us > WAITED * row.gpu_us:
        row.note = "the call waited for the GPU: its host time is at most this"
    return row


def markdown(rows: List[Row], header: Sequence[str]) -> str:
    lines = [*header, "",
             "| cell | T,B,I,H,L | mode | impl | host µs/step | GPU µs/step | host µs/call | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ran = r.host_us > 0
        lines.append(f"| {r.cell} | {r.cfg.label} | {r.mode} | {r.impl} | "
                     f"{f'{r.host_us / r.steps:.3g}' if ran else ''} | {f'{r.gpu_us / r.steps:.3g}' if ran else ''} | "
                     f"{f'{r.host_us:.4g}' if ran else ''} | {r.note} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", type=Config.parse, help="T,B,I,H,L (repeatable; default: three)")
    ap.add_argument("--cell", action="append", choices=("lstm", "gru"), help="default: both")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, of " + ", ".join(IMPLS))
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="calls before timing (a CUDA graph captures on the 2nd)")
    ap.add_argument("--out", help="write the markdown here as well")
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        ap.error(f"--impls: unknown {unknown}; known: {list(IMPLS)}")
    if not torch.cuda.is_available():
        print("host_time: no CUDA GPU visible to torch: nothing measured", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    rows = [measure(Row(cfg, cell, mode, impl), device, args.calls, args.warmup)
            for cfg in args.config or CONFIGS for cell in args.cell or ("lstm", "gru")
            for mode in MODES for impl in impls]
    header = [f"# Host time per step on {torch.cuda.get_device_name(device)}", "",
              f"`python benchmarks/host_time.py {shlex.join(argv if argv is not None else sys.argv[1:])}`; torch "
              f"{torch.__version__}, Python {platform.python_version()}, FASTRNN_PERSISTENT="
              f"{os.environ.get('FASTRNN_PERSISTENT', '')}, TF32 off; median of {args.calls} calls after "
              f"{args.warmup}, each from an idle device. " + __doc__.split("\n\n")[1].replace("\n", " ")]
    publish(markdown(rows, header), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
