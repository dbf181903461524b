"""GEMM roofline of this machine and of the RNN cases: how close a run gets to the GEMM peak.

``python benchmarks/roofline.py`` measures the machine's fp32 and bf16 GEMM peak (a 2048^3 product through
torch.mm and through F.linear, oneDNN on the CPU, whichever is faster), then times the standard configs on
fastrnn's cpp backend and on torch.nn (forward + backward, interleaved in one process) and prints each one's
model GEMM rate in GF/s and in % of that peak, fp32, bf16 and fp32 under bf16 autocast.

Model FLOPs count only the GEMMs a layer cannot avoid (pointwise work is not counted): forward, the input
projection 2*N*I*G*H and the recurrent projection 2*N*Hout*G*H (+ 2*N*H*Hout with proj_size); backward,
dx, dW_ih, dh and dW_hh, twice the forward (dx of the first layer only when x requires grad).
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script from a checkout without installing fastrnn

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@dataclass(frozen=True)
class Case:
    mode: str
    T: int
    B: int
    I: int
    H: int
    L: int = 1
    proj: int = 0


STANDARD = [(100, 64, 256, 256, 1), (100, 64, 256, 1024, 1), (100, 1, 128, 512, 2), (512, 16, 128, 128, 1),
             (100, 64, 512, 512, 1)]


def gemm_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GF/s of the faster of torch.mm and F.linear on an n^3 product, best of `reps`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    best = 0.0
    for fn in (lambda: torch.mm(a, b), lambda: F.linear(a, b)):
        fn()
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def model_flops(c: Case, backward: bool, dx_first: bool = False) -> float:
    """GEMM FLOPs of one forward (and backward) of `c` with dense [T, B] input, unidirectional."""
    gh, hout, n = GATES[c.mode] * c.H, c.proj or c.H, c.T * c.B
    total = 0.0
    for layer in range(c.L):
        i = c.I if layer == 0 else hout
        fwd_in, fwd_rec = 2 * n * i * gh, 2 * n * hout * gh
        fwd_proj = 2 * n * c.H * hout if c.proj else 0
        total += fwd_in + fwd_rec + fwd_proj
        if backward:
            dx = fwd_in if (layer > 0 or dx_first) else 0
            total += dx + fwd_in + 2 * fwd_rec + 2 * fwd_proj
    return total


def make_modules(c: Case, dtype: torch.dtype) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(torch.nn module, fastrnn cpp module sharing its parameters) in `dtype`."""
    import fastrnn

    kind = {"LSTM": "LSTM", "GRU": "GRU"}.get(c.mode, "RNN")
    kw = dict(num_layers=c.L)
    if c.mode == "LSTM" and c.proj:
        kw["proj_size"] = c.proj
    if kind == "RNN":
        kw["nonlinearity"] = c.mode[4:].lower()
    ref = getattr(torch.nn, kind)(c.I, c.H, **kw).to(dtype)
    ours = getattr(fastrnn, kind).from_torch(ref, backend="cpp")
    return ref, ours


def step_fn(module: torch.nn.Module, x: torch.Tensor, backward: bool, autocast: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = module(x)
        if backward:
            out.float().sum().backward()

    return run


def time_pair(fns: Dict[str, Callable[[], None]], rounds: int = 5, min_time: float = 0.1) -> Dict[str, float]:
    """Median seconds per call of each fn, rounds interleaved so that load changes hit all alike."""
    for fn in fns.values():
        fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            reps, start = 0, time.perf_counter()
            while True:
                fn()
                reps += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            samples[name].append(elapsed / reps)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def measure(c: Case, dtype: torch.dtype, autocast: bool, backward: bool, rounds: int, min_time: float):
    ref, ours = make_modules(c, torch.float32 if autocast else dtype)
    x = torch.randn(c.T, c.B, c.I).to(torch.float32 if autocast else dtype)
    times = time_pair({"torch.nn": step_fn(ref, x, backward, autocast), "fastrnn-cpp": step_fn(ours, x, backward,
                                                                                                autocast)},
                      rounds, min_time)
    return times


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="LSTM,GRU,RNN_TANH")
    p.add_argument("--precisions", default="fp32,bf16,autocast", help="comma list of fp32, bf16, autocast")
    p.add_argument("--configs", default=None, help="T,B,I,H,L;... (default: the five standard configs)")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.1)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = ([tuple(int(v) for v in s.split(",")) for s in args.configs.split(";")] if args.configs
               else STANDARD)
    backward = not args.forward_only
    peaks = {torch.float32: gemm_peak(torch.float32), torch.bfloat16: gemm_peak(torch.bfloat16)}
    print(f"{torch.get_num_threads()} threads; GEMM peak fp32 {peaks[torch.float32]:.0f} GF/s, "
          f"bf16 {peaks[torch.bfloat16]:.0f} GF/s; {'forward + backward' if backward else 'forward'}")
    print(f"{'mode':9} {'precision':9} {'T,B,I,H,L':>18} {'torch.nn GF/s':>14} {'%pk':>5} {'fastrnn GF/s':>13} "
          f"{'%pk':>5} {'speedup':>8}")
    for prec in args.precisions.split(","):
        dtype = torch.float32 if prec == "fp32" else torch.bfloat16
        for mode in args.modes.split(","):
            for cfg in configs:
                c = Case(mode, *cfg)
                t = measure(c, dtype, prec == "autocast", backward, args.rounds, args.min_time)
                fl = model_flops(c, backward)
                peak = peaks[torch.float32 if prec == "fp32" else torch.bfloat16]
                g_ref, g_ours = fl / t["torch.nn"] / 1e9, fl / t["fastrnn-cpp"] / 1e9
                print(f"{mode:9} {prec:9} {','.join(map(str, cfg)):>18} {g_ref:14.1f} {100 * g_ref / peak:5.0f} "
                      f"{g_ours:13.1f} {100 * g_ours / peak:5.0f} {t['torch.nn'] / t['fastrnn-cpp']:7.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
