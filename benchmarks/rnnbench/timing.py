"""Clocks: time per call, calibration, peak memory, the machine's GEMM peak, and statistics of the rounds."""

import contextlib
import gc
import itertools
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, Sequence, Tuple

import torch

CI_LEVEL = 0.95


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(step: Callable[[], object], calls: int, device: torch.device) -> float:
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


def calibrate(step: Callable[[], object], min_time: float, device: torch.device) -> int:
    """Calls per timed repeat so that one repeat lasts about ``min_time``; one call is too coarse to time fast cases."""
    calls = 1
    while True:
        per_call = time_calls(step, calls, device)
        if per_call * calls >= min_time / 4 or calls >= 1000:
            return max(1, math.ceil(min_time / max(per_call, 1e-9)))
        calls *= 4


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
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


def _gemm_engines(device: torch.device) -> Dict[str, Callable]:
    """C = A·B by every engine the model's GEMMs may use on ``device``, as f(a, b)."""
    engines = {"torch.mm": torch.mm}
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if device.type == "cpu" else None
    if linear is not None and torch.backends.mkldnn.is_available():
        # oneDNN's linear computes a·wᵀ: handing it bᵀ keeps the product the same size
        engines["oneDNN linear"] = lambda a, bt: linear(a, bt, None, "none", [], "")
    return engines


def gemm_peaks(device: torch.device, size: int, rounds: int = 3) -> Dict[str, Tuple[float, str]]:
    """The machine's measured GEMM peak per dtype name: (GFLOP/s, engine), the best over engines and
    ``rounds`` timed calls of a ``size``³ product, on the thread count and TF32 setting already in force."""
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    peaks: Dict[str, Tuple[float, str]] = {}
    for dtype in dtypes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for name, fn in _gemm_engines(device).items():
            try:
                fn(a, b)  # warm-up: weight reorders and kernel selection are no part of the rate
                best = min(time_calls(lambda: fn(a, b), 1, device) for _ in range(rounds))
            except RuntimeError:
                continue  # an engine without this dtype on this machine
            rate = 2 * size**3 / best / 1e9
            key = str(dtype).replace("torch.", "")
            if rate > peaks.get(key, (0.0, ""))[0]:
                peaks[key] = (rate, name)
    return peaks


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
