"""One case, one pass: the sanity check against torch.nn (float64 as the judge where it is ill-conditioned),
warm-up, calibration, the timed rounds and peak memory."""

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from rnnbench.cases import BASELINE, Case, Outputs, make_runner, make_step
from rnnbench.timing import calibrate, peak_bytes, sync, time_calls

# Largest normalised difference (max |a-b| / max |ref|, per tensor) that still counts as a match.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
TF32_TOLERANCE = 1e-2
# Beyond the tolerance, a result still counts as a match when its distance from a float64 computation is
# within the tolerance or at most this multiple of torch.nn's own distance from it.
ILL_CONDITIONED_FACTOR = 2.0


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
    """torch.nn's results for the same weights and inputs computed in float64 (without autocast)."""
    leaf = case.leaf.detach().double().requires_grad_()
    inp = PackedSequence(leaf, *case.inp[1:]) if case.packed else leaf
    case64 = dataclasses.replace(
        case, module=copy.deepcopy(case.module).double(), inp=inp, leaf=leaf,
        grad_out=case.grad_out.double(), dtype=torch.float64, autocast=None,
    )  # fmt: skip
    return results_of(make_step(make_runner(BASELINE, case64), case64, mode), case64, mode)


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
    tol = TF32_TOLERANCE if opts.tf32 and case.compute_dtype == torch.float32 else TOLERANCE[case.compute_dtype]
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
            # torch.nn could not run the case (oneDNN's LSTM under CPU autocast without bf16 hardware, say):
            # float64 is the check instead
            if ref64 is None and case.dtype != torch.float64:
                ref64 = float64_results(case, mode)
            if ref64 is None:
                entry.note = "not checked: torch.nn did not run"
                continue
            entry.err = max_err(got, ref64)
            if entry.err <= tol:
                entry.note = f"torch.nn did not run; checked against float64 (off by {entry.err:.3g})"
            else:
                entry.status, entry.step = "mismatch", None
                entry.note = f"torch.nn did not run; differs from float64 by {entry.err:.3g} > {tol:g}"
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
