"""fastrnn modules against torch.nn with copied weights: outputs, states and every gradient."""

import contextlib
import copy
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fastrnn
from conftest import TOL, nn_lstm_autocast_error, usable_backends
from fastrnn import backend as _backend
from fastrnn.ops import cpp
from rnn_cases import CELLS, KINDS, compare, random_packed, random_state, twins

BACKENDS = usable_backends()
DTYPES = [torch.float64, torch.float32]
OPTIONS = [
    dict(bias=b, batch_first=bf, bidirectional=bd, num_layers=nl)
    for b, bf, bd, nl in itertools.product([True, False], [False, True], [False, True], [1, 2, 3])
]


def _opt_id(o):
    return "-".join(
        [f"L{o['num_layers']}", "bias" if o["bias"] else "nobias", "bf" if o["batch_first"] else "tm"]
        + (["bidir"] if o["bidirectional"] else [])
    )


def _make_input(ref, form, T, B, dtype):
    feat = ref.input_size
    if form.startswith("packed"):
        return random_packed(T, B, feat, dtype, sorted_=form == "packed_sorted"), B
    if form == "unbatched":
        return torch.randn(T, feat, dtype=dtype), None
    shape = (B, T, feat) if ref.batch_first else (T, B, feat)
    return torch.randn(shape, dtype=dtype), B


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=_opt_id)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_batched(kind, opts, dtype, backend):
    ref, fast = twins(kind, 3, 5, dtype, backend, **opts)
    x, B = _make_input(ref, "batched", 4, 3, dtype)
    compare(ref, fast, x, random_state(ref, 3, dtype), TOL[dtype])


FORMS = ["batched_no_hx", "unbatched", "unbatched_hx", "packed_sorted", "packed_unsorted", "packed_unsorted_hx"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_input_forms(kind, bidirectional, form, dtype, backend):
    ref, fast = twins(kind, 3, 4, dtype, backend, num_layers=2, bidirectional=bidirectional)
    x, B = _make_input(ref, form.replace("_no_hx", "").replace("_hx", ""), 5, 4, dtype)
    hx = random_state(ref, B, dtype, batched=B is not None) if form.endswith("_hx") else None
    compare(ref, fast, x, hx, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_identity_in_eval_and_active_in_training(kind, backend):
    ref, fast = twins(kind, 3, 6, torch.float64, backend, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    compare(ref, fast, x, None, TOL[torch.float64])
    fast.train()
    outs = [fast(x)[0] for _ in range(2)]
    assert not torch.equal(outs[0], outs[1]), "dropout between layers had no effect in training mode"
    fast.eval()
    torch.testing.assert_close(fast(x)[0], ref(x)[0], **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    T=st.integers(1, 9),
    B=st.integers(1, 5),
    I=st.integers(1, 7),
    H=st.sampled_from([1, 2, 3, 7, 16, 33]),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    stride=st.integers(1, 3),
)
def test_property_random_sizes_noncontiguous(kind, backend, T, B, I, H, layers, bidirectional, stride):
    if kind == "lstm_proj" and H < 3:
        H = 3
    ref, fast = twins(kind, I, H, torch.float64, backend, num_layers=layers, bidirectional=bidirectional)
    # every stride-th feature of a wider tensor: a non-contiguous view of fresh data
    x = torch.randn(T, B, I * stride, dtype=torch.float64)[:, :, ::stride]
    assert stride == 1 or not x.is_contiguous()
    compare(ref, fast, x, random_state(ref, B, torch.float64), TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,B,H", [(1, 2, 513), (63, 2, 5), (3, 1, 1)], ids=["T1-H513", "T63", "B1-H1"])
def test_odd_shapes_fp32(kind, backend, T, B, H):
    if kind == "lstm_proj" and H < 3:
        pytest.skip("proj_size=2 needs hidden_size > 2")
    ref, fast = twins(kind, 4, H, torch.float32, backend)
    compare(ref, fast, torch.randn(T, B, 4), random_state(ref, B, torch.float32), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,B", [(0, 3), (4, 0)], ids=["T0", "B0"])
def test_empty_time_or_batch_like_torch(kind, backend, T, B):
    ref, fast = twins(kind, 3, 4, torch.float32, backend)
    x = torch.randn(T, B, 3)
    try:
        expected = ref(x)
    except Exception as exc:
        with pytest.raises(type(exc)):
            fast(x)
        return
    got = fast(x)
    for e, g in zip(expected[:1] + tuple(expected[1] if isinstance(expected[1], tuple) else (expected[1],)),
                    got[:1] + tuple(got[1] if isinstance(got[1], tuple) else (got[1],))):
        assert e.shape == g.shape
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["batched", "batched_no_hx", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", CELLS)
def test_cells_match_torch(cell, bias, form, dtype, backend):
    cls, extra = CELLS[cell]
    ref = cls(5, 6, bias=bias, dtype=dtype, **extra)
    fast = getattr(fastrnn, cls.__name__)(5, 6, bias=bias, dtype=dtype, backend=backend, **extra)
    fast.load_state_dict(ref.state_dict(), strict=True)
    batched = form != "unbatched"
    x = torch.randn((3, 5) if batched else (5,), dtype=dtype)
    shape = (3, 6) if batched else (6,)
    hx = None
    if form != "batched_no_hx":
        hx = (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)) if cls is nn.LSTMCell else torch.randn(shape, dtype=dtype)
    compare(ref, fast, x, hx, TOL[dtype])
    assert repr(fast) == repr(ref)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_and_repr(kind):
    cls, extra = KINDS[kind]
    kw = dict(num_layers=2, bidirectional=True, bias=False, batch_first=True, dropout=0.25, **extra)
    ref = cls(3, 5, **kw)
    fast = getattr(fastrnn, cls.__name__)(3, 5, **kw)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert repr(fast) == repr(ref)
    fast.load_state_dict(ref.state_dict(), strict=True)
    back = cls(3, 5, **kw)
    back.load_state_dict(fast.state_dict(), strict=True)
    for (n, a), (_, b) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kind", KINDS)
def test_initialisation_matches_torch_for_same_seed(kind):
    cls, extra = KINDS[kind]
    torch.manual_seed(123)
    ref = cls(3, 5, num_layers=2, **extra)
    torch.manual_seed(123)
    fast = getattr(fastrnn, cls.__name__)(3, 5, num_layers=2, **extra)
    for (n, a), (m, b) in zip(ref.state_dict().items(), fast.state_dict().items()):
        assert n == m and torch.equal(a, b)


def autocast_reference(kind: str) -> str:
    """torch.nn under autocast, or fp64 where torch.nn's LSTM cannot run under CPU autocast on this CPU."""
    return "fp64" if kind == "lstm" and nn_lstm_autocast_error() else "torch.nn"  # with proj_size it skips oneDNN


@pytest.mark.parametrize("kind, against", [(k, autocast_reference(k)) for k in KINDS])
def test_autocast_runs_in_the_autocast_dtype_like_torch(kind, against):
    """Under CPU autocast a module computes and returns the autocast dtype, as torch.nn does; where torch.nn
    cannot run the case here, fastrnn does, and matches the fp64 module rounded to bf16."""
    ref, fast = twins(kind, 3, 6, torch.float32, "auto", num_layers=2)
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(x)
        expected = ref(x) if against == "torch.nn" else None
    if expected is None:
        with torch.no_grad():
            expected = tuple(o.to(torch.bfloat16) for o in copy.deepcopy(ref).double()(x.double())[:1])
    assert got[0].dtype == expected[0].dtype
    torch.testing.assert_close(got[0], expected[0], **TOL[torch.bfloat16])


needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp backend is not built here")
ONE_CALL_OPTIONS = [dict(bias=True, batch_first=False, bidirectional=False, num_layers=1),
                    dict(bias=True, batch_first=True, bidirectional=True, num_layers=3),
                    dict(bias=False, batch_first=False, bidirectional=True, num_layers=2)]


def _every_output(out) -> list:
    out, state = out
    return [out.data if isinstance(out, PackedSequence) else out, *(state if isinstance(state, tuple) else (state,))]


def _counting(monkeypatch, owner, *names: str) -> list:
    """A list that gets the name of each call of ``owner.<name>`` that returns, for each of ``names`` (a call that
    raises leaves none: the modules then take the op's path)."""
    calls = []

    def counter(name: str, real):
        def counted(*args):
            out = real(*args)
            calls.append(name)
            return out
        return counted

    for name in names:
        monkeypatch.setattr(owner, name, counter(name, getattr(owner, name)))
    return calls


# A module's call without gradients in one C++ call: dense inputs in module_forward, packed ones in stack_forward
ONE_CALL = ("module_forward", "stack_forward")


# (I, H, T, B): small, and one step of one row of layers from 256 KiB (the CPU engine reading both weights in place)
ONE_CALL_SIZES = {"small": (3, 5, 4, 3), "one-step": (65, 260, 1, 1)}


@needs_cpp
@pytest.mark.parametrize("size", ONE_CALL_SIZES)
@pytest.mark.parametrize("form", ["batched", "batched_no_hx", "unbatched", "unbatched_hx", "packed_unsorted_hx"])
@pytest.mark.parametrize("opts", ONE_CALL_OPTIONS, ids=_opt_id)
@pytest.mark.parametrize("kind", KINDS)
def test_layers_in_one_call_without_gradients(kind, opts, form, size, monkeypatch):
    """Without gradients and unwatched, a module of the cpp backend runs all its layers in one C++ call
    (``fastrnn.ops.cpp.module_forward``, packed: ``stack_forward``): once per module call, with the results of the
    per-layer ops (the same call under a function mode, which sends each layer through its op) bit for bit, and
    torch.nn's within the fp32 tolerance."""
    I, H, T, B = ONE_CALL_SIZES[size]
    ref, fast = twins(kind, I, H, torch.float32, "cpp", **opts)
    x, B = _make_input(ref, form.replace("_no_hx", "").replace("_hx", ""), T, B, torch.float32)
    with_hx = form in ("batched", "unbatched_hx", "packed_unsorted_hx")
    hx = random_state(ref, B, torch.float32, batched=B is not None) if with_hx else None
    args = (x,) if hx is None else (x, hx)
    _assert_one_call(ref, fast, args, "cpu", monkeypatch)


def _assert_one_call(ref, fast, args: tuple, device: str, monkeypatch) -> None:
    """``fast(*args)`` without gradients takes the one call exactly once, and returns what it returns under a
    function mode (each layer through its op: bit for bit on the CPU, see ``_same_as_op``) and ``ref``'s results
    within the fp32 tolerance."""
    calls = _counting(monkeypatch, cpp, *ONE_CALL)
    one_call = ["stack_forward" if isinstance(args[0], PackedSequence) else "module_forward"]
    with torch.no_grad():
        got = _every_output(fast(*args))
        assert calls == one_call
        with torch.device(device):
            per_layer = _every_output(fast(*args))
        assert calls == one_call
        want = _every_output(ref(*args))
    same = _same_as_op(device)
    for g, p, w in zip(got, per_layer, want):
        assert same(g, p)
        torch.testing.assert_close(g, w, **TOL[torch.float32])


if torch.cuda.is_available() and "cpp" in usable_backends("cuda"):  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.parametrize("form", ["batched", "packed_unsorted_hx"])
    @pytest.mark.parametrize("kind", KINDS)
    def test_layers_in_one_call_on_cuda(kind, form, monkeypatch):
        """The one C++ call on a CUDA device: once per module call, the per-layer ops' results and torch.nn's
        (cuDNN, TF32 off) within the fp32 tolerance, for a bidirectional two-layer module."""
        ref, fast = twins(kind, 3, 5, torch.float32, "cpp", num_layers=2, bidirectional=True)
        ref, fast = ref.cuda(), fast.cuda()
        x, B = _make_input(ref, form.replace("_hx", ""), 4, 3, torch.float32)
        x = x.to("cuda")
        hx = random_state(ref, B, torch.float32)
        hx = tuple(h.cuda() for h in hx) if isinstance(hx, tuple) else hx.cuda()
        _assert_one_call(ref, fast, (x, hx), "cuda", monkeypatch)


# the backends that run on the GPU here, Triton's included (its kernels compiled, not interpreted)
CUDA_BACKENDS = [b for b in ("cpp", "triton") if torch.cuda.is_available()
                 and _backend.reason_unavailable(b, torch.device("cuda"), torch.float32) is None]

if CUDA_BACKENDS:  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.parametrize("backend", CUDA_BACKENDS)
    @pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
    def test_cuda_graphs_capture_the_modules(kind, backend):
        """A model graphed as users graph one (``torch.cuda.make_graphed_callables``: forward and backward each
        captured once, then replayed): replays with fresh inputs give torch.nn's (cuDNN, TF32 off) outputs and
        every gradient within the fp32 tolerance, for a bidirectional two-layer module in training. Nothing in a
        call may wait on the host or begin a capture of its own inside the user's (Triton's ``cuda_graph`` steps
        aside under a capture); with FASTRNN_PERSISTENT=1 the persistent engine's launches are what is captured."""
        I, H, T, B = 6, 16, 7, 5
        ref, fast = twins(kind, I, H, torch.float32, backend, num_layers=2, bidirectional=True)
        ref, fast = ref.cuda().train(), fast.cuda().train()
        graphed = torch.cuda.make_graphed_callables(fast, (torch.randn(T, B, I, device="cuda", requires_grad=True),))
        for _ in range(2):
            x, weight = torch.randn(T, B, I, device="cuda"), torch.randn(T, B, 2 * H, device="cuda")
            got, want = [], []
            for module, results in ((graphed, got), (ref, want)):
                module.zero_grad(set_to_none=True)
                xi = x.clone().requires_grad_()
                y, _ = module(xi)
                (y * weight).sum().backward()
                results += [y.detach(), xi.grad, *(p.grad for p in module.parameters())]
            assert len(got) == len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **TOL[torch.float32])


def _frozen(module):
    return module.requires_grad_(False)


# Calls that must run layer by layer (each through its op, or the reference backend's): what the one C++ call
# cannot do, or would hide from a watcher.
PER_LAYER = {
    "packed-with-gradients": (lambda m: m, contextlib.nullcontext, True),
    "the-profiler": (_frozen, torch.profiler.profile, False),
    "a-function-mode": (_frozen, lambda: torch.device("cpu"), False),
    "autocast": (_frozen, lambda: torch.autocast("cpu", dtype=torch.bfloat16), False),
    "layer-norm": (lambda m: m, contextlib.nullcontext, False),
    "zoneout-in-eval": (lambda m: m, contextlib.nullcontext, False),
    "reference-backend": (lambda m: m, contextlib.nullcontext, False),
}


@needs_cpp
@pytest.mark.parametrize("case", PER_LAYER)
def test_layers_one_by_one_where_watched_or_needed(case, monkeypatch):
    """A packed input with gradients, the profiler, a function mode or autocast, fastrnn's own cells or another
    backend: a module runs its layers one by one; the same module frozen, in eval and unwatched (where the case
    allows) takes the one call."""
    prepare, context, grad = PER_LAYER[case]
    extra = {"layer_norm": True} if case == "layer-norm" else {"zoneout": 0.3} if case == "zoneout-in-eval" else {}
    backend = "reference" if case == "reference-backend" else "cpp"
    module = prepare(fastrnn.GRU(3, 5, num_layers=2, dropout=0.5, backend=backend, **extra).eval())
    one_call = _counting(monkeypatch, cpp, *ONE_CALL)
    x = random_packed(4, 2, 3, torch.float32) if case.startswith("packed") else torch.randn(4, 2, 3)
    with torch.set_grad_enabled(grad), context():
        module(x)
    assert one_call == []
    module.requires_grad_(False).eval()
    with torch.set_grad_enabled(grad):
        module(x)
    one = "stack_forward" if case.startswith("packed") else "module_forward"
    assert one_call == ([] if extra or backend != "cpp" else [one])


def _graph_nodes(t: torch.Tensor) -> list:
    """The names of the autograd nodes ``t`` was computed by."""
    names, seen, todo = [], set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        todo.extend(f for f, _ in node.next_functions)
    return names


@needs_cpp
@pytest.mark.parametrize("frozen", [False, True], ids=["", "l0-frozen"])
@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
@pytest.mark.parametrize("kind", KINDS)
def test_training_calls_in_one_call(kind, bidirectional, dropout, frozen, monkeypatch):
    """A dense training call, unwatched, runs in the one C++ call (``cpp.module_forward``) with each layer that
    needs gradients a node of csrc/rnn.cpp (``PairNode`` for a bidirectional one, one ``LayerNode`` per direction
    where only one direction needs them: here the first layer's forward direction frozen) and dropout between
    layers: outputs and every gradient bit for bit those of the per-layer ops (the same call under a function mode;
    dropout's masks from the same generator state), and torch.nn's within the fp32 tolerance."""
    ref, fast = twins(kind, 3, 5, torch.float32, "cpp", num_layers=2, bidirectional=bidirectional, dropout=dropout)
    ref.train(), fast.train()
    for m in (ref, fast):
        for name, p in m.named_parameters():
            p.requires_grad_(not (frozen and name.endswith("_l0")))
    one_call = _counting(monkeypatch, cpp, *ONE_CALL)
    x = torch.randn(4, 2, 3, requires_grad=not frozen)

    def run(module, watched: bool) -> list:
        torch.manual_seed(0)
        with torch.device("cpu") if watched else contextlib.nullcontext():
            out = _flat_outputs(module(x, random_state(module, 2, torch.float32)))
            wrt = [t for t in (x, *module.parameters()) if t.requires_grad]
            grads = torch.autograd.grad(out, wrt, [torch.ones_like(o) for o in out])
        return [out, list(grads)]

    got = run(fast, False)
    assert one_call == ["module_forward"]
    nodes = _graph_nodes(got[0][0])
    if frozen and bidirectional:  # the first layer's reverse direction alone, then both of the second
        assert sum("LayerNode" in n for n in nodes) == 1 and sum("PairNode" in n for n in nodes) == 1
    else:
        node = "PairNode" if bidirectional else "LayerNode"
        assert sum(node in name for name in nodes) == (1 if frozen else 2)
    via_op = run(fast, True)
    assert one_call == ["module_forward"]
    want = run(ref, False)
    for g, o, w in zip(sum(got, []), sum(via_op, []), sum(want, [])):
        assert torch.equal(g, o)
        if not dropout:
            torch.testing.assert_close(g, w, **TOL[torch.float32])


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_parameter_gets_the_per_layer_error(kind):
    """A parameter of the wrong dtype or device: the one call fails, and the module raises what the per-layer ops
    raise (naming the parameter where it is on another device), not the C++ call's own message."""
    _, fast = twins(kind, 3, 5, torch.float32, "cpp", num_layers=2)
    x = torch.randn(4, 2, 3)
    for name, broken in (("weight_hh_l1", torch.float64), ("weight_ih_l1", "meta")):
        good = getattr(fast, name)
        setattr(fast, name, nn.Parameter(good.detach().to(broken)))
        with torch.no_grad():
            with pytest.raises(RuntimeError) as one_call:
                fast(x)
            with torch.device("cpu"), pytest.raises(RuntimeError) as per_layer:
                fast(x)
        setattr(fast, name, good)
        assert str(one_call.value) == str(per_layer.value)
        assert (name if broken == "meta" else "w_hh must have dtype torch.float32") in str(one_call.value)


# the C++ entry points' tests: on CUDA (collected with a GPU) the two paths agree within the fp32 tolerance, as
# cuBLAS may pick another algorithm between two calls
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


def _same_as_op(device: str):
    return torch.equal if device == "cpu" else (lambda g, o: torch.testing.assert_close(g, o) or True)


@needs_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["zero-state", "state", "unbatched"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("size", ONE_CALL_SIZES)
@pytest.mark.parametrize("cell", CELLS)
def test_unwatched_cells_skip_the_op(cell, size, grad, form, device, monkeypatch):
    """An unwatched cell call goes to the C++ in one entry (``cpp.cell_forward``; with gradients csrc/rnn.cpp's
    autograd node ``LayerNode``), with the op path's outputs and gradients (bit for bit on the CPU) and torch.nn's
    within the fp32 tolerance, for ``hx`` absent, given (its gradients too) and unbatched; a watched call (here a
    function mode) takes the op, and the node's backward watched hands over to the op's formula, with the same
    gradients."""
    I, H, _, B = ONE_CALL_SIZES[size]
    cls, extra = CELLS[cell]
    ref = cls(I, H, device=device, **extra)
    fast = getattr(fastrnn, cls.__name__)(I, H, backend="cpp", device=device, **extra)
    fast.load_state_dict(ref.state_dict())
    direct = _counting(monkeypatch, cpp, "cell_forward")
    lead = () if form == "unbatched" else (B,)
    x = torch.randn(*lead, I, device=device, requires_grad=grad)
    states = [torch.randn(*lead, H, device=device, requires_grad=grad) for _ in range(2 if cls is nn.LSTMCell else 1)]
    args = (x,) if form == "zero-state" else (x, tuple(states) if len(states) == 2 else states[0])
    inputs = [x] if form == "zero-state" else [x, *states]

    def watched(on: bool):
        return torch.device(device) if on else contextlib.nullcontext()

    def run(module, watched_forward: bool, watched_backward: bool) -> list:
        with torch.set_grad_enabled(grad), watched(watched_forward):
            out = module(*args)
        out = list(out) if isinstance(out, tuple) else [out]
        if grad:
            with watched(watched_backward):
                grads = torch.autograd.grad(out, [*inputs, *module.parameters()], [torch.ones_like(o) for o in out])
            out += list(grads)
        return out

    got = run(fast, False, False)
    assert direct == ["cell_forward"]
    if grad:
        node = got[0].grad_fn
        if form == "unbatched":
            assert "Squeeze" in node.name()
            node = node.next_functions[0][0]
        assert "LayerNode" in node.name()
    via_op = run(fast, True, True)
    assert direct == ["cell_forward"]
    via_formula = run(fast, False, True)
    want = run(ref, False, False)
    assert len(got) == len(via_op) == len(via_formula) == len(want)
    same = _same_as_op(device)
    for g, o, f, w in zip(got, via_op, via_formula, want):
        assert g.shape == w.shape
        assert same(g, o)
        assert same(g, f)
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@needs_cpp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("kind", KINDS)
def test_unwatched_bidirectional_training_takes_the_pair_node(kind, packed, device, monkeypatch):
    """A bidirectional layer in training, unwatched, runs both directions in csrc/rnn.cpp's ``PairNode`` (packed:
    ``cpp.pair_forward``, dense: in the module's one call, ``cpp.module_forward``): outputs and every gradient
    those of the pair op (a watched call; bit for bit on the CPU) and torch.nn's within the fp32 tolerance; so are
    the gradients of the reverse directions' parameters alone (the node's backward asked for one direction)."""
    ref, fast = (m.to(device) for m in twins(kind, 3, 5, torch.float32, "cpp", num_layers=2, bidirectional=True))
    calls = _counting(monkeypatch, cpp, "pair_forward", "module_forward")
    x = random_packed(6, 4, 3, torch.float32) if packed else torch.randn(6, 4, 3)
    x = x.to(device)
    data = x.data if packed else x
    data.requires_grad_()

    def run(module, watched: bool) -> list:
        with torch.device(device) if watched else contextlib.nullcontext():
            out = _flat_outputs(module(x))
            params = [data, *module.parameters()]
            return out + list(torch.autograd.grad(out, params, [torch.ones_like(o) for o in out]))

    got = run(fast, False)
    assert calls == (["pair_forward"] * 2 if packed else ["module_forward"])
    assert sum("PairNode" in name for name in _graph_nodes(got[0])) == 2
    via_op = run(fast, True)
    assert len(calls) == (2 if packed else 1)
    want = run(ref, False)
    assert len(got) == len(via_op) == len(want)
    same = _same_as_op(device)
    for g, o, w in zip(got, via_op, want):
        assert same(g, o)
        torch.testing.assert_close(g, w, **TOL[torch.float32])
    reverse = {m: [p for n, p in m.named_parameters() if n.endswith("_reverse")] for m in (fast, ref)}
    alone = {m: torch.autograd.grad(_flat_outputs(m(x))[0].sum(), reverse[m]) for m in (fast, ref)}
    assert len(calls) == (4 if packed else 2)
    for g, w in zip(alone[fast], alone[ref], strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def _flat_outputs(out) -> list:
    """A sequence module's output rows and final states as a flat list of tensors."""
    y, h = out
    return [y.data if isinstance(y, PackedSequence) else y, *(h if isinstance(h, tuple) else (h,))]


@needs_cpp
@pytest.mark.parametrize("cell", CELLS)
def test_the_cpp_node_saves_through_autograd(cell):
    """The C++ node saves through autograd's saved variables: ``saved_tensors_hooks`` pack every tensor it saves
    (offloaded as copies, the gradients do not change) and a non-reentrant checkpoint recomputes it; a cell
    whose only used output is the last (LSTM's c) gets that output's gradient alone."""
    cls, extra = CELLS[cell]
    fast = getattr(fastrnn, cls.__name__)(4, 6, backend="cpp", **extra)
    x = torch.randn(3, 4, requires_grad=True)
    params = [x, *fast.parameters()]

    def loss(inp):
        out = fast(inp)
        return (out[-1] if isinstance(out, tuple) else out).sum()  # a sum saves no tensor of its own

    first = fast(x)
    assert "LayerNode" in (first[0] if isinstance(first, tuple) else first).grad_fn.name()
    want = torch.autograd.grad(loss(x), params)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: unpacked.append(t) or t):
        offloaded = torch.autograd.grad(loss(x), params)
    assert any(t is x for t in packed) and any(t is fast.weight_hh for t in packed)
    # x, h0, (c0), w_ih, w_hh, b_ih, b_hh, y, gates, c, hn: all that is defined of the op's saved tensors, each read
    assert len(packed) == len(unpacked) == (11 if cell == "lstm_cell" else 10)
    recomputed = torch.autograd.grad(torch.utils.checkpoint.checkpoint(loss, x, use_reentrant=False), params)
    for w, o, r in zip(want, offloaded, recomputed, strict=True):
        assert torch.equal(w, o)
        assert torch.equal(w, r)


class _Counted(nn.Module):
    """An identity parametrization that counts its evaluations."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return w


@needs_cpp
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_parametrized_weight_is_computed_once_per_call(grad, monkeypatch):
    """A parametrization (spectral_norm's power iteration, say) runs once per module call whichever path the
    call takes: the one C++ call without gradients, the per-layer ops with them."""
    module = fastrnn.LSTM(3, 5, num_layers=2, backend="cpp")
    counted = _Counted()
    torch.nn.utils.parametrize.register_parametrization(module, "weight_hh_l1", counted)
    counted.calls = 0  # registering evaluates it once
    one_call = _counting(monkeypatch, cpp, *ONE_CALL)
    with torch.set_grad_enabled(grad):
        module(torch.randn(4, 2, 3))
    assert counted.calls == 1 and one_call == ([] if grad else ["stack_forward"])
