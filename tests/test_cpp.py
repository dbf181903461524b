"""The "cpp" backend (fastrnn._C, CPU kernels) against fastrnn.ops.reference, torch.nn and gradcheck."""

import contextlib
import itertools
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional

import pytest
import torch

from fastrnn.ops import GATES, MODES
from fastrnn.ops import cpp, reference

pytestmark = pytest.mark.skipif(
    cpp.availability(torch.device("cpu"), torch.float32) is not None,
    reason=f"cpp backend unavailable: {cpp.availability(torch.device('cpu'), torch.float32)}",
)

# fp32: the kernels' polynomial exp/tanh (~2 ulp) and a different GEMM summation order than the reference
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}
NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


@dataclass
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
    dtype: torch.dtype = torch.float64
    seed: int = 0


def make_inputs(c: Case) -> Dict[str, Optional[torch.Tensor]]:
    """Random inputs (never zeros); packed cases get sorted lengths with ragged ends, the longest = T."""
    g = torch.Generator().manual_seed(c.seed)
    G, hout = GATES[c.mode], c.proj or c.H

    def rnd(*shape, scale=0.6):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(c.dtype)

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


def run(impl, c: Case, inputs, grad_seed: int = 1, frozen=()):
    """Outputs of impl.layer and the gradients of a random linear function of them w.r.t. every input not in
    `frozen`."""
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in NAMES if inputs[k] is not None
              and k not in frozen}
    args = {k: leaves.get(k, inputs[k]) for k in inputs}
    outs = [o for o in impl.layer(c.mode, reverse=c.reverse, **args) if o is not None]
    g = torch.Generator().manual_seed(grad_seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    # unused inputs (T = 0) get zero gradients, as the cpp backend returns
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def assert_matches_reference(c: Case, inputs=None, frozen=()):
    inputs = inputs if inputs is not None else make_inputs(c)
    outs, grads = run(cpp, c, inputs, frozen=frozen)
    ref_outs, ref_grads = run(reference, c, inputs, frozen=frozen)
    for name, got, want in zip(("y", "h_n", "c_n"), outs, ref_outs):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        torch.testing.assert_close(got, want, **TOL[c.dtype], msg=lambda m, n=name: f"{n}: {m}")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL[c.dtype], msg=lambda m, n=name: f"d{n}: {m}")


def case_id(c: Case) -> str:
    parts = [c.mode, f"T{c.T}B{c.B}I{c.I}H{c.H}", "fp32" if c.dtype == torch.float32 else "fp64"]
    parts += [f"proj{c.proj}"] if c.proj else []
    parts += ["bias" if c.bias else "nobias", "packed" if c.packed else "dense"]
    parts += ["reverse"] if c.reverse else []
    return "-".join(parts)


def option_cases(dtypes, T, B, I, H, P):
    for mode, dtype, bias, packed, reverse in itertools.product(
        MODES, dtypes, (True, False), (False, True), (False, True)
    ):
        for proj in (0, P) if mode == "LSTM" else (0,):
            yield Case(mode, T, B, I, H, proj, bias, packed, reverse, dtype)


MATRIX = list(option_cases((torch.float32, torch.float64), T=7, B=5, I=4, H=8, P=3))


@pytest.mark.parametrize("c", MATRIX, ids=case_id)
def test_matches_reference(c):
    assert_matches_reference(c)


@contextlib.contextmanager
def backward_chunk_rows(rows: int):
    cpp._lib()._set_chunk_rows(rows)
    try:
        yield
    finally:
        cpp._lib()._set_chunk_rows(0)


CHUNKED = list(option_cases((torch.float64,), T=9, B=4, I=3, H=5, P=2))


@pytest.mark.parametrize("c", CHUNKED, ids=case_id)
def test_backward_across_chunks(c):
    """The backward flushes dgates into dx/dW every ~1024 rows; 6-row chunks put many flushes, and the dense
    h_prev shortcut at the first/last chunk, into a small problem."""
    with backward_chunk_rows(6):
        assert_matches_reference(c)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_empty_sequence(mode, packed):
    """T = 0: y is empty, the state passes through and the gradients are those of the identity."""
    c = Case(mode, 1, 3, 2, 4, packed=packed)
    inputs = make_inputs(c)
    inputs["x"] = inputs["x"][:0]
    if packed:
        inputs["batch_sizes"] = inputs["batch_sizes"][:0]
    assert_matches_reference(c, inputs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("frozen", [("x",), ("x", "w_ih", "b_ih"), ("h0", "c0", "w_hh")], ids="-".join)
def test_partial_requires_grad(mode, frozen):
    """Inputs without requires_grad (data fed to a first layer: backward skips the dx GEMM) leave the other
    gradients unchanged."""
    assert_matches_reference(Case(mode, 6, 4, 3, 5, proj=2 if mode == "LSTM" else 0, packed=True), frozen=frozen)


ODD = [
    Case("LSTM", 1, 3, 4, 5),
    Case("GRU", 63, 2, 3, 4, packed=True),
    Case("RNN_TANH", 63, 2, 3, 4, reverse=True),
    Case("LSTM", 6, 3, 2, 1, proj=1, packed=True),
    Case("GRU", 5, 3, 2, 1),
    Case("RNN_RELU", 5, 3, 2, 1, packed=True, reverse=True),
    Case("LSTM", 3, 2, 5, 513, dtype=torch.float32),
    Case("GRU", 3, 2, 5, 513, packed=True, reverse=True, dtype=torch.float32),
    Case("RNN_TANH", 2, 2, 3, 513, dtype=torch.float32),
    Case("LSTM", 9, 1, 4, 7, proj=2, reverse=True),
    Case("GRU", 9, 1, 4, 7, packed=True),
    Case("RNN_RELU", 9, 1, 4, 7, dtype=torch.float32),
]


@pytest.mark.parametrize("c", ODD, ids=case_id)
def test_odd_shapes(c):
    assert_matches_reference(c)


@pytest.mark.parametrize("mode", MODES)
def test_noncontiguous_inputs(mode):
    """Views made by slicing (strided rows and columns) give what their contiguous copies give."""
    c = Case(mode, 6, 3, 4, 5, proj=3 if mode == "LSTM" else 0, packed=True)
    dense = make_inputs(c)

    def strided(t):
        if t is None or t.dtype == torch.int64:
            return t
        wide = torch.randn(*(2 * s for s in t.shape), dtype=t.dtype)
        view = wide[(slice(None, None, 2),) * t.dim()]
        view.copy_(t)
        assert not view.is_contiguous()
        return view

    assert_matches_reference(c, {k: strided(v) for k, v in dense.items()})


@contextlib.contextmanager
def nan_poisoned_workspaces():
    cpp._lib()._set_nan_fill(True)
    try:
        yield
    finally:
        cpp._lib()._set_nan_fill(False)


@pytest.mark.parametrize(
    "c",
    [
        Case("LSTM", 5, 4, 3, 6, proj=2, packed=True),
        Case("LSTM", 5, 4, 3, 6, reverse=True),
        Case("GRU", 5, 4, 3, 6, packed=True, reverse=True),
        Case("GRU", 5, 4, 3, 6, bias=False),
        Case("RNN_TANH", 5, 4, 3, 6, packed=True),
        Case("RNN_RELU", 5, 4, 3, 6, reverse=True),
    ],
    ids=case_id,
)
@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_nan_poisoned_workspaces_do_not_leak(c, grad):
    """Every output and workspace starts NaN-filled: any element the kernels forget to write shows up."""
    inputs = make_inputs(c)
    with nan_poisoned_workspaces():
        if grad:
            assert_matches_reference(c, inputs)
            return
        with torch.no_grad():
            got = cpp.layer(c.mode, reverse=c.reverse, **inputs)
    want = reference.layer(c.mode, reverse=c.reverse, **inputs)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, **TOL[c.dtype])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_inference_matches_training_path(mode, packed):
    """no_grad skips saving activations (GRU keeps W_hn h + b_hn in its step workspace instead)."""
    c = Case(mode, 6, 4, 3, 5, proj=2 if mode == "LSTM" else 0, packed=packed)
    inputs = make_inputs(c)
    with torch.no_grad():
        got = cpp.layer(c.mode, reverse=False, **inputs)
    want = reference.layer(c.mode, reverse=False, **inputs)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, **TOL[c.dtype])


@pytest.mark.parametrize("mode", MODES)
def test_autocast_region_does_not_change_the_dtype(mode):
    """Inside torch.autocast the ops still compute in their inputs' dtype (the caller casts, as the modules do)."""
    c = Case(mode, 5, 3, 4, 6, proj=2 if mode == "LSTM" else 0, packed=True, dtype=torch.float32)
    inputs = make_inputs(c)
    want, want_grads = run(reference, c, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = run(cpp, c, inputs)
    for g, w in zip(got + list(got_grads.values()), want + list(want_grads.values())):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, **TOL[c.dtype])


GRADCHECK = list(option_cases((torch.float64,), T=3, B=3, I=2, H=2, P=1))


@pytest.mark.parametrize("c", GRADCHECK, ids=case_id)
def test_gradcheck(c):
    inputs = make_inputs(c)
    names = [k for k in NAMES if inputs[k] is not None]

    def f(*tensors):
        args = dict(inputs, **dict(zip(names, tensors)))
        return tuple(o for o in cpp.layer(c.mode, reverse=c.reverse, **args) if o is not None)

    leaves = [inputs[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def nn_module(mode: str, I: int, H: int, proj: int, bias: bool, bidirectional: bool):
    if mode == "LSTM":
        return torch.nn.LSTM(I, H, bias=bias, proj_size=proj, bidirectional=bidirectional, dtype=torch.float64)
    if mode == "GRU":
        return torch.nn.GRU(I, H, bias=bias, bidirectional=bidirectional, dtype=torch.float64)
    return torch.nn.RNN(I, H, bias=bias, nonlinearity=mode[4:].lower(), bidirectional=bidirectional,
                        dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_matches_torch_nn_bidirectional(mode, packed):
    """Both directions of a bidirectional torch.nn layer, dense and packed, in fp64."""
    T, B, I, H = 6, 4, 3, 5
    proj = 2 if mode == "LSTM" else 0
    torch.manual_seed(3)
    m = nn_module(mode, I, H, proj, True, True)
    hout = proj or H
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(2, B, hout, dtype=torch.float64)
    c0 = torch.randn(2, B, H, dtype=torch.float64)
    hx = (h0, c0) if mode == "LSTM" else h0
    lengths = torch.tensor([6, 5, 5, 2])
    if packed:
        seq = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        out, hn = m(seq, hx)
        y_nn = out.data
        rows, batch_sizes = seq.data, seq.batch_sizes
    else:
        out, hn = m(x, hx)
        y_nn = out.reshape(T * B, 2 * hout)
        rows, batch_sizes = x.reshape(T * B, I), None
    h_nn, c_nn = hn if mode == "LSTM" else (hn, None)
    for d, sfx in enumerate(("", "_reverse")):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        p = {n: getattr(m, f"{n}_l0{sfx}", None) for n in names}
        y, h_n, c_n = cpp.layer(mode, rows, batch_sizes, h0[d], c0[d] if mode == "LSTM" else None, p["weight_ih"],
                                p["weight_hh"], p["bias_ih"], p["bias_hh"], p["weight_hr"], d == 1)
        torch.testing.assert_close(y, y_nn[:, d * hout:(d + 1) * hout], **TOL[torch.float64])
        torch.testing.assert_close(h_n, h_nn[d], **TOL[torch.float64])
        if mode == "LSTM":
            torch.testing.assert_close(c_n, c_nn[d], **TOL[torch.float64])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("mode", MODES)
def test_long_sequence_matches_torch_nn(mode):
    """T = 10,000 (so the backward's row chunks are flushed many times): fp64 matches torch.nn's fp64 autograd
    elementwise; fp32 stays finite, its outputs match elementwise and its gradients, sums over 20,000 rows
    whose fp32 rounding grows with the row count in any summation order, match in relative norm."""
    T, B, I, H = 10_000, 2, 3, 4
    proj = 3 if mode == "LSTM" else 0
    torch.manual_seed(5)
    m = nn_module(mode, I, H, proj, True, False)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(1, B, proj or H, dtype=torch.float64)
    c0 = torch.randn(1, B, H, dtype=torch.float64)
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"] + (["weight_hr_l0"] if proj else [])
    states = [x, h0, c0] if mode == "LSTM" else [x, h0]
    weights = [getattr(m, n).detach() for n in names]
    gy = torch.randn(T * B, proj or H, dtype=torch.float64)

    def loss_and_grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in states + weights]
        outs = fn(leaves)
        loss = (outs[0] * gy.to(dtype)).sum() + sum(o.sum() for o in outs[1:])
        return [o.detach() for o in outs], torch.autograd.grad(loss, leaves)

    def nn_fn(leaves):
        ref = nn_module(mode, I, H, proj, True, False)
        for n, w in zip(names, leaves[len(states):]):
            delattr(ref, n)
            setattr(ref, n, w)
        hx = tuple(leaves[1:3]) if mode == "LSTM" else leaves[1]
        out, hn = ref(leaves[0], hx)
        return [out.reshape(T * B, -1)] + [h[0] for h in (hn if mode == "LSTM" else (hn,))]

    def cpp_fn(leaves):
        xs, h, c = leaves[0], leaves[1][0], leaves[2][0] if mode == "LSTM" else None
        w = leaves[len(states):] + ([] if proj else [None])
        y, h_n, c_n = cpp.layer(mode, xs.reshape(T * B, I), None, h, c, *w, False)
        return [y, h_n] + ([c_n] if mode == "LSTM" else [])

    want, want_grads = loss_and_grads(nn_fn, torch.float64)
    got, got_grads = loss_and_grads(cpp_fn, torch.float64)
    for g, w in zip(got + list(got_grads), want + list(want_grads)):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    got32, got32_grads = loss_and_grads(cpp_fn, torch.float32)
    for g, w in zip(got32, want):
        torch.testing.assert_close(g, w.float(), **TOL[torch.float32])
    for name, g, w in zip(["x", "h0", "c0"][: len(states)] + names, got32_grads, want_grads):
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        assert relative_error(g, w) < 1e-4, f"d{name}: relative error {relative_error(g, w):.2e}"


def _bad(**changes):
    def mutate(inputs):
        out = dict(inputs)
        for k, v in changes.items():
            out[k] = v(inputs) if callable(v) else v
        return out

    return mutate


BAD = {
    "h0-shape": ("LSTM", _bad(h0=lambda a: a["h0"][:, :-1]), "h0 must have shape"),
    "c0-missing": ("LSTM", _bad(c0=None), "c0 is required"),
    "c0-for-gru": ("GRU", _bad(c0=lambda a: torch.randn(4, 5)), "c0 must be None"),
    "w_ih-shape": ("GRU", _bad(w_ih=lambda a: a["w_ih"][:, :-1]), "w_ih must have shape"),
    "w_hh-rows": ("LSTM", _bad(w_hh=lambda a: a["w_hh"][:-1]), "w_hh must be 2-D"),
    "w_ih-dtype": ("RNN_TANH", _bad(w_ih=lambda a: a["w_ih"].double()), "w_ih must have dtype"),
    "b_hh-shape": ("GRU", _bad(b_hh=lambda a: a["b_hh"][:-1]), "b_hh must have shape"),
    "w_hr-for-gru": ("GRU", _bad(w_hr=lambda a: torch.randn(2, 5)), "w_hr (proj_size) is only supported for LSTM"),
    "x-3d": ("LSTM", _bad(x=lambda a: a["x"].reshape(3, -1, 3)), "x must be 2-D"),
    "x-int": ("RNN_RELU", _bad(x=lambda a: a["x"].long()), "x must be a floating-point"),
    "x-half-on-cpu": ("GRU", _bad(**{k: (lambda a, k=k: a[k].half()) for k in ("x", "h0", "w_ih", "w_hh", "b_ih",
                                                                            "b_hh")}),
                      "cpp backend unavailable: the CPU kernels support"),
    "x-rows": ("LSTM", _bad(x=lambda a: a["x"][:-1]), "dense x must have T*B rows"),
    "batch_sizes-increasing": ("GRU", _bad(batch_sizes=torch.tensor([2, 4, 4]), x=lambda a: a["x"][:10]),
                               "batch_sizes must be non-increasing"),
    "batch_sizes-sum": ("GRU", _bad(batch_sizes=torch.tensor([4, 4, 3])), "batch_sizes sum to 11"),
    "batch_sizes-dtype": ("LSTM", _bad(batch_sizes=torch.tensor([4, 4, 4], dtype=torch.int32)),
                          "batch_sizes must be a 1-D int64 CPU tensor"),
    "batch_sizes-too-big": ("RNN_TANH", _bad(batch_sizes=torch.tensor([6, 6])), "within [1, B = 4]"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_the_argument(name):
    mode, mutate, message = BAD[name]
    inputs = mutate(make_inputs(Case(mode, 3, 4, 3, 5, dtype=torch.float32)))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cpp.layer(mode, reverse=False, **inputs)


def test_bad_mode_raises():
    inputs = make_inputs(Case("RNN_TANH", 3, 4, 3, 5, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="mode must be one of"):
        cpp.layer("RNN_SIGMOID", reverse=False, **inputs)


def test_availability():
    assert cpp.availability(torch.device("cpu"), torch.float32) is None
    assert cpp.availability(torch.device("cpu"), torch.float64) is None
    assert "float32 and float64" in cpp.availability(torch.device("cpu"), torch.float16)
    cuda = torch.device("cuda")
    if cpp._build_info().get("with_cuda"):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            assert cpp.availability(cuda, dtype) is None
        assert "float16 and bfloat16" in cpp.availability(cuda, torch.int32)
    else:
        assert "without CUDA" in cpp.availability(cuda, torch.float32)
    assert "no kernels" in cpp.availability(torch.device("meta"), torch.float32)


# ------------------------------------------------------------------------------------------------------
# torch.compile through the lead's modules: the custom ops must trace without graph breaks.

HAVE_MODULES = os.path.exists(os.path.join(os.path.dirname(__file__), "..", "fastrnn", "modules.py"))


def compile_models():
    import fastrnn

    return {
        "LSTM": lambda: fastrnn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, backend="cpp"),
        "GRU": lambda: fastrnn.GRU(3, 5, num_layers=2, bidirectional=True, backend="cpp"),
        "RNN": lambda: fastrnn.RNN(3, 5, nonlinearity="relu", backend="cpp"),
        "LSTMCell": lambda: fastrnn.LSTMCell(3, 5, backend="cpp"),
        "GRUCell": lambda: fastrnn.GRUCell(3, 5, backend="cpp"),
        "RNNCell": lambda: fastrnn.RNNCell(3, 5, backend="cpp"),
    }


class Head(torch.nn.Module):
    """A small model around one recurrent module: linear -> rnn -> sum of every output."""

    def __init__(self, rnn):
        super().__init__()
        self.inp = torch.nn.Linear(3, 3, dtype=torch.float64)
        self.rnn = rnn

    def forward(self, x):
        out = self.rnn(torch.tanh(self.inp(x)))
        flat = []
        stack = [out]
        while stack:
            o = stack.pop()
            if isinstance(o, (tuple, list)):
                stack.extend(o)
            else:
                flat.append(o.sum())
        return torch.stack(flat).sum()


@pytest.mark.skipif(not HAVE_MODULES, reason="fastrnn/modules.py not written yet")
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_torch_compile_no_graph_breaks(kind):
    import torch._dynamo

    torch.manual_seed(0)
    model = Head(compile_models()[kind]().double())
    x = torch.randn(4, 2, 3, dtype=torch.float64) if "Cell" not in kind else torch.randn(2, 3, dtype=torch.float64)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    eager = model(x)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, eager, **TOL[torch.float64])
    for g, e in zip(got_grads, eager_grads):
        torch.testing.assert_close(g, e, **TOL[torch.float64])
