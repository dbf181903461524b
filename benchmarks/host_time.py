"""Host time per recurrent step of fastrnn's CUDA calls: what the CPU spends on a call (Python, dispatch,
allocations, launches), per sequential step, beside the GPU's time for the same call.

Each call is timed on the host (``perf_counter``) from its start to its return while the GPU is held busy (a
``torch.cuda._sleep`` queued first, longer than the host time of the calls after compiling and capturing), so that
the GPU runs none of the call's work before the host has queued all of it: the GPU's time (CUDA events from after
the sleep to after the call) then has no gaps waiting for the host, and a call that returns only after its GPU work
began (it waited for the GPU, or filled the launch queue) is marked. Steps: T per layer and direction, twice with
the backward (as ``bench_rnn.py``'s µs/step); gradients are cleared before each call, outside its time.
Implementations: torch.nn (cuDNN), the ``cpp`` backend (its persistent engine where ``FASTRNN_PERSISTENT=1`` is
set), and the Triton backend's variants: ``persist`` (one launch per layer and direction), ``step`` with its
launches replayed from a CUDA graph, and ``step`` launched from Python. A variant that does not take a shape says
why (its ValueError); any other failure is printed with its traceback and makes the exit status 1.

    python benchmarks/host_time.py --out benchmarks/results/gpu/host-time.md
"""

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
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


# The GPU's clock at most, cycles per second: a sleep of n cycles lasts at least n / SLEEP_HZ seconds.
SLEEP_HZ = 2.5e9


# calls that say nothing of a call's host time: the first compiles the Triton kernels (seconds: 14 s for one
# backward), the second captures a CUDA graph
UNREPRESENTATIVE = 2


def sleep_seconds(host_s: List[float]) -> float:
    """The GPU's hold before the next call: twice the longest host time of the calls so far after the
    unrepresentative ones (seconds), and a millisecond; sizing it from a compile would sleep seconds before each
    call."""
    return 2 * max(host_s[UNREPRESENTATIVE:], default=0.0) + 1e-3


def time_calls(call: Callable[[], None], reset: Callable[[], None], calls: int, warmup: int) -> Tuple[float, float, bool]:
    """Median host µs and GPU µs per call, and whether any timed call returned after the GPU had started on it
    (see the module's doc); ``reset`` runs before each call, untimed."""
    host, gpu, waited, seen = [], [], False, []
    for i in range(warmup + calls):
        reset()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(sleep_seconds(seen) * SLEEP_HZ))
        start.record()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        began = start.query()
        end.record()
        end.synchronize()
        seen.append(t1 - t0)
        if i >= warmup:
            host.append((t1 - t0) * 1e6)
            gpu.append(start.elapsed_time(end) * 1e3)
            waited = waited or began
    return statistics.median(host), statistics.median(gpu), waited


def measure(row: Row, device: torch.device, calls: int, warmup: int) -> Row:
    """``row`` timed; a variant that does not take its shape (ValueError) leaves a note; anything else raises."""
    try:
        m = build(row.impl, row.cell, row.cfg, device)
    except ValueError as e:
        row.note = f"not run: {e}"
        return row
    x = torch.randn(row.cfg.T, row.cfg.B, row.cfg.I, device=device, requires_grad=row.mode == "fwd+bwd")
    grad = torch.randn(row.cfg.T, row.cfg.B, row.cfg.H, device=device)

    def call():
        if row.mode == "fwd":
            with torch.no_grad():
                m(x)
        else:
            m(x)[0].backward(grad)

    def reset():
        x.grad = None
        m.zero_grad(set_to_none=True)

    try:
        row.host_us, row.gpu_us, waited = time_calls(call, reset, calls, warmup)
    except ValueError as e:
        row.note = f"not run: {e}"
        return row
    if waited:
        row.note = "returned after the GPU began its work (waited for it, or filled the launch queue)"
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
    ap.add_argument("--warmup", type=int, default=3, help="calls before timing, at least 3 (a CUDA graph captures on "
                    "the 2nd, the 3rd sizes the GPU's hold)")
    ap.add_argument("--out", help="write the markdown here as well")
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        ap.error(f"--impls: unknown {unknown}; known: {list(IMPLS)}")
    if args.warmup <= UNREPRESENTATIVE or args.calls < 1:
        ap.error(f"--warmup must be at least {UNREPRESENTATIVE + 1} (a CUDA graph captures on the 2nd call, the 3rd "
                 f"sizes the GPU's hold) and --calls at least 1, got {args.warmup} and {args.calls}")
    if not torch.cuda.is_available():
        print("host_time: no CUDA GPU visible to torch: nothing measured", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    rows, failed = [], 0
    for cfg in args.config or CONFIGS:
        for cell in args.cell or ("lstm", "gru"):
            for mode in MODES:
                for impl in impls:
                    row = Row(cfg, cell, mode, impl)
                    try:
                        measure(row, device, args.calls, args.warmup)
                    except Exception as e:  # noqa: BLE001 (printed whole; the rest run unless the device is lost)
                        failed += 1
                        traceback.print_exc()
                        row.note = f"failed: {type(e).__name__} (traceback on stderr)"
                        torch.cuda.synchronize()  # a sticky CUDA error raises here and ends the run
                    rows.append(row)
                    ran = f"{row.host_us / row.steps:.3g} µs/step" if row.host_us else row.note
                    print(f"host_time: {cell} {cfg.label} {mode} {impl}: {ran}", file=sys.stderr, flush=True)
    header = [f"# Host time per step on {torch.cuda.get_device_name(device)}", "",
              f"`python benchmarks/host_time.py {shlex.join(argv if argv is not None else sys.argv[1:])}`; torch "
              f"{torch.__version__}, Python {platform.python_version()}, FASTRNN_PERSISTENT="
              f"{os.environ.get('FASTRNN_PERSISTENT', '')}, TF32 off; median of {args.calls} calls after "
              f"{args.warmup}. " + __doc__.split("\n\n")[1].replace("\n", " ")]
    publish(markdown(rows, header), args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
