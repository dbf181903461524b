"""What is benchmarked: configurations, the cases built from them and every implementation's runner."""

import argparse
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from rnnbench.baselines import loop_forward

with warnings.catch_warnings():
    # the missing-extension warning is reported per implementation in the table instead
    warnings.simplefilter("ignore", RuntimeWarning)
    import fastrnn
    from fastrnn import backend as fr_backend

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
TORCH_MODE = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
MODES = ("fwd", "fwd+bwd")
MODE_TITLE = {"fwd": "forward (no_grad)", "fwd+bwd": "forward + backward"}
BASELINE = "torch.nn"
FASTRNN_IMPLS = {"fastrnn-cpp": "cpp", "fastrnn-triton": "triton", "fastrnn-reference": "reference"}
LOOP_IMPLS = ("loop-eager", "loop-compiled")
IMPLS = tuple(FASTRNN_IMPLS) + (BASELINE,) + LOOP_IMPLS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK_REFERENCE_MAX_FLOPS = 20e9
QUICK_COMPILE_MAX_STEPS = 100
QUICK_COMPILE_MAX_FLOPS = 10e9
# The variant in which torch.nn and fastrnn run their ``*Cell`` modules in a Python loop over the steps (a decoder
# with attention, teacher forcing): one call per step and layer, each with its own autograd node.
CELL_LOOP = "cell loop"


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


@dataclass(frozen=True)
class Spec:
    """One case to build: the run's flags, or one of ``--quick``'s extra cases, which differ from them."""

    cell: str
    cfg: Config
    mode: str
    bidirectional: bool
    packed: bool
    dtype: torch.dtype
    autocast: Optional[torch.dtype] = None
    proj_size: int = 0
    variant: str = ""  # how an extra case differs from the run's own, e.g. "bf16"; empty for the run's own


def quick_extras(cells: Sequence[str], modes: Sequence[str]) -> List[Spec]:
    """The cases issue 11 measures beyond the standard table: bf16 storage and CPU autocast, packed
    variable-length input and an LSTM projection, forward + backward at the first standard configuration; and
    there the cells in a Python loop (``CELL_LOOP``)."""
    if "fwd+bwd" not in modes:
        return []
    cfg, f32, bf16 = STANDARD_CONFIGS[0], torch.float32, torch.bfloat16
    specs = [Spec(c, cfg, "fwd+bwd", False, False, bf16, variant="bf16") for c in ("lstm", "gru", "rnn_tanh")]
    specs += [
        Spec(c, cfg, "fwd+bwd", False, False, f32, autocast=bf16, variant="autocast bf16")
        for c in ("lstm", "gru", "rnn_tanh")
    ]
    specs += [
        Spec("lstm", cfg, "fwd+bwd", False, True, f32, variant="packed"),
        Spec("lstm", cfg, "fwd+bwd", False, False, f32, proj_size=128, variant="proj 128"),
    ]
    specs += [Spec(c, cfg, "fwd+bwd", False, False, f32, variant=CELL_LOOP) for c in ("lstm", "gru", "rnn_tanh")]
    return [s for s in specs if s.cell in cells]


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
    proj_size: int = 0
    autocast: Optional[torch.dtype] = None
    variant: str = ""

    @property
    def params(self) -> List[Tensor]:
        return list(self.module._flat_weights)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast or self.dtype


def build_case(
    cell, cfg: Config, bidirectional, packed, device, dtype, seed, *, proj_size=0, autocast=None, variant=""
) -> Case:
    # crc32 rather than hash(): the same case gets the same weights in every run and process
    key = f"{cell}/{cfg.label}/{bidirectional}/{packed}" + (f"/{variant}" if variant else "")
    torch.manual_seed(seed + zlib.crc32(key.encode()))
    kwargs = dict(num_layers=cfg.L, bidirectional=bidirectional)
    if cell == "lstm":
        module = nn.LSTM(cfg.I, cfg.H, proj_size=proj_size, **kwargs)
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
    h_out = proj_size or cfg.H
    grad_out = torch.randn(tokens, h_out * (2 if bidirectional else 1), device=device, dtype=dtype)
    return Case(cell, cfg, bidirectional, packed, device, dtype, module, inp, leaf, grad_out, tokens,
                proj_size, autocast, variant)  # fmt: skip


def gemm_flops(case: Case, mode: str) -> int:
    """The model's GEMM FLOPs per call (benchmarks/README.md, "Roofline").

    Forward, per layer and direction over N tokens: the input projection 2·N·I·G·H, the recurrent
    product 2·N·Hout·G·H and, with proj_size, the projection 2·N·H·Hout. Backward computes, for each of
    those GEMMs, the gradient of its input and of its weight, each as many FLOPs as the GEMM itself.
    """
    H, G, dirs = case.cfg.H, GATES[case.cell], (2 if case.bidirectional else 1)
    h_out = case.proj_size or H
    total, width = 0, case.cfg.I
    for _ in range(case.cfg.L):
        per_token = G * H * (width + h_out) + (H * h_out if case.proj_size else 0)
        total += 2 * case.tokens * per_token * dirs
        width = h_out * dirs
    return total * (3 if mode == "fwd+bwd" else 1)


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


def _torch_cells(case: Case) -> List[nn.RNNCellBase]:
    """torch.nn's ``*Cell`` per layer, sharing the case module's parameters."""
    m = case.module
    kind = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}.get(case.cell, nn.RNNCell)
    extra = {"nonlinearity": m.nonlinearity} if kind is nn.RNNCell else {}
    cells = []
    for layer in range(case.cfg.L):
        width = case.cfg.I if layer == 0 else case.cfg.H
        cell = kind(width, case.cfg.H, bias=m.bias, device="meta", **extra)
        for name in list(cell._parameters):
            cell._parameters[name] = m._parameters[f"{name}_l{layer}"]
        cells.append(cell)
    return cells


def _cell_loop_runner(cells: Sequence[nn.Module], case: Case) -> Callable[[], Outputs]:
    """``cells`` called once per step and layer, the steps of the input unbound (one gradient buffer each)."""
    lstm = case.cell == "lstm"

    def run() -> Outputs:
        state: List[object] = [None] * len(cells)
        outs = []
        for x in case.leaf.unbind(0):
            for layer, cell in enumerate(cells):
                state[layer] = cell(x, state[layer])
                x = state[layer][0] if lstm else state[layer]
            outs.append(x)
        h = torch.stack([s[0] if lstm else s for s in state])
        return torch.cat(outs), h, torch.stack([s[1] for s in state]) if lstm else None

    return run


def make_runner(impl: str, case: Case) -> Callable[[], Outputs]:
    if case.variant == CELL_LOOP:
        cells = _torch_cells(case)
        if impl in FASTRNN_IMPLS:
            cls = {"lstm": fastrnn.LSTMCell, "gru": fastrnn.GRUCell}.get(case.cell, fastrnn.RNNCell)
            cells = [cls.from_torch(c, backend=FASTRNN_IMPLS[impl]) for c in cells]
        return _cell_loop_runner(cells, case)
    if impl == BASELINE:
        return _module_runner(case.module, case)
    if impl in FASTRNN_IMPLS:
        cls = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}.get(case.cell, fastrnn.RNN)
        return _module_runner(cls.from_torch(case.module, backend=FASTRNN_IMPLS[impl]), case)
    if impl in LOOP_IMPLS:
        return _loop_runner(case, impl == "loop-compiled")
    raise ValueError(f"unknown implementation {impl!r}")


def make_step(run: Callable[[], Outputs], case: Case, mode: str) -> Callable[[], Outputs]:
    """The timed unit of work: a no_grad forward, or forward + backward from fresh gradients; under
    autocast when the case asks for it, with backward outside it as autocast's documentation says."""

    def forward() -> Outputs:
        if case.autocast is None:
            return run()
        with torch.autocast(case.device.type, dtype=case.autocast):
            return run()

    if mode == "fwd":

        def step() -> Outputs:
            with torch.no_grad():
                return forward()

        return step
    params = case.params
    # under autocast the output may come in the autocast dtype; cast the gradient once, not in every timed call
    grads = {case.grad_out.dtype: case.grad_out}

    def step() -> Outputs:
        case.leaf.grad = None
        for p in params:
            p.grad = None
        out = forward()
        dtype = out[0].dtype
        out[0].backward(grads[dtype] if dtype in grads else grads.setdefault(dtype, case.grad_out.to(dtype)))
        return out

    return step


def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``impl`` cannot run here at all with ``dtype`` storage (None when it can)."""
    if impl in FASTRNN_IMPLS:
        why = fr_backend.reason_unavailable(FASTRNN_IMPLS[impl], device, dtype)
        if why is None and impl == "fastrnn-triton" and device.type == "cpu":
            return "runs on CPU only under the Triton interpreter, whose speed means nothing"
        return why
    if impl == "loop-compiled" and not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    return None


def case_unsupported(impl: str, spec: Spec) -> Optional[str]:
    """Why ``impl`` cannot run one case although it runs on this machine (None when it can)."""
    if impl in LOOP_IMPLS and spec.proj_size:
        return "the cell loop has no LSTM projection"
    if impl in LOOP_IMPLS and spec.variant == CELL_LOOP:
        return "the cell-loop variant compares torch.nn's and fastrnn's *Cell modules"
    return None


def quick_skip(impl: str, cell: str, cfg: Config, bidirectional: bool, mode: str) -> Optional[str]:
    """Why ``--quick`` leaves ``impl`` out of a case, or None.

    Only the two slowest implementations stay out, each where it costs most: fastrnn-reference is an
    eager per-step loop like loop-eager, and torch.compile unrolls the whole sequence, so its compile
    time grows with the number of steps (on the 2-core dev machine 3-16 s for a 100-step forward, but
    120-150 s for GRU's, and 30-90 s for forward + backward).
    """
    gates = GATES[cell]
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
