"""LayerNorm LSTM forward + backward: fastrnn against the loop users write today, and against its plain LSTM.

Implementations, timed side by side in every round (the order rotates), fp32, one layer, unidirectional:

- ``fastrnn``: ``fastrnn.LSTM(..., layer_norm=True)`` on the backend ``auto`` picks for it;
- ``loop-eager``: the LayerNorm LSTM written by hand as a Python loop over time (``F.layer_norm``, one GEMM for
  the input projection), what pytorch#6760/#12167 readers write;
- ``loop-compiled``: the same loop with its step ``torch.compile``'d (compiling the unrolled sequence takes
  minutes on a small machine; the step compiles once and runs ``T`` times);
- ``fastrnn-plain``: ``fastrnn.LSTM`` without LayerNorm, the cost LayerNorm adds.

Every implementation's outputs and gradients are checked against fastrnn's before timing. Prints a markdown
table (median per call, its 95 % interval, ratios against fastrnn) and writes it with ``--out``.
"""

import argparse
import os
import platform
import shlex
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rnnbench import timing  # noqa: E402
from rnnbench.cases import Config  # noqa: E402

import fastrnn  # noqa: E402

IMPLS = ("fastrnn", "loop-eager", "loop-compiled", "fastrnn-plain")


def ln_lstm_step(xp: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor, ln_hh_w: Tensor, ln_hh_b: Tensor,
                 ln_c_w: Tensor, ln_c_b: Tensor):
    """One step of the LayerNorm LSTM given ``xp = LN_ih(W_ih x) + b_ih`` (fastrnn.LSTM's docstring)."""
    gates = xp + F.layer_norm(h @ w_hh.t(), (w_hh.shape[0],), ln_hh_w, ln_hh_b) + b_hh
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(F.layer_norm(c, (c.shape[1],), ln_c_w, ln_c_b))
    return h, c


def ln_lstm_loop(x: Tensor, m: fastrnn.LSTM, step: Callable) -> Tensor:
    """The whole sequence ``x: [T, B, I]`` through ``m``'s parameters; returns ``y: [T, B, H]``."""
    T, B, _ = x.shape
    GH = m.weight_ih_l0.shape[0]
    xp = F.layer_norm(x @ m.weight_ih_l0.t(), (GH,), m.layer_norm_ih_weight_l0, m.layer_norm_ih_bias_l0)
    xp = xp + m.bias_ih_l0
    h = c = x.new_zeros(B, m.hidden_size)
    ys = []
    for xt in xp.unbind(0):
        h, c = step(xt, h, c, m.weight_hh_l0, m.bias_hh_l0, m.layer_norm_hh_weight_l0, m.layer_norm_hh_bias_l0,
                    m.layer_norm_c_weight_l0, m.layer_norm_c_bias_l0)
        ys.append(h)
    return torch.stack(ys)


def runners(cfg: Config, seed: int):
    """Each implementation as a call that runs forward + backward and returns ``[y, dx, *dparams]``, and the
    name of the backend fastrnn's LayerNorm LSTM runs on."""
    torch.manual_seed(seed)
    ln = fastrnn.LSTM(cfg.I, cfg.H, layer_norm=True)
    with torch.no_grad():  # LayerNorm parameters off 1/0, as after some training
        for name, p in ln.named_parameters():
            if name.startswith("layer_norm_"):
                p.add_(torch.randn_like(p) * 0.1)
    plain = fastrnn.LSTM(cfg.I, cfg.H)
    x = torch.randn(cfg.T, cfg.B, cfg.I, requires_grad=True)
    dy = torch.randn(cfg.T, cfg.B, cfg.H)
    compiled_step = torch.compile(ln_lstm_step, dynamic=False)
    forwards = {
        "fastrnn": (ln, lambda: ln(x)[0]),
        "loop-eager": (ln, lambda: ln_lstm_loop(x, ln, ln_lstm_step)),
        "loop-compiled": (ln, lambda: ln_lstm_loop(x, ln, compiled_step)),
        "fastrnn-plain": (plain, lambda: plain(x)[0]),
    }

    def make(module, forward) -> Callable[[], List[Tensor]]:
        params = list(module.parameters())

        def run() -> List[Tensor]:
            y = forward()
            grads = torch.autograd.grad(y, [x] + params, dy)
            return [y] + list(grads)

        return run

    backend = ln._backend_for(x, ("layer_norm",))[0].__name__.rsplit(".", 1)[-1]
    return {name: make(*forwards[name]) for name in IMPLS}, backend


def check_agreement(runs: Dict[str, Callable[[], List[Tensor]]]) -> None:
    """The loops compute what fastrnn computes (fp32 orders of summation apart), before anything is timed."""
    want = runs["fastrnn"]()
    for name in ("loop-eager", "loop-compiled"):
        for k, (g, w) in enumerate(zip(runs[name](), want)):
            scale = max(1.0, w.abs().max().item())
            err = (g - w).abs().max().item()
            if err > 1e-3 * scale:
                raise SystemExit(f"{name} disagrees with fastrnn in output {k}: {err:.3g} (scale {scale:.3g})")


def measure(runs: Dict[str, Callable[[], List[Tensor]]], rounds: int, min_time: float) -> Dict[str, List[float]]:
    cpu = torch.device("cpu")
    for run in runs.values():
        run()  # warm-up: compilation and weight packing are no part of the rate
    calls = {name: timing.calibrate(run, min_time, cpu) for name, run in runs.items()}
    times: Dict[str, List[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timing.time_calls(runs[name], calls[name], cpu))
    return times


def table(times: Dict[str, List[float]], cfg: Config, backend: str, command: str) -> str:
    med = {name: timing.median_ci(ts) for name, ts in times.items()}
    mid = {name: statistics.median(ts) for name, ts in times.items()}
    base = mid["fastrnn"]
    lines = [
        f"LayerNorm LSTM forward + backward, fp32, (T,B,I,H,L) = ({cfg.label}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {platform.machine()}; fastrnn's LayerNorm LSTM ran on its {backend!r} backend; "
        f"{len(next(iter(times.values())))} rounds.",
        "",
        "| implementation | ms per call (median) | 95 % interval | time ÷ fastrnn's |",
        "|---|---:|---:|---:|",
    ]
    for name in IMPLS:
        lo, hi = med[name]
        lines.append(f"| {name} | {mid[name] * 1e3:.2f} | {lo * 1e3:.2f}–{hi * 1e3:.2f} | {mid[name] / base:.2f} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Config.parse, default=Config(100, 64, 256, 256, 1), help="T,B,I,H,L (L = 1)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed repeat")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.config.L != 1:
        p.error("--config: the loop baselines are one layer (L = 1)")
    torch.set_num_threads(args.threads)
    runs, backend = runners(args.config, args.seed)
    check_agreement(runs)
    times = measure(runs, args.rounds, args.min_time)
    command = "python benchmarks/bench_layernorm.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = table(times, args.config, backend, command.strip())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
