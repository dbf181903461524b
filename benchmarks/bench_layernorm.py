"""LayerNorm LSTM forward + backward: fastrnn against the loop users write today, and against its plain LSTM.

Implementations, timed side by side in every round (the order rotates), fp32, one layer, unidirectional, on
the CPU or (``--device cuda``, TF32 off, CUDA events) the GPU:

- ``fastrnn``: ``fastrnn.LSTM(..., layer_norm=True)`` on the backend ``auto`` picks for it; with ``--backend``
  (repeatable) one row ``fastrnn-<backend>`` per named backend instead (``--triton-variant`` picks Triton's
  kernels for fastrnn's cells: ``step``, ``seq`` or ``persist``);
- ``loop-eager``: the LayerNorm LSTM written by hand as a Python loop over time (``F.layer_norm``, one GEMM for
  the input projection), what pytorch#6760/#12167 readers write;
- ``loop-compiled``: the same loop with its step ``torch.compile``'d (compiling the unrolled sequence takes
  minutes on a small machine; the step compiles once and runs ``T`` times);
- ``fastrnn-plain``: ``fastrnn.LSTM`` without LayerNorm, the cost LayerNorm adds.

Every implementation's outputs and gradients are checked before timing against the same LayerNorm LSTM in
float64 on fastrnn's reference backend (the equations in torch ops). Prints a markdown
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

BASELINES = ("loop-eager", "loop-compiled", "fastrnn-plain")


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


def runners(cfg: Config, seed: int, device: torch.device, backends: List[str], options: Dict[str, dict]):
    """Each implementation as a call that runs forward + backward and returns ``[y, dx, *dparams]``, the
    backend each fastrnn LayerNorm LSTM runs on, and the float64 reference's ``[y, dx, *dparams]``;
    ``backends``: ``["auto"]`` or the backends to time, one row each."""
    torch.manual_seed(seed)
    ln = fastrnn.LSTM(cfg.I, cfg.H, layer_norm=True, backend_options=options).to(device)
    with torch.no_grad():  # LayerNorm parameters off 1/0, as after some training
        for name, p in ln.named_parameters():
            if name.startswith("layer_norm_"):
                p.add_(torch.randn_like(p) * 0.1)
    plain = fastrnn.LSTM(cfg.I, cfg.H).to(device)
    x = torch.randn(cfg.T, cfg.B, cfg.I, device=device, requires_grad=True)
    dy = torch.randn(cfg.T, cfg.B, cfg.H, device=device)
    compiled_step = torch.compile(ln_lstm_step, dynamic=False)
    mine = {}
    for b in backends:
        m = ln if b == "auto" else fastrnn.LSTM(cfg.I, cfg.H, layer_norm=True, backend=b,
                                                backend_options=options).to(device)
        m.load_state_dict(ln.state_dict())
        mine["fastrnn" if b == "auto" else f"fastrnn-{b}"] = m
    forwards = {name: (m, (lambda m=m: m(x)[0])) for name, m in mine.items()}
    forwards.update({
        "loop-eager": (ln, lambda: ln_lstm_loop(x, ln, ln_lstm_step)),
        "loop-compiled": (ln, lambda: ln_lstm_loop(x, ln, compiled_step)),
        "fastrnn-plain": (plain, lambda: plain(x)[0]),
    })

    def make(module, forward) -> Callable[[], List[Tensor]]:
        params = list(module.parameters())

        def run() -> List[Tensor]:
            y = forward()
            grads = torch.autograd.grad(y, [x] + params, dy)
            return [y] + list(grads)

        return run

    ran_on = {name: m._backend_for(x, ("layer_norm",))[0].__name__.rsplit(".", 1)[-1] for name, m in mine.items()}
    return {name: make(*fwd) for name, fwd in forwards.items()}, ran_on, float64_reference(ln, x, dy)


def float64_reference(ln: fastrnn.LSTM, x: Tensor, dy: Tensor) -> List[Tensor]:
    """``[y, dx, *dparams]`` of ``ln`` in float64 on the CPU on fastrnn's reference backend."""
    m = fastrnn.LSTM(ln.input_size, ln.hidden_size, layer_norm=True, backend="reference").double()
    m.load_state_dict({k: v.detach().double().cpu() for k, v in ln.state_dict().items()})
    x64 = x.detach().double().cpu().requires_grad_()
    y = m(x64)[0]
    return [y, *torch.autograd.grad(y, [x64] + list(m.parameters()), dy.double().cpu())]


def check_agreement(runs: Dict[str, Callable[[], List[Tensor]]], want: List[Tensor]) -> None:
    """Every implementation but the plain LSTM computes ``want`` (the float64 reference) to within 1e-3 of each
    output's largest magnitude, before anything is timed. Not fp32 against fp32: each side's rounding through
    the LayerNorms over T steps would count twice (at (100,64,256,256,1) on a Xeon the eager loop's dx was
    3.2e-4 of its largest magnitude off float64 and fastrnn's 7.3e-4, 1.05e-3 from each other)."""
    for name, run in runs.items():
        if name == "fastrnn-plain":
            continue
        for k, (g, w) in enumerate(zip(run(), want)):
            scale = max(1.0, w.abs().max().item())
            err = (g.detach().double().cpu() - w).abs().max().item()
            if err > 1e-3 * scale:
                raise SystemExit(f"{name} disagrees with the float64 reference in output {k}: {err:.3g} "
                                 f"(scale {scale:.3g})")


def measure(runs: Dict[str, Callable[[], List[Tensor]]], rounds: int, min_time: float,
            device: torch.device) -> Dict[str, List[float]]:
    for run in runs.values():
        run()  # warm-up: compilation and weight packing are no part of the rate
    calls = {name: timing.calibrate(run, min_time, device) for name, run in runs.items()}
    times: Dict[str, List[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timing.time_calls(runs[name], calls[name], device))
    return times


def where(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, TF32 off"
    return f"{torch.get_num_threads()} threads, {platform.machine()}"


def table(times: Dict[str, List[float]], cfg: Config, ran_on: Dict[str, str], device: torch.device,
          command: str) -> str:
    med = {name: timing.median_ci(ts) for name, ts in times.items()}
    mid = {name: statistics.median(ts) for name, ts in times.items()}
    first = next(iter(ran_on))
    base = mid[first]
    backends = "; ".join(f"{name} ran on the {b!r} backend" for name, b in ran_on.items())
    lines = [
        f"LayerNorm LSTM forward + backward, fp32, (T,B,I,H,L) = ({cfg.label}), {where(device)}, "
        f"torch {torch.__version__}; {backends}; {len(next(iter(times.values())))} rounds.",
        "",
        f"| implementation | ms per call (median) | 95 % interval | time ÷ {first}'s |",
        "|---|---:|---:|---:|",
    ]
    for name in times:
        lo, hi = med[name]
        lines.append(f"| {name} | {mid[name] * 1e3:.2f} | {lo * 1e3:.2f}–{hi * 1e3:.2f} | {mid[name] / base:.2f} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Config.parse, default=Config(100, 64, 256, 256, 1), help="T,B,I,H,L (L = 1)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed repeat")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu or cuda")
    p.add_argument("--backend", action="append", choices=fastrnn.backend.BACKENDS,
                   help="time fastrnn's LayerNorm LSTM on this backend (repeatable; default: what auto picks)")
    p.add_argument("--triton-variant", choices=("step", "seq", "persist"), help="Triton's kernels for fastrnn's cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.config.L != 1:
        p.error("--config: the loop baselines are one layer (L = 1)")
    if args.device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device visible to torch")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)
    options = {"triton": {"variant": args.triton_variant}} if args.triton_variant else {}
    runs, ran_on, want = runners(args.config, args.seed, args.device, args.backend or ["auto"], options)
    check_agreement(runs, want)
    times = measure(runs, args.rounds, args.min_time, args.device)
    command = "python benchmarks/bench_layernorm.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = table(times, args.config, ran_on, args.device, command.strip())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
