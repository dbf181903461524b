"""Throughput of fastrnn's backends against torch.nn, an eager cell loop and that loop under torch.compile.

``python benchmarks/bench_rnn.py --quick`` writes ``results.csv``, ``results.md`` and ``results.png`` to
``--out``; benchmarks/README.md says what is measured and how to read the output.
"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import gc
import itertools
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from a checkout without installing fastrnn

with warnings.catch_warnings():
    # the missing-extension warning is reported per implementation in the table instead
    warnings.simplefilter("ignore", RuntimeWarning)
    import fastrnn  # noqa: E402
    from fastrnn import _ext  # noqa: E402
    from fastrnn import backend as fr_backend  # noqa: E402

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
TORCH_MODE = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}
MODES = ("fwd", "fwd+bwd")
MODE_TITLE = {"fwd": "forward (no_grad)", "fwd+bwd": "forward + backward"}
BASELINE = "torch.nn"
FASTRNN_IMPLS = {"fastrnn-cpp": "cpp", "fastrnn-triton": "triton", "fastrnn-reference": "reference"}
IMPLS = tuple(FASTRNN_IMPLS) + (BASELINE, "loop-eager", "loop-compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest normalised difference (max |a-b| / max |ref|, per tensor) that still counts as a match.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
TF32_TOLERANCE = 1e-2
# Beyond the tolerance, a result still counts as a match when its distance from a float64 computation is
# within the tolerance or at most this multiple of torch.nn's own distance from it.
ILL_CONDITIONED_FACTOR = 2.0
QUICK_REFERENCE_MAX_FLOPS = 20e9
QUICK_COMPILE_MAX_STEPS = 100
QUICK_COMPILE_MAX_FLOPS = 10e9

CSV_FIELDS = (
    "cell", "T", "B", "I", "H", "L", "bidirectional", "packed", "dtype", "device", "mode", "impl",
    "status", "note", "tokens", "repeats", "calls_per_repeat",
    "time_median_s", "time_q1_s", "time_q3_s", "time_min_s", "time_max_s",
    "tokens_per_s", "tokens_per_s_q1", "tokens_per_s_q3",
    "ratio_vs_torch_nn", "ratio_ci_lo", "ratio_ci_hi", "ratio_q1", "ratio_q3",
    "compile_s", "peak_mem_bytes", "max_err", "round_times_s", "round_ratios",
)  # fmt: skip
CI_LEVEL = 0.95


@dataclass(frozen=True)
class Config:
    T: int
    B: int
    I: int
    H: int
    L: int

    @classmethod
    def parse(cls, text: str) -> "Config":
        parts = text.replace(" ", "").split(",")
        if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"--config wants five positive integers T,B,I,H,L, got {text!r}")
        return cls(*map(int, parts))

    @property
    def label(self) -> str:
        return f"{self.T},{self.B},{self.I},{self.H},{self.L}"


STANDARD_CONFIGS = (
    Config(100, 64, 256, 256, 1),
    Config(100, 64, 256, 1024, 1),
    Config(100, 1, 128, 512, 2),
    Config(512, 16, 128, 128, 1),
    Config(100, 64, 512, 512, 1),  # PyTorch's benchmarks/fastrnns default
)


def _cell(mode: str, xp: Tensor, h: Tensor, c: Optional[Tensor], w_hh_t: Tensor, b_hh: Tensor):
    """One step; ``xp`` already holds the input projection with every bias that can be folded into it."""
    if mode == "GRU":
        # b_hn sits inside r * (W_hn h + b_hn), so GRU keeps b_hh on the recurrent side
        hp = torch.addmm(b_hh, h, w_hh_t)
        xr, xz, xn = xp.chunk(3, 1)
        hr, hz, hn = hp.chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(torch.addcmul(xn, r, hn))
        return n + z * (h - n), None
    pre = torch.addmm(xp, h, w_hh_t)
    if mode == "LSTM":
        i, f, g, o = pre.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _loop_direction(mode, steps: Sequence[Tensor], h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hh, reverse):
    """Runs the cell over ``steps`` (rows active at each step; packed batches shrink over time).

    Rows leaving the batch (forward direction) are stashed as their final state; rows joining it (reverse
    direction) start from ``h0``, which is how torch.nn treats packed sequences.
    """
    seq = steps[::-1] if reverse else steps
    w_hh_t = w_hh.t()
    n = seq[0].shape[0]
    h, c = h0[:n], (None if c0 is None else c0[:n])
    gone_h: List[Tensor] = []
    gone_c: List[Tensor] = []
    outs = []
    for xp in seq:
        bs = xp.shape[0]
        if bs < h.shape[0]:
            gone_h.append(h[bs:])
            h = h[:bs]
            if c is not None:
                gone_c.append(c[bs:])
                c = c[:bs]
        elif bs > h.shape[0]:
            h = torch.cat([h, h0[h.shape[0] : bs]])
            if c is not None:
                c = torch.cat([c, c0[c.shape[0] : bs]])
        h, c = _cell(mode, xp, h, c, w_hh_t, b_hh)
        outs.append(h)
    if reverse:
        outs.reverse()
    h_n = torch.cat([h] + gone_h[::-1])
    c_n = None if c is None else torch.cat([c] + gone_c[::-1])
    return torch.cat(outs), h_n, c_n


def loop_forward(
    mode: str,
    rows: Tensor,
    batch_sizes: Tuple[int, ...],
    packed: bool,
    params: List[Tensor],
    num_layers: int,
    num_dir: int,
):
    """Multi-layer (bi)directional RNN over time-major rows; returns (rows, h_n, c_n) like torch.nn.

    The input projection of a whole layer is one GEMM; ``unbind`` (or ``split`` for packed rows) then
    hands out the steps, because indexing ``xp[t]`` would give backward one full-size gradient buffer per
    step, quadratic in T.
    """
    B = batch_sizes[0]
    H = params[1].shape[1]
    h0 = rows.new_zeros(B, H)
    c0 = h0 if mode == "LSTM" else None
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(num_dir):
            w_ih, w_hh, b_ih, b_hh = params[4 * (layer * num_dir + d) : 4 * (layer * num_dir + d) + 4]
            xp = F.linear(rows, w_ih, b_ih if mode == "GRU" else b_ih + b_hh)
            steps = xp.split(list(batch_sizes)) if packed else xp.view(len(batch_sizes), B, -1).unbind(0)
            y, h, c = _loop_direction(mode, steps, h0, c0, w_hh, b_hh, d == 1)
            outs.append(y)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        rows = outs[0] if num_dir == 1 else torch.cat(outs, 1)
    return rows, torch.stack(h_n), (torch.stack(c_n) if c_n else None)


@dataclass
class Case:
    cell: str
    cfg: Config
    bidirectional: bool
    packed: bool
    device: torch.device
    dtype: torch.dtype
    module: nn.RNNBase
    inp: object  # Tensor [T, B, I] or PackedSequence, a leaf that requires grad
    leaf: Tensor
    grad_out: Tensor
    tokens: int

    @property
    def params(self) -> List[Tensor]:
        return list(self.module._flat_weights)


def build_case(cell, cfg: Config, bidirectional, packed, device, dtype, seed) -> Case:
    # crc32 rather than hash(): the same case gets the same weights in every run and process
    torch.manual_seed(seed + zlib.crc32(f"{cell}/{cfg.label}/{bidirectional}/{packed}".encode()))
    kwargs = dict(num_layers=cfg.L, bidirectional=bidirectional)
    if cell == "lstm":
        module = nn.LSTM(cfg.I, cfg.H, **kwargs)
    elif cell == "gru":
        module = nn.GRU(cfg.I, cfg.H, **kwargs)
    else:
        module = nn.RNN(cfg.I, cfg.H, nonlinearity=cell.split("_")[1], **kwargs)
    module = module.to(device, dtype)
    x = torch.randn(cfg.T, cfg.B, cfg.I, device=device, dtype=dtype)
    if packed:
        lengths = torch.randint(max(1, cfg.T // 2), cfg.T + 1, (cfg.B,))
        lengths[torch.randint(cfg.B, ())] = cfg.T
        template = pack_padded_sequence(x, lengths, enforce_sorted=False)
        leaf = template.data.detach().requires_grad_()
        inp = PackedSequence(leaf, template.batch_sizes, template.sorted_indices, template.unsorted_indices)
        tokens = int(lengths.sum())
    else:
        leaf = inp = x.requires_grad_()
        tokens = cfg.T * cfg.B
    grad_out = torch.randn(tokens, cfg.H * (2 if bidirectional else 1), device=device, dtype=dtype)
    return Case(cell, cfg, bidirectional, packed, device, dtype, module, inp, leaf, grad_out, tokens)


Outputs = Tuple[Tensor, Tensor, Optional[Tensor]]


def _module_runner(module: nn.Module, case: Case) -> Callable[[], Outputs]:
    def run() -> Outputs:
        out, hidden = module(case.inp)
        rows = out.data if case.packed else out.reshape(-1, out.shape[-1])
        h, c = hidden if isinstance(hidden, tuple) else (hidden, None)
        return rows, h, c

    return run


def _loop_runner(case: Case, compiled: bool) -> Callable[[], Outputs]:
    if case.packed:
        rows, batch_sizes = case.inp.data, tuple(int(b) for b in case.inp.batch_sizes)
        unsort = case.inp.unsorted_indices
    else:
        rows, batch_sizes, unsort = case.leaf.reshape(-1, case.cfg.I), (case.cfg.B,) * case.cfg.T, None
    fn = torch.compile(loop_forward, dynamic=False) if compiled else loop_forward
    mode, num_dir = TORCH_MODE[case.cell], (2 if case.bidirectional else 1)

    def run() -> Outputs:
        y, h, c = fn(mode, rows, batch_sizes, case.packed, case.params, case.cfg.L, num_dir)
        if unsort is not None:
            h = h.index_select(1, unsort)
            c = None if c is None else c.index_select(1, unsort)
        return y, h, c

    return run


def make_runner(impl: str, case: Case) -> Callable[[], Outputs]:
    if impl == BASELINE:
        return _module_runner(case.module, case)
    if impl in FASTRNN_IMPLS:
        cls = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}.get(case.cell, fastrnn.RNN)
        return _module_runner(cls.from_torch(case.module, backend=FASTRNN_IMPLS[impl]), case)
    if impl in ("loop-eager", "loop-compiled"):
        return _loop_runner(case, impl == "loop-compiled")
    raise ValueError(f"unknown implementation {impl!r}")


def make_step(run: Callable[[], Outputs], case: Case, mode: str) -> Callable[[], Outputs]:
    """The timed unit of work: a no_grad forward, or forward + backward from fresh gradients."""
    if mode == "fwd":

        def step() -> Outputs:
            with torch.no_grad():
                return run()

        return step
    params = case.params

    def step() -> Outputs:
        case.leaf.grad = None
        for p in params:
            p.grad = None
        out = run()
        out[0].backward(case.grad_out)
        return out

    return step


def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``impl`` cannot run here at all (None when it can); checked once per run."""
    if impl in FASTRNN_IMPLS:
        why = fr_backend.reason_unavailable(FASTRNN_IMPLS[impl], device, dtype)
        if why is None and impl == "fastrnn-triton" and device.type == "cpu":
            return "runs on CPU only under the Triton interpreter, whose speed means nothing"
        return why
    if impl == "loop-compiled" and not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    return None


def quick_skip(impl: str, cell: str, cfg: Config, bidirectional: bool, mode: str) -> Optional[str]:
    """Why ``--quick`` leaves ``impl`` out of a case, or None.

    Only the two slowest implementations stay out, each where it costs most: fastrnn-reference is an
    eager per-step loop like loop-eager, and torch.compile unrolls the whole sequence, so its compile
    time grows with the number of steps (on the 2-core dev machine 3-16 s for a 100-step forward, but
    120-150 s for GRU's, and 30-90 s for forward + backward).
    """
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    dirs = 2 if bidirectional else 1
    flops = 2 * cfg.T * cfg.B * gates * cfg.H * (cfg.I + cfg.H) * cfg.L * dirs
    if impl == "fastrnn-reference" and flops > QUICK_REFERENCE_MAX_FLOPS:
        return f"--quick: fastrnn-reference skipped above {QUICK_REFERENCE_MAX_FLOPS / 1e9:g} GFLOP per forward"
    if impl == "loop-compiled" and mode != "fwd":
        return "--quick: torch.compile skipped for forward + backward (compiling it takes minutes)"
    if impl == "loop-compiled" and cell == "gru":
        return "--quick: torch.compile skipped for GRU (its 100-step forward took over 2 minutes to compile)"
    if impl == "loop-compiled" and cfg.T * cfg.L * dirs > QUICK_COMPILE_MAX_STEPS:
        return f"--quick: torch.compile skipped above {QUICK_COMPILE_MAX_STEPS} unrolled steps"
    if impl == "loop-compiled" and flops > QUICK_COMPILE_MAX_FLOPS:
        return f"--quick: torch.compile skipped above {QUICK_COMPILE_MAX_FLOPS / 1e9:g} GFLOP per forward"
    return None


def max_err(got: Sequence[Optional[Tensor]], ref: Sequence[Optional[Tensor]]) -> float:
    worst = 0.0
    for a, b in zip(got, ref):
        if a is None or b is None:
            if (a is None) != (b is None):
                return math.inf
            continue
        if a.shape != b.shape:
            return math.inf
        a, b = a.detach().double(), b.detach().double()
        scale = max(b.abs().max().item(), 1e-3) if b.numel() else 1.0
        diff = (a - b).abs().max().item() if b.numel() else 0.0
        worst = max(worst, diff / scale if math.isfinite(diff) else math.inf)
    return worst


def results_of(step: Callable[[], Outputs], case: Case, mode: str) -> List[Optional[Tensor]]:
    """Outputs of one step plus, with backward, the gradients it left (what the sanity check compares)."""
    out = list(step())
    if mode == "fwd+bwd":
        out += [case.leaf.grad] + [p.grad for p in case.params]
    return [None if t is None else t.detach().clone() for t in out]


def float64_results(case: Case, mode: str) -> List[Optional[Tensor]]:
    """torch.nn's results for the same weights and inputs computed in float64."""
    leaf = case.leaf.detach().double().requires_grad_()
    inp = PackedSequence(leaf, *case.inp[1:]) if case.packed else leaf
    case64 = dataclasses.replace(
        case, module=copy.deepcopy(case.module).double(), inp=inp, leaf=leaf,
        grad_out=case.grad_out.double(), dtype=torch.float64,
    )  # fmt: skip
    return results_of(make_step(make_runner(BASELINE, case64), case64, mode), case64, mode)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(step: Callable[[], Outputs], calls: int, device: torch.device) -> float:
    """Seconds per call over ``calls`` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    gc.collect()
    gc.disable()  # a collection inside the timed loop would land on whichever implementation is running
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        return (time.perf_counter() - t0) / calls
    finally:
        gc.enable()


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Kineto writes start/stop lines straight to file descriptor 2 on every profile; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def calibrate(step: Callable[[], Outputs], min_time: float, device: torch.device) -> int:
    """Calls per timed repeat so that one repeat lasts about ``min_time``; one call is too coarse to time fast cases."""
    calls = 1
    while True:
        per_call = time_calls(step, calls, device)
        if per_call * calls >= min_time / 4 or calls >= 1000:
            return max(1, math.ceil(min_time / max(per_call, 1e-9)))
        calls *= 4


def peak_bytes(step: Callable[[], Outputs], device: torch.device) -> int:
    """Peak of the bytes allocated during one step above what was allocated before it.

    CUDA: the caching allocator's own counter. CPU: torch.profiler with profile_memory records every
    allocation and free of c10's CPU allocator (all ATen tensors, Inductor's buffers included); the running
    sum of those events in time order peaks at the answer.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def median_ci(xs: Sequence[float], level: float = CI_LEVEL) -> Tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics x(k) and x(n+1-k), with the
    largest k that still covers the median with probability ``level`` (the number of rounds below the
    median is Binomial(n, 1/2)). 6 rounds give min–max (97 %), 9 give 2nd–8th (96 %); under 6 no pair
    reaches 95 % and min–max is the best there is."""
    xs, n = sorted(xs), len(xs)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k]


def quartiles(xs: Sequence[float]) -> Tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Entry:
    impl: str
    status: str = "ok"
    note: str = ""
    step: Optional[Callable[[], Outputs]] = None
    calls: int = 1
    first_call_s: float = math.nan
    times: List[float] = field(default_factory=list)
    peak: Optional[int] = None
    err: Optional[float] = None


def _fail(entry: Entry, status: str, exc: BaseException) -> None:
    entry.status = status
    entry.note = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    entry.step = None
    entry.times = []


def new_entries(impls: Sequence[str], skipped: Dict[str, str]) -> List[Entry]:
    entries = [Entry(impl) for impl in impls]
    for e in entries:
        if e.impl in skipped:
            e.note = skipped[e.impl]
            e.status = "skipped" if e.note.startswith("--quick") else "unavailable"
    return entries


def _check_against_baseline(case: Case, mode: str, entries: List[Entry], opts) -> None:
    """First pass: build every step, time its first call, and check its results against torch.nn's."""
    tol = TF32_TOLERANCE if opts.tf32 and case.dtype == torch.float32 else TOLERANCE[case.dtype]
    ref: Optional[List[Optional[Tensor]]] = None
    ref64: Optional[List[Optional[Tensor]]] = None
    # the baseline first: every other implementation is checked against its results
    for entry in sorted(entries, key=lambda e: e.impl != BASELINE):
        if entry.status != "ok":
            continue
        try:
            entry.step = make_step(make_runner(entry.impl, case), case, mode)
            sync(case.device)
            t0 = time.perf_counter()
            got = results_of(entry.step, case, mode)
            sync(case.device)
            entry.first_call_s = time.perf_counter() - t0
        except Exception as exc:  # a backend that rejects this configuration is a result, not a crash
            _fail(entry, "error", exc)
            continue
        if entry.impl == BASELINE:
            ref = got
        elif ref is None:
            entry.note = "not checked against torch.nn, which did not run"
        else:
            entry.err = max_err(got, ref)
            if entry.err <= tol:
                continue
            if ref64 is None and case.dtype != torch.float64:
                ref64 = float64_results(case, mode)
            base_err64 = max_err(ref, ref64) if ref64 is not None else math.inf
            err64 = max_err(got, ref64) if ref64 is not None else math.inf
            # an ill-conditioned case (long relu chains through big layers) puts torch.nn's own result far
            # from the exact one; an implementation no further from float64 than twice that is not wrong
            if err64 <= max(tol, ILL_CONDITIONED_FACTOR * base_err64):
                entry.note = (
                    f"differs from torch.nn by {entry.err:.3g}, but ill-conditioned: vs float64 it is off by "
                    f"{err64:.3g} and torch.nn by {base_err64:.3g}"
                )
            else:
                entry.status, entry.step = "mismatch", None
                entry.note = f"differs from torch.nn by {entry.err:.3g} (max |diff| / max |ref|) > {tol:g}"
                if ref64 is not None:
                    entry.note += f"; vs float64 it is off by {err64:.3g}, torch.nn by {base_err64:.3g}"


def run_case(case: Case, mode: str, entries: List[Entry], opts, pass_index: int = 0) -> List[Entry]:
    """One pass over one case: times every runnable implementation for ``opts.repeats`` rounds, round-robin.

    Rounds add up in ``entries`` over the passes, and the steps stay built between passes, so a later
    pass times the very same calls. The first pass also checks results, warms up, calibrates how many
    calls a repeat makes and measures peak memory; the last one drops the steps.
    """
    if pass_index == 0:
        _check_against_baseline(case, mode, entries, opts)
        for e in (e for e in entries if e.step is not None):
            try:
                # the sanity-check call was the first warm-up; a first call that already lasted min_time
                # (compilation aside) needs no calibration, which saves a long call at the big configs
                for _ in range(max(0, opts.warmup - 1)):
                    e.step()
                slow = e.impl != "loop-compiled" and e.first_call_s >= opts.min_time
                e.calls = 1 if slow else calibrate(e.step, opts.min_time, case.device)
            except Exception as exc:
                _fail(e, "error", exc)
    live = [e for e in entries if e.step is not None]
    for r in range(pass_index * opts.repeats, (pass_index + 1) * opts.repeats) if live else ():
        # a rotating start keeps any position effect (cache state, turbo) from favouring one implementation
        for e in live[r % len(live) :] + live[: r % len(live)]:
            if e.step is None:
                continue
            try:
                e.times.append(time_calls(e.step, e.calls, case.device))
            except Exception as exc:
                _fail(e, "error", exc)
    if opts.memory and pass_index == 0:
        for e in (e for e in live if e.step is not None):
            e.peak = peak_bytes(e.step, case.device)
    if pass_index == opts.passes - 1:
        for e in entries:
            e.step = None  # drop closures (and compiled graphs) once the case is done
    return entries


def summarize(case: Case, mode: str, entries: List[Entry]) -> List[dict]:
    base = next((e for e in entries if e.impl == BASELINE and e.times), None)
    rows = []
    for e in entries:
        row = dict(
            cell=case.cell, T=case.cfg.T, B=case.cfg.B, I=case.cfg.I, H=case.cfg.H, L=case.cfg.L,
            bidirectional=int(case.bidirectional), packed=int(case.packed),
            dtype=str(case.dtype).replace("torch.", ""), device=case.device.type, mode=mode, impl=e.impl,
            status=e.status, note=e.note, tokens=case.tokens, repeats=len(e.times),
            calls_per_repeat=e.calls if e.times else "",
        )  # fmt: skip
        row.update({k: "" for k in CSV_FIELDS if k not in row})
        if e.err is not None:
            row["max_err"] = f"{e.err:.3g}"
        if e.times:
            q1, med, q3 = quartiles(e.times)
            row.update(
                time_median_s=f"{med:.6g}", time_q1_s=f"{q1:.6g}", time_q3_s=f"{q3:.6g}",
                time_min_s=f"{min(e.times):.6g}", time_max_s=f"{max(e.times):.6g}",
                tokens_per_s=f"{case.tokens / med:.6g}",
                tokens_per_s_q1=f"{case.tokens / q3:.6g}", tokens_per_s_q3=f"{case.tokens / q1:.6g}",
            )  # fmt: skip
            row["round_times_s"] = " ".join(f"{t:.6g}" for t in e.times)
            if e.impl == "loop-compiled":
                row["compile_s"] = f"{max(0.0, e.first_call_s - med):.3g}"
            if e.peak is not None:
                row["peak_mem_bytes"] = e.peak
            if base is not None:
                # per-round ratios: both sides of a ratio were timed seconds apart, under the same load
                ratios = [tb / ti for tb, ti in zip(base.times, e.times)]
                r1, rm, r3 = quartiles(ratios)
                lo, hi = median_ci(ratios)
                row.update(
                    ratio_vs_torch_nn=f"{rm:.4g}", ratio_ci_lo=f"{lo:.4g}", ratio_ci_hi=f"{hi:.4g}",
                    ratio_q1=f"{r1:.4g}", ratio_q3=f"{r3:.4g}", round_ratios=" ".join(f"{x:.4g}" for x in ratios),
                )  # fmt: skip
        rows.append(row)
    return rows


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info(device: torch.device) -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    usable = usable_cores()
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__})"
    try:
        git = subprocess.run(
            ["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    info = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "torch threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"oneDNN: {torch.backends.mkldnn.is_available()})",
        "triton": triton_version,
        "fastrnn": f"{fastrnn.__version__}, extension fastrnn._C {'loaded' if _ext._C is not None else 'missing'}",
        "git": git or "no commit yet",
        "device": "CPU",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        info["cuDNN"] = str(torch.backends.cudnn.version())
    return info


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def fmt_rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _summary_cell(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}¹" if row["status"] in ("skipped", "unavailable") else f"**{row['status'].upper()}**²"
    text = fmt_rate(float(row["tokens_per_s"]))
    if row["ratio_vs_torch_nn"] and row["impl"] != BASELINE:
        ratio, lo, hi = (float(row[k]) for k in ("ratio_vs_torch_nn", "ratio_ci_lo", "ratio_ci_hi"))
        text += f" ×{ratio:.2f} ({lo:.2f}–{hi:.2f})"
    return text


def case_key(row: dict) -> Tuple[str, ...]:
    return tuple(str(row[k]) for k in ("cell", "T", "B", "I", "H", "L"))


def write_markdown(
    path: str,
    rows: List[dict],
    info: Dict[str, str],
    settings: Dict[str, str],
    absent: Dict[str, str],
    impls: Sequence[str],
) -> None:
    shown = [i for i in impls if i not in absent]
    lines = ["# fastrnn recurrent-layer benchmark", ""]
    if settings.get("note"):
        lines += [f"> **{settings['note']}**", ""]
    lines += ["```", settings["command"], "```", "", "## Machine", ""]
    lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in settings.items() if k not in ("command", "note")]
    if absent:
        lines += ["", "Not run on this machine:"] + [f"- `{i}`: {why}" for i, why in absent.items()]
    lines += [
        "",
        "Each cell: median tokens/s (T·B per second; packed runs count real tokens) and, for every "
        "implementation but torch.nn, the median of the per-round ratio tokens/s ÷ torch.nn's tokens/s "
        f"(above 1: faster than torch.nn) with the {CI_LEVEL:.0%} confidence interval of that median.",
    ]
    by_case: Dict[Tuple, Dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault((row["mode"],) + case_key(row), {})[row["impl"]] = row
    for mode in MODES:
        keys = [k for k in by_case if k[0] == mode]
        if not keys:
            continue
        lines += ["", f"## {MODE_TITLE[mode]}", "", "| cell | T,B,I,H,L | " + " | ".join(shown) + " |"]
        lines.append("| --- | --- |" + " --- |" * len(shown))
        for key in keys:
            cells = [_summary_cell(by_case[key][i]) if i in by_case[key] else "" for i in shown]
            lines.append(f"| {key[1]} | {','.join(map(str, key[2:]))} | " + " | ".join(cells) + " |")
    notes = sorted({(r["impl"], r["status"], r["note"]) for r in rows if r["status"] != "ok"} - {
        (r["impl"], r["status"], r["note"]) for r in rows if r["impl"] in absent
    })
    if notes:
        lines += ["", "¹ ² Not timed:"] + [f"- `{i}` {s}: {n}" for i, s, n in notes]
    lines += [
        "",
        "## Details",
        "",
        "Times are per call; their spread is the interquartile range over rounds, the ratio's is the "
        f"{CI_LEVEL:.0%} confidence interval of its median. Peak memory: bytes allocated "
        "during one call above what was allocated before it. Compile time is the first call's time minus "
        "the median call time and is not part of the throughput. Implementations not run on this machine "
        "are left out.",
        "",
        "| cell | T,B,I,H,L | mode | impl | status | median ms | IQR ms | tokens/s | ratio (CI) | peak memory "
        "| compile s | calls × rounds | note |",
        "| --- " * 13 + "|",
    ]
    for r in (r for r in rows if r["impl"] not in absent):
        cfg = f"{r['T']},{r['B']},{r['I']},{r['H']},{r['L']}"
        if r["time_median_s"]:
            med = f"{float(r['time_median_s']) * 1e3:.4g}"
            iqr = f"{float(r['time_q1_s']) * 1e3:.4g}–{float(r['time_q3_s']) * 1e3:.4g}"
            rate = fmt_rate(float(r["tokens_per_s"]))
        else:
            med = iqr = rate = ""
        ratio = f"{r['ratio_vs_torch_nn']} ({r['ratio_ci_lo']}–{r['ratio_ci_hi']})" if r["ratio_vs_torch_nn"] else ""
        mem = fmt_bytes(int(r["peak_mem_bytes"])) if r["peak_mem_bytes"] != "" else ""
        runs = f"{r['calls_per_repeat']} × {r['repeats']}" if r["repeats"] else ""
        lines.append(
            f"| {r['cell']} | {cfg} | {r['mode']} | {r['impl']} | {r['status']} | {med} | {iqr} | {rate} | "
            f"{ratio} | {mem} | {r['compile_s']} | {runs} | {r['note']} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(path: str, rows: List[dict], impls: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_ratio = any(r["ratio_vs_torch_nn"] and r["impl"] != BASELINE for r in rows)
    metric = "ratio_vs_torch_nn" if has_ratio else "tokens_per_s"
    lo, hi = ("ratio_ci_lo", "ratio_ci_hi") if has_ratio else ("tokens_per_s_q1", "tokens_per_s_q3")
    plotted = [i for i in impls if not (has_ratio and i == BASELINE)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    by_key = {(r["mode"], r["impl"]) + case_key(r): r for r in rows}
    n_cases = len({case_key(r) for r in rows})
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8.0, 1.1 * n_cases + 2), 4.5 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(plotted))
    for ax, mode in zip(axes[:, 0], modes):
        cases = list(dict.fromkeys(case_key(r) for r in rows if r["mode"] == mode))
        for j, impl in enumerate(plotted):
            xs, ys, err = [], [], [[], []]
            for x, c in enumerate(cases):
                r = by_key.get((mode, impl) + c)
                if r is None or not r[metric]:
                    continue
                y = float(r[metric])
                xs.append(x + (j - (len(plotted) - 1) / 2) * width)
                ys.append(y)
                err[0].append(max(0.0, y - float(r[lo])))
                err[1].append(max(0.0, float(r[hi]) - y))
            if xs:
                ax.bar(xs, ys, width, yerr=err, capsize=2, label=impl)
        if has_ratio:
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_ylabel("× torch.nn tokens/s" if has_ratio else "tokens/s")
        ax.set_title(f"{MODE_TITLE[mode]} — {title}", fontsize=9)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{c[0]}\n{','.join(map(str, c[1:]))}" for c in cases], fontsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(path: str, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def compare(path_a: str, path_b: str) -> int:
    """Prints every ratio on which two result CSVs disagree (confidence intervals that do not overlap); 1 if any did."""

    def load(path):
        with open(path, newline="") as f:
            return {tuple(r[k] for k in CSV_FIELDS[:12]): r for r in csv.DictReader(f) if r["ratio_vs_torch_nn"]}

    a, b = load(path_a), load(path_b)
    common = [k for k in a if k in b and k[11] != BASELINE]
    bad = 0
    for k in common:
        ra, rb = a[k], b[k]
        if float(ra["ratio_ci_hi"]) < float(rb["ratio_ci_lo"]) or float(rb["ratio_ci_hi"]) < float(ra["ratio_ci_lo"]):
            bad += 1
            print(
                f"DISAGREE {k[0]} {','.join(k[1:6])} {k[10]} {k[11]}: "
                f"{ra['ratio_vs_torch_nn']} ({ra['ratio_ci_lo']}–{ra['ratio_ci_hi']}) vs "
                f"{rb['ratio_vs_torch_nn']} ({rb['ratio_ci_lo']}–{rb['ratio_ci_hi']})"
            )
    print(f"{len(common) - bad} of {len(common)} ratios agree within their {CI_LEVEL:.0%} confidence intervals")
    return 1 if bad or not common else 0


def summary_table(path: str, impl: str = "fastrnn-cpp") -> str:
    """One implementation's ratios from a result CSV: a row per configuration, a column per mode and cell."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["impl"] == impl]
    titles = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN-tanh", "rnn_relu": "RNN-relu"}
    cols = [(m, c) for m in reversed(MODES) for c in CELLS if any(r["mode"] == m and r["cell"] == c for r in rows)]
    by_key = {(r["mode"], r["cell"], ",".join(case_key(r)[1:])): r for r in rows}
    lines = ["| T,B,I,H,L | " + " | ".join(f"{titles[c]} {m}" for m, c in cols) + " |", "| --- " * (len(cols) + 1) + "|"]
    for cfg in dict.fromkeys(",".join(case_key(r)[1:]) for r in rows):
        cells = []
        for m, c in cols:
            r = by_key.get((m, c, cfg))
            if r is None:
                cells.append("")
            elif r["ratio_vs_torch_nn"]:
                cells.append(f"{float(r['ratio_vs_torch_nn']):.2f} ({float(r['ratio_ci_lo']):.2f}–{float(r['ratio_ci_hi']):.2f})")
            else:
                cells.append(r["status"])
        lines.append(f"| {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark fastrnn's backends against torch.nn, an eager cell loop and torch.compile.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {','.join(CELLS)}")
    p.add_argument("--config", action="append", type=Config.parse, metavar="T,B,I,H,L",
                   help="a configuration (repeatable); default: the five standard ones")  # fmt: skip
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,fwd+bwd")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--bidirectional", action="store_true", help="bidirectional layers")
    p.add_argument("--packed", action="store_true", help="variable-length PackedSequence input (lengths T/2..T)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--passes", type=int, help="sweeps over all cases; rounds add up over them (default 5, --quick 3)")
    p.add_argument("--repeats", type=int, help="timed rounds per case in each pass (default 3, --quick 2)")
    p.add_argument("--warmup", type=int, help="untimed calls before the rounds (default 3, --quick 1)")
    p.add_argument("--min-time", type=float,
                   help="seconds each timed repeat lasts at least, by repeating the call (default 0.2, --quick 0.05)")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds; skip fastrnn-reference and torch.compile where they cost most")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (off: fp32 is fp32 everywhere)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"), help="output folder")
    p.add_argument("--name", default="results", help="basename of the .csv/.md/.png written to --out")
    p.add_argument("--note", default="", help="a line shown in bold at the top of the report (e.g. PRELIMINARY ...)")
    p.add_argument("--list", action="store_true", help="print which implementations can run here and exit")
    p.add_argument("--compare", nargs=2, metavar="CSV", help="check that two result CSVs agree on every ratio and exit")
    p.add_argument("--summary", metavar="CSV", help="print fastrnn-cpp's ratios in a result CSV as a compact table and exit")
    args = p.parse_args(argv)
    args.cells = _subset(p, "--cells", args.cells, CELLS)
    args.modes = _subset(p, "--modes", args.modes, MODES)
    args.impls = _subset(p, "--impls", args.impls, IMPLS)
    args.configs = args.config or list(STANDARD_CONFIGS)
    args.passes = args.passes if args.passes is not None else (3 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.2)
    if min(args.passes, args.repeats, args.warmup, args.threads) < 1:
        p.error("--passes, --repeats, --warmup and --threads must be at least 1")
    return args


def _subset(p: argparse.ArgumentParser, flag: str, text: str, allowed: Sequence[str]) -> List[str]:
    chosen = [s for s in text.split(",") if s]
    unknown = [s for s in chosen if s not in allowed]
    if unknown or not chosen:
        p.error(f"{flag}: {unknown or 'nothing chosen'} not in {','.join(allowed)}")
    return [a for a in allowed if a in chosen]


def _configure_compiler() -> None:
    try:
        import torch._dynamo.config as dynamo_config
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config
    except ImportError:
        return
    # every case compiles the same loop_forward for other shapes, and every later pass reuses those graphs;
    # past the default limit dynamo would quietly run the loop eagerly, so raise it and fail loudly instead
    dynamo_config.recompile_limit = dynamo_config.accumulated_recompile_limit = 4096
    dynamo_config.fail_on_recompile_limit_hit = True
    inductor_config.compile_threads = 1  # keep compile workers off the cores being measured
    # on-disk caches would make compile_s depend on what an earlier run left behind
    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.summary:
        print(summary_table(args.summary))
        return 0
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)  # only the intra-op pool is used; a second one would only compete
    except RuntimeError:
        pass  # already fixed by earlier parallel work in this process (e.g. under pytest)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    absent = {i: why for i in args.impls if (why := unavailable_reason(i, device, dtype)) is not None}
    if "loop-compiled" in args.impls and "loop-compiled" not in absent:
        _configure_compiler()
    if args.list:
        for i in IMPLS:
            why = unavailable_reason(i, device, dtype)
            print(f"{i}: {'available' if why is None else 'unavailable: ' + why}")
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python " + shlex.join([os.path.relpath(os.path.abspath(__file__))] + argv)
    info = machine_info(device)
    quick_notes = {
        why.replace("--quick: ", "")
        for i, c, cfg, m in itertools.product(args.impls, args.cells, args.configs, args.modes)
        if i not in absent and (why := quick_skip(i, c, cfg, args.bidirectional, m))
    }
    settings = {
        "command": command,
        "note": args.note,
        "device / dtype": f"{device} / {args.dtype}"
        + (f", TF32 {'on' if args.tf32 else 'off'}" if device.type == "cuda" else ""),
        "layers": ("bidirectional" if args.bidirectional else "unidirectional")
        + (", packed variable-length input" if args.packed else ", dense input"),
        "timing": (
            f"{args.passes} passes over all cases; in each, a case is rebuilt, gets {args.warmup} warm-up call(s) "
            f"per implementation, then {args.repeats} rounds; each round times every implementation once "
            f"(rotating order) over enough calls to last ≥ {args.min_time:g} s; "
            + ("CUDA events" if device.type == "cuda" else "time.perf_counter with the garbage collector off")
        ),
        "peak memory": "not measured" if not args.memory else (
            "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "torch.profiler allocation events (c10 CPU allocator)"
        ),
        "quick": "; ".join(["yes"] + sorted(quick_notes)) if args.quick else "no",
        "seed": str(args.seed),
    }  # fmt: skip
    print("\n".join(f"{k}: {v}" for k, v in list(info.items()) + list(settings.items()) if v), flush=True)
    for impl, why in absent.items():
        print(f"{impl}: not run ({why})", flush=True)

    from tqdm import tqdm

    gc.collect()
    # torch's import leaves ~1e6 long-lived objects; frozen, they drop out of the collections that
    # time_calls runs before every timed repeat, which would otherwise take ~0.2 s each
    gc.freeze()
    started = time.perf_counter()
    peak_load = os.getloadavg()[0]
    cases = [(cell, cfg, mode) for cfg in args.configs for cell in args.cells for mode in args.modes]
    # every case stays built from the first pass to the last (about 1 GB in all for the standard table)
    done: Dict[Tuple[str, Config, str], Tuple[Case, List[Entry]]] = {}

    def rows_so_far() -> List[dict]:
        return [row for (_, _, mode), (case_, entries) in done.items() for row in summarize(case_, mode, entries)]

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    # SIGTERM (e.g. from `timeout`) ends the run like Ctrl-C: with the rounds done so far written out
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    interrupted = False
    try:
        with tqdm(total=args.passes * len(cases), desc="cases", unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
            # whole sweeps, not all rounds of a case at once: on the development VM the speed of some calls
            # changed by 2x for tens of seconds at a time, so each case's rounds are spread over the whole run
            for pass_index in range(args.passes):
                for cell, cfg, mode in cases:
                    bar.set_postfix_str(f"pass {pass_index + 1}/{args.passes} {cell} {cfg.label} {mode}")
                    if pass_index == 0:
                        skipped = dict(absent)
                        if args.quick:
                            for impl in args.impls:
                                why = None if impl in skipped else quick_skip(impl, cell, cfg, args.bidirectional, mode)
                                if why:
                                    skipped[impl] = why
                        case = build_case(cell, cfg, args.bidirectional, args.packed, device, dtype, args.seed)
                        done[(cell, cfg, mode)] = (case, new_entries(args.impls, skipped))
                    case, entries = done[(cell, cfg, mode)]
                    run_case(case, mode, entries, args, pass_index)
                    del case
                    write_csv(base + ".csv", rows_so_far())
                    peak_load = max(peak_load, os.getloadavg()[0])
                    bar.update()
    except KeyboardInterrupt:
        settings["note"] = " ".join(
            filter(None, [args.note, f"INTERRUPTED in pass {pass_index + 1} of {args.passes}: fewer rounds than asked."])
        )
        print("interrupted; writing the rounds done so far", file=sys.stderr)
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    rows = rows_so_far()
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["highest 1-min load average seen"] = f"{peak_load:.2f}"
    if device.type == "cpu" and peak_load > usable_cores() + 0.5:
        # more runnable threads than cores: torch's OpenMP threads wait on descheduled siblings at every
        # parallel region, which slowed calls 3-20x, unevenly, on the 2-core dev machine
        warning = (
            f"WARNING: the load average reached {peak_load:.1f} on {usable_cores()} cores: other processes "
            "competed with the benchmark's threads, so these numbers may not reproduce."
        )
        settings["note"] = " ".join(filter(None, [settings["note"], warning]))
        print(warning, file=sys.stderr)
    info["benchmark wall time"] = f"{(time.perf_counter() - started) / 60:.1f} min"

    write_csv(base + ".csv", rows)
    write_markdown(base + ".md", rows, info, settings, absent, args.impls)
    title = f"{info['device'] if device.type == 'cuda' else info['CPU']}, torch threads={args.threads}, {args.dtype}"
    write_plot(base + ".png", rows, [i for i in args.impls if i not in absent], title)
    print(f"wrote {base}.csv, {base}.md, {base}.png")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
