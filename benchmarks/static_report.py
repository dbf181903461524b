"""Static cost model of the Triton backend: launches and bytes per time step, from the launch heuristics.

Nothing here runs a kernel or measures time; no GPU has run these kernels. Bytes are what the kernels
request from memory (L2 traffic, before any cache hit), computed from the tile sizes the launch
heuristics pick, against a minimum that reads the recurrent weights and the state once and writes the
outputs once, all in the storage dtype:

- forward minimum per step: W_hh + h_{t-1} (+ c_{t-1}) + the step's input projection + h_t (+ c_t);
- backward minimum per step: W_hh + dy_t + dh/dc carried in and out + the saved gate values + dG_t.

The backend keeps state, saved values and the input projection in fp32 and re-reads W_hh once per batch
tile and the previous h (or dG) once per hidden slice, which is where it exceeds the minimum.
Usage: ``python benchmarks/static_report.py [--out benchmarks/results/static_report.md]``.
"""

import argparse
import os
import sys
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from fastrnn.ops import GATES  # noqa: E402
from fastrnn.ops.triton.host import pick_variant  # noqa: E402
from fastrnn.ops.triton.persist import persist_config, resident_chunks  # noqa: E402
from fastrnn.ops.triton.step import step_config  # noqa: E402

CONFIGS: Tuple[Tuple[int, int, int, int, int], ...] = (
    (100, 64, 256, 256, 1),
    (100, 64, 256, 1024, 1),
    (100, 1, 128, 512, 2),
    (512, 16, 128, 128, 1),
    (100, 64, 512, 512, 1),
)
CELLS = ("LSTM", "GRU", "RNN_TANH")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
F32 = 4
# Launches inside the time loop per step (see fastrnn/ops/triton/__init__.py); seq and persist loop in-kernel.
LAUNCHES = {"step": (1, 1), "seq": (0, 0), "persist": (0, 0)}
# The grid limit of the persist variant: an H200's SM count (fastrnn.ops.triton.persist.device_programs).
SMS = 132


def step_bytes(mode: str, B: int, H: int, s: int, persist: bool = False, T: int = 1) -> Dict[str, int]:
    """Per step and layer, all rows active, no projection (HO = H); the step kernels' tiles, or with
    ``persist`` the persist kernels' (which move the same terms, but W_hh once per sequence of ``T`` steps where
    it stays on chip: ``persist.resident_chunks``)."""
    G = GATES[mode]
    cfg = persist_config(B, H, SMS) if persist else step_config(B, H)
    n_b, n_h = triton.cdiv(B, cfg["BB"]), triton.cdiv(H, cfg["BH"])
    lstm, gru, saves = mode == "LSTM", mode == "GRU", mode in ("LSTM", "GRU")
    w = G * H * H * s
    w_fwd, w_bwd = ((w / T if persist and resident_chunks(G, H, cfg, s, backward) else w) for backward in (False, True))
    fwd = (n_b * (w_fwd + G * H * s)  # W_hh (once per sequence where resident) and b_hh, once per batch tile
           + n_h * B * H * F32  # h_{t-1}, once per hidden slice
           + B * G * H * F32  # input projection
           + B * H * F32 * (2 if lstm else 1)  # h_t (+ c_t)
           + lstm * B * H * F32  # c_{t-1}
           + saves * B * 4 * H * F32  # gates saved for backward
           + (s != F32) * B * H * (F32 + s))  # y = hs.to(dtype) after the loop, per step
    fwd_min = w + B * H * s * (2 if lstm else 1) * 2 + B * G * H * s
    bwd = (n_b * w_bwd
           + n_h * B * G * H * F32  # dG_{t+1}, once per hidden slice
           + B * H * s  # dy_t
           + 2 * B * H * F32 * (2 if lstm else 1)  # dh (and dc) state in and out
           + saves * B * 4 * H * F32 + B * H * F32  # saved gates, h_t
           + lstm * 2 * B * H * F32 + gru * B * H * F32  # c_t, c_{t-1} / h_{t-1}
           + B * G * H * F32 + gru * B * H * F32)  # dG_t (+ GRU input-side n)
    bwd_min = w + B * H * s + 2 * B * H * s * (2 if lstm else 1) + 2 * B * G * H * s
    return dict(fwd=fwd, fwd_min=fwd_min, bwd=bwd, bwd_min=bwd_min, n_b=n_b, n_h=n_h)


def rows() -> List[Dict]:
    out = []
    for T, B, I, H, L in CONFIGS:
        for dname, dtype in DTYPES.items():
            s = torch.empty(0, dtype=dtype).element_size()
            for mode in CELLS:
                variant = pick_variant(H, dtype, False, mode)
                b = step_bytes(mode, B, H, s)
                out.append(dict(cfg=f"{T},{B},{I},{H},{L}", dtype=dname, mode=mode, variant=variant, L=L, **b))
                if variant == "step" and persist_config(B, H, SMS) is not None:
                    b = step_bytes(mode, B, H, s, persist=True, T=T)
                    out.append(dict(cfg=f"{T},{B},{I},{H},{L}", dtype=dname, mode=mode, variant="persist", L=L, **b))
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def markdown(table: List[Dict]) -> str:
    lines = [
        "# Triton backend: static cost per time step",
        "",
        "Derived from the launch heuristics, not measured; no GPU has run these kernels. Bytes are requested",
        "from memory per step and per layer (multiply by L for the stack), forward and backward, next to the",
        "minimum (weights and state read once, outputs written once, storage dtype). See",
        "`benchmarks/static_report.py` for the exact terms.",
        "",
        "| T,B,I,H,L | dtype | cell | variant | launches/step fwd | launches/step bwd | tiles (batch x hidden) | "
        "fwd MiB | fwd min MiB | fwd / min | bwd MiB | bwd min MiB | bwd / min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        lf, lb = LAUNCHES[r["variant"]]
        lines.append(
            f"| {r['cfg']} | {r['dtype']} | {r['mode']} | {r['variant']} | {lf} | {lb} | {r['n_b']} x {r['n_h']} | "
            f"{mib(r['fwd'])} | {mib(r['fwd_min'])} | {r['fwd'] / r['fwd_min']:.2f} | "
            f"{mib(r['bwd'])} | {mib(r['bwd_min'])} | {r['bwd'] / r['bwd_min']:.2f} |"
        )
    lines += [
        "",
        "Launches outside the time loop, per layer and direction: forward 1 input-projection GEMM (+1 fp32 cast",
        "of y for half storage); backward 2 gathers (h_{t-1}, and c_{t-1} for LSTM), 1 dh0 GEMM and 4 GEMMs/sums",
        "for dx, dW_ih, dW_hh and the biases. With an LSTM projection the step loop adds 1 torch matmul per",
        "step forward and 3 torch ops per step backward. With `cuda_graph=True` (unverified on a GPU) the",
        "per-step launches are replayed from a CUDA graph, which removes their host cost but not the launches.",
        f"The persist rows (`FASTRNN_PERSISTENT=1`, unverified on a GPU) assume {SMS} SMs; each step ends at a",
        "barrier between the hidden slices of a batch tile instead of a kernel boundary. Where a program's slice of",
        "W_hh fits on chip (`persist.resident_chunks`) it is read once per sequence, its T steps sharing the cost:",
        "such rows can fall below the minimum, which reads W_hh every step. The table takes the size limit only:",
        "where the compiled resident kernel spills a launch streams instead (kernel_report.md's `streamed` rows; at",
        "100,64,512,512 on Triton 3.8 the fp32 LSTM backward on sm_90 and the 16-bit GRU forward), reading W_hh",
        "every step as the streamed rows here do.",
        "",
        "The re-read factors dominate for large H: each batch tile re-reads W_hh (L2-resident on H100 when",
        "G*H*H*s fits the 50 MB L2, so DRAM traffic is closer to the minimum than these L2 numbers).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "static_report.md"))
    args = ap.parse_args(argv)
    text = markdown(rows())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
