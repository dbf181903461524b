"""The one harness for the layer contract (``fastrnn.ops``): backend x device x dtype, cases, random inputs and
the comparison of every output and gradient with the float64-capable reference backend."""

import contextlib
import dataclasses
import os
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from conftest import TOL, assert_close
from fastrnn import backend as _backend
from fastrnn.ops import GATES, GRAD_NAMES, MODES, LayerArgs, reference

DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Backend options each fused backend is tested under: the Triton kernel variants are separate kernels.
OPTIONS = {"cpp": ({},), "triton": ({"variant": "step"}, {"variant": "seq"}, {"variant": "persist"}),
           "reference": ({},)}


@dataclass(frozen=True)
class Impl:
    """One backend, with options, on one device and storage dtype."""

    backend: str
    device: str
    dtype: torch.dtype
    options: Tuple[Tuple[str, object], ...] = ()

    @property
    def id(self) -> str:
        variant = dict(self.options).get("variant")
        return "-".join([self.backend + (f".{variant}" if variant else ""), self.device, DTYPE_IDS[self.dtype]])

    def reason(self) -> Optional[str]:
        return _backend.reason_unavailable(self.backend, torch.device(self.device), self.dtype)

    def layer(self, *args, **kwargs):
        return _backend._module(self.backend).layer(*args, **dict(self.options), **kwargs)

    def supports(self, c: "Case") -> bool:
        """Whether the case is in this implementation's domain (Triton's "seq" kernels: small H, no proj;
        "persist": no proj, a grid the device holds)."""
        if c.mode == "RNN_RELU" and self.dtype in (torch.float16, torch.bfloat16) and c.T * c.B > 8:
            # ReLU's derivative jumps at 0 and 8/11-bit rounding of h moves pre-activations across it: over
            # many rows some gradient element flips against any reference; small cases keep the coverage.
            return False
        variant = dict(self.options).get("variant")
        if variant not in ("seq", "persist"):
            return True
        from fastrnn.ops.triton import host

        if variant == "persist":
            # In the interpreter, H <= 64: several hidden slices and two reduction chunks (H = 40) are what the
            # persist kernels add; wider H runs their per-step tile, which the "step" cases cover at H = 513.
            wide_on_cpu = self.device == "cpu" and c.H > 64
            return not wide_on_cpu and host.persist_fits(c.B, c.H, bool(c.proj), torch.device(self.device))
        return not c.proj and c.H <= host.seq_max_h(self.dtype, c.mode)


def impls(backends=("cpp", "triton"), dtypes=tuple(DTYPE_IDS)) -> List[Impl]:
    """Every backend/device/dtype that runs here: CPU always (Triton through its interpreter), CUDA when present."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for backend, device, dtype in itertools.product(backends, devices, dtypes):
        for opts in OPTIONS[backend]:
            impl = Impl(backend, device, dtype, tuple(sorted(opts.items())))
            if impl.reason() is None:
                out.append(impl)
    return out


def params(impl_list: List[Impl], cases: List["Case"]) -> list:
    """``pytest.param(impl, case)`` for each supported pair, with an id naming both and the ``cuda`` mark."""
    out = []
    for impl, c in itertools.product(impl_list, cases):
        if impl.supports(c):
            marks = [pytest.mark.cuda] if impl.device == "cuda" else []
            out.append(pytest.param(impl, c, id=f"{impl.id}-{c.id}", marks=marks))
    return out


@dataclass(frozen=True)
class Case:
    mode: str
    T: int
    B: int
    I: int
    H: int
    proj: int = 0
    bias: bool = True
    packed: bool = False
    reverse: bool = False
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [self.mode, f"T{self.T}B{self.B}I{self.I}H{self.H}"] + ([f"proj{self.proj}"] if self.proj else [])
        parts += ["bias" if self.bias else "nobias", "packed" if self.packed else "dense"]
        return "-".join(parts + (["reverse"] if self.reverse else []))


def option_cases(T: int, B: int, I: int, H: int, P: int) -> List[Case]:
    """Every mode with and without bias, dense and packed, forward and reverse; LSTM also with projection."""
    return [Case(mode, T, B, I, H, proj, bias, packed, reverse)
            for mode, bias, packed, reverse in itertools.product(MODES, (True, False), (False, True), (False, True))
            for proj in ((0, P) if mode == "LSTM" else (0,))]


def one_step_and_one_unit(T: int) -> List[Case]:
    """Every mode over a single step, and with a single hidden unit over ``T`` packed steps."""
    return [Case(m, steps, 3, 2, H, packed=packed) for m in MODES for steps, H, packed in ((1, 4, False), (T, 1, True))]


def make_inputs(c: Case, impl: Impl) -> Dict[str, Optional[torch.Tensor]]:
    """Random inputs (never zeros) on the implementation's device and dtype; packed cases get sorted lengths
    with ragged ends, the longest = T."""
    g = torch.Generator().manual_seed(c.seed)
    G, hout = GATES[c.mode], c.proj or c.H

    def rnd(*shape, scale=0.6):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(impl.device, impl.dtype)

    batch_sizes = None
    n = c.T * c.B
    if c.packed:
        lengths = sorted(torch.randint(1, c.T + 1, (c.B,), generator=g).tolist(), reverse=True)
        lengths[0] = c.T
        batch_sizes = torch.tensor([sum(length > t for length in lengths) for t in range(c.T)], dtype=torch.int64)
        n = int(batch_sizes.sum())
    wscale = 1.0 / max(hout, 1) ** 0.5
    return dict(
        x=rnd(n, c.I),
        batch_sizes=batch_sizes,
        h0=rnd(c.B, hout),
        c0=rnd(c.B, c.H) if c.mode == "LSTM" else None,
        w_ih=rnd(G * c.H, c.I, scale=1.0 / c.I**0.5),
        w_hh=rnd(G * c.H, hout, scale=wscale),
        b_ih=rnd(G * c.H, scale=0.3) if c.bias else None,
        b_hh=rnd(G * c.H, scale=0.3) if c.bias else None,
        w_hr=rnd(c.proj, c.H, scale=1.0 / c.H**0.5) if c.proj else None,
    )


def run(layer, c: Case, inputs, grad_seed: int = 1, frozen=(), around=contextlib.nullcontext):
    """Outputs of ``layer`` (called inside ``around()``) and the gradients of a random linear function of them
    w.r.t. every input not in ``frozen``."""
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in GRAD_NAMES if inputs[k] is not None
              and k not in frozen}
    args = {k: leaves.get(k, inputs[k]) for k in inputs}
    with around():
        outs = [o for o in layer(c.mode, reverse=c.reverse, **args) if o is not None]
    return _with_grads(outs, leaves, grad_seed)


def _with_grads(outs, leaves: dict, grad_seed: int):
    """``outs`` detached and the gradients of a random linear function of them w.r.t. ``leaves``."""
    g = torch.Generator().manual_seed(grad_seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    # unused inputs (T = 0) get zero gradients, as the fused backends return
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def as_function(impl: Impl, c: Case):
    """``(f, leaves)``: the layer as a function of its differentiable inputs (for gradcheck and gradgradcheck)
    and fresh random leaves for them."""
    inputs = make_inputs(c, impl)
    names = [k for k in GRAD_NAMES if inputs[k] is not None]

    def f(*tensors):
        args = dict(inputs, **dict(zip(names, tensors)))
        return tuple(o for o in impl.layer(c.mode, reverse=c.reverse, **args) if o is not None)

    return f, [inputs[k].clone().requires_grad_() for k in names]


def assert_matches_reference(impl: Impl, c: Case, inputs=None, frozen=(), table: dict = TOL) -> None:
    inputs = inputs if inputs is not None else make_inputs(c, impl)
    outs, grads = run(impl.layer, c, inputs, frozen=frozen)
    ref_outs, ref_grads = run(reference.layer, c, inputs, frozen=frozen)
    assert len(outs) == len(ref_outs) == (3 if c.mode == "LSTM" else 2)
    for name, got, want in zip(("y", "h_n", "c_n"), outs, ref_outs):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        assert_close(got, want, name, table)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], f"d{name}", table)


# A bidirectional layer's reverse direction in a pair (fastrnn.ops.glue): its own tensors, suffixed _r in inputs.
REVERSE = ("h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def pair_inputs(c: Case, impl: Impl) -> Dict[str, Optional[torch.Tensor]]:
    """Both directions' inputs: ``make_inputs`` for the forward one, the reverse one's own tensors from the next
    seed (``<name>_r``), one x and batch_sizes."""
    rev = make_inputs(dataclasses.replace(c, seed=c.seed + 1), impl)
    return dict(make_inputs(c, impl), **{f"{k}_r": rev[k] for k in REVERSE})


def run_pair(pair, c: Case, inputs, grad_seed: int = 1):
    """``run`` for ``pair(a, r)`` (both directions of a bidirectional layer): both directions' outputs, and the
    gradients w.r.t. x and each direction's tensors."""
    leaves = {k: t.detach().clone().requires_grad_() for k, t in inputs.items()
              if t is not None and k != "batch_sizes"}
    args = {k: leaves.get(k, t) for k, t in inputs.items()}
    a = LayerArgs(c.mode, args["x"], args["batch_sizes"], *(args[k] for k in REVERSE), False)
    r = a._replace(**{k: args[f"{k}_r"] for k in REVERSE}, reverse=True)
    return _with_grads([o for out in pair(a, r) for o in out if o is not None], leaves, grad_seed)


def assert_pair_matches_reference(impl: Impl, c: Case, table: dict = TOL) -> None:
    """The backend's ``layer.pair`` against the reference backend run on each direction."""
    inputs = pair_inputs(c, impl)
    outs, grads = run_pair(_backend._module(impl.backend).layer.pair, c, inputs)
    ref_outs, ref_grads = run_pair(lambda a, r: (reference.layer(a), reference.layer(r)), c, inputs)
    names = ("y", "h_n", "c_n")[:3 if c.mode == "LSTM" else 2]
    assert len(outs) == len(ref_outs) == 2 * len(names)
    for name, got, want in zip([n + d for d in ("", "_r") for n in names], outs, ref_outs):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        assert_close(got, want, name, table)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], f"d{name}", table)


@contextlib.contextmanager
def nan_poisoned(impl: Impl):
    """Every output and workspace of the fused kernels starts NaN-filled."""
    if impl.backend == "cpp":
        lib = _backend._module("cpp")._lib()
        lib._set_nan_fill(True)
        try:
            yield
        finally:
            lib._set_nan_fill(False)
        return
    old = os.environ.get("FASTRNN_TRITON_NAN_FILL")
    os.environ["FASTRNN_TRITON_NAN_FILL"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTRNN_TRITON_NAN_FILL"]
        else:
            os.environ["FASTRNN_TRITON_NAN_FILL"] = old


def nn_module(mode: str, I: int, H: int, proj: int, bias: bool, bidirectional: bool):
    kw = dict(bias=bias, bidirectional=bidirectional, dtype=torch.float64)
    if mode == "LSTM":
        return torch.nn.LSTM(I, H, proj_size=proj, **kw)
    if mode == "GRU":
        return torch.nn.GRU(I, H, **kw)
    return torch.nn.RNN(I, H, nonlinearity=mode[4:].lower(), **kw)


@contextlib.contextmanager
def exactly_threads(n: int):
    """torch's intra-op threads set to ``n`` and restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def at_least_threads(n: int):
    """torch's intra-op threads raised to ``n`` (the CPU teams split work by thread) and restored after."""
    return exactly_threads(max(n, torch.get_num_threads()))


@contextlib.contextmanager
def _cpp_test_hook(setter: str, value: int, default: int = 0):
    """One of the cpp extension's test hooks set to ``value``, and back to its default after."""
    hook = getattr(_backend._module("cpp")._lib(), setter)
    hook(value)
    try:
        yield
    finally:
        hook(default)


def backward_chunk_rows(rows: int):
    """The cpp backward's chunk size in rows, so that small problems cross many chunk boundaries."""
    return _cpp_test_hook("_set_chunk_rows", rows)


def engine_steps(steps: int):
    """The steps from which the cpp CPU engine takes a call, with gradients or without (with its rows rule)."""
    return _cpp_test_hook("_set_engine_steps", steps)


def intel_rules(on: bool):
    """The cpp CPU engine's rules measured on an Intel CPU applied (or not) whatever the CPU's vendor."""
    return _cpp_test_hook("_set_intel_rules", int(on), default=-1)


@pytest.fixture
def engine_in_short_training():
    """The cpp CPU engine takes calls from its rows rule alone, so that a file's short sequences test the engine,
    backward included, as long ones would (its steps rules: tests/test_explain.py, with the defaults)."""
    if _backend.reason_unavailable("cpp", torch.device("cpu"), torch.float32) is not None:
        yield
        return
    with engine_steps(1):
        yield


def in_place_share(nbytes: int):
    """The cpp CPU engine's share of W_hh per thread (bytes) from which a one-row forward reads W_hh in place."""
    return _cpp_test_hook("_set_in_place_share", nbytes)


def fresh_values(inputs: Dict[str, Optional[torch.Tensor]], seed: int) -> Dict[str, Optional[torch.Tensor]]:
    """The same shapes, dtypes and batch sizes with other values: every floating-point input scaled element by
    element by a random factor in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)

    def other(t):
        if t is None or not t.is_floating_point():
            return t
        return t * (0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64)).to(t.device, t.dtype)

    return {k: other(v) for k, v in inputs.items()}
