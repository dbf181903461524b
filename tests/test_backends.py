"""The layer contract (``fastrnn.ops``) for every backend x device x dtype that runs here, against the reference
backend, torch.nn and gradcheck. Ids read ``<backend>[.<variant>]-<device>-<dtype>-<case>``."""

import contextlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TOL, assert_close
from fastrnn import backend as _backend
from fastrnn.ops import MODES, LayerArgs, Saved, reference
from layer_cases import (Case, Impl, as_function, assert_matches_reference, backward_chunk_rows,  # noqa: F401
                         engine_in_short_training, impls, make_inputs, nan_poisoned, nn_module, option_cases, params,
                         run)

pytestmark = pytest.mark.usefixtures("engine_in_short_training")

FUSED = impls()
FP64 = [i for i in FUSED if i.dtype == torch.float64]
WIDE = [i for i in FUSED if i.dtype in (torch.float64, torch.float32)]
CPP_CPU64 = [i for i in FP64 if i.backend == "cpp" and i.device == "cpu"]


@pytest.mark.parametrize("impl, c", params(FUSED, option_cases(T=7, B=5, I=4, H=8, P=3)))
def test_matches_reference(impl, c):
    assert_matches_reference(impl, c)


ODD = [
    Case("LSTM", 1, 3, 4, 5),
    Case("GRU", 63, 2, 3, 4, packed=True),
    Case("RNN_TANH", 63, 2, 3, 4, reverse=True),
    Case("LSTM", 6, 3, 2, 1, proj=1, packed=True),
    Case("GRU", 5, 3, 2, 1),
    Case("RNN_RELU", 5, 3, 2, 1, packed=True, reverse=True),
    Case("LSTM", 3, 2, 5, 513),
    Case("GRU", 3, 2, 5, 513, packed=True, reverse=True),
    Case("RNN_TANH", 2, 2, 3, 513),
    Case("LSTM", 9, 1, 4, 7, proj=2, reverse=True),
    Case("GRU", 9, 1, 4, 7, packed=True),
    Case("RNN_RELU", 9, 1, 4, 7),
    Case("RNN_RELU", 3, 2, 4, 9, packed=True),
    # 40 rows: two 32-row tiles shrinking to one; H=40: two hidden slices and two reduction chunks (Triton)
    Case("LSTM", 3, 40, 3, 40, packed=True, reverse=True),
    Case("GRU", 3, 40, 3, 40, packed=True),
]


@pytest.mark.parametrize("impl, c", params(FUSED, ODD))
def test_odd_shapes(impl, c):
    assert_matches_reference(impl, c)


def _no_steps(inputs, c: Case):
    if c.packed:
        inputs["batch_sizes"] = inputs["batch_sizes"][:0]
    inputs["x"] = inputs["x"][:0]
    return inputs


@pytest.mark.parametrize("impl, c", params(FUSED, [Case(m, 1, 3, 2, 4, packed=p) for m in MODES for p in (0, 1)]))
def test_empty_sequence(impl, c):
    """T = 0: y is empty, the state passes through and the gradients are those of the identity."""
    assert_matches_reference(impl, c, _no_steps(make_inputs(c, impl), c))


FROZEN = [("x",), ("x", "w_ih", "b_ih"), ("h0", "c0", "w_hh")]


@pytest.mark.parametrize("frozen", FROZEN, ids="-".join)
@pytest.mark.parametrize("impl, c", params(FUSED, [Case(m, 6, 4, 3, 5, proj=2 if m == "LSTM" else 0, packed=True)
                                                   for m in MODES]))
def test_partial_requires_grad(impl, c, frozen):
    """Inputs without requires_grad (data fed to a first layer: backward skips the dx GEMM) leave the other
    gradients unchanged."""
    assert_matches_reference(impl, c, frozen=frozen)


def _strided(t):
    if t is None or t.dtype == torch.int64:
        return t
    wide = torch.randn(*(2 * s for s in t.shape), dtype=t.dtype, device=t.device)
    view = wide[(slice(None, None, 2),) * t.dim()]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("impl, c", params(FUSED, [Case(m, 6, 3, 4, 5, proj=3 if m == "LSTM" else 0, packed=True)
                                                   for m in MODES]))
def test_noncontiguous_inputs(impl, c):
    """Views made by slicing (strided rows and columns) give what their contiguous copies give."""
    assert_matches_reference(impl, c, {k: _strided(v) for k, v in make_inputs(c, impl).items()})


NAN_CASES = [
    Case("LSTM", 5, 4, 3, 6, proj=2, packed=True),
    Case("LSTM", 5, 4, 3, 6, reverse=True),
    Case("GRU", 5, 4, 3, 6, packed=True, reverse=True),
    Case("GRU", 5, 4, 3, 6, bias=False),
    Case("RNN_TANH", 5, 4, 3, 6, packed=True),
    Case("RNN_RELU", 5, 4, 3, 6, reverse=True),
]


@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("impl, c", params(FUSED, NAN_CASES))
def test_nan_poisoned_workspaces_do_not_leak(impl, c, grad):
    """Any element the kernels forget to write shows up as NaN, in training and in inference."""
    inputs = make_inputs(c, impl)
    with nan_poisoned(impl):
        if grad:
            assert_matches_reference(impl, c, inputs)
            return
        with torch.no_grad():
            got = impl.layer(c.mode, reverse=c.reverse, **inputs)
    want = reference.layer(c.mode, reverse=c.reverse, **inputs)
    for name, g, w in zip(("y", "h_n", "c_n"), got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            assert_close(g, w, name)


@pytest.mark.parametrize("impl, c", params(FUSED, [Case(m, 6, 4, 3, 5, proj=2 if m == "LSTM" else 0, packed=p)
                                                   for m in MODES for p in (False, True)]))
def test_no_grad_saves_nothing_and_matches(impl, c):
    """Without grad the forward op is asked to save nothing and returns only empty saved buffers."""
    inputs = make_inputs(c, impl)
    a = LayerArgs(c.mode, reverse=c.reverse, **inputs)
    op = _backend._module(impl.backend).layer
    opts = tuple(dict(impl.options).get(name, default) for name, _, default in op.options)
    if op._resolve_options is not None:
        opts = op._resolve_options(a, opts)
    with torch.no_grad():
        y, h_n, c_n, *saved = op.fwd(*a, *opts, False)
    assert [t.numel() for t in saved] == [0] * len(Saved._fields)
    want = reference.layer(a)
    assert_close(y, want.y, "y")
    assert_close(h_n, want.h_n, "h_n")


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


# What watches a call, and whether the forward then goes through its custom op (see glue._Ops).
WATCHERS = {
    "nothing": (contextlib.nullcontext, False),
    "a-dispatch-mode": (_PassThrough, True),
    "a-function-mode": (lambda: torch.device("cpu"), True),
    "the-profiler": (torch.profiler.profile, True),
}


@pytest.mark.parametrize("watcher", WATCHERS)
@pytest.mark.parametrize("impl", [pytest.param(i, id=i.id, marks=[pytest.mark.cuda] if i.device == "cuda" else [])
                                  for i in FUSED if i.dtype == torch.float32])
def test_forward_op_dispatched_only_where_watched(impl, watcher, monkeypatch):
    """Unwatched, a call runs the backend's implementations, not its custom ops: without gradients the forward
    directly, with them through the eager autograd Function; under a dispatch or function mode or the profiler
    the op runs, with gradients or without. Outputs and gradients are the ops' (bit for bit on the CPU; on CUDA
    within the fp32 tolerance, as cuBLAS may pick another algorithm between two calls). The pair (both
    directions of a bidirectional layer in one call) likewise."""
    same = torch.equal if impl.device == "cpu" else (lambda g, w: assert_close(g, w) or True)
    layer = _backend._module(impl.backend).layer
    # the dispatch, not the Triton step loop's graph (FASTRNN_PERSISTENT=1 would capture one on the second call,
    # under the watcher)
    options = {**({"cuda_graph": False} if impl.backend == "triton" else {}), **dict(impl.options)}
    calls = []
    for owner, name in ((layer._plain, "fwd"), (layer._pair, "pair_fwd")):
        if owner is not None:
            monkeypatch.setattr(owner, "fwd", lambda *a, op=owner.fwd, name=name: calls.append(name) or op(*a))
    c = Case("LSTM", 4, 3, 5, 6)
    inputs = make_inputs(c, impl)
    a = LayerArgs(c.mode, reverse=False, **inputs)
    opts = layer._checked(a, options, None)
    watch, dispatched = WATCHERS[watcher]
    for grad in (False, True):
        trained = a._replace(w_hh=a.w_hh.clone().requires_grad_()) if grad else a
        with torch.set_grad_enabled(grad):
            want = layer.fwd(*trained, *opts, grad)  # the op itself (LayerOp.fwd), not the patched one
            want_grad = torch.autograd.grad(want[0].sum(), trained.w_hh) if grad else None
            calls.clear()
            with watch():
                got = layer(trained, **options)
            assert calls == (["fwd"] if dispatched else []), (grad, calls)
            for g, w in zip(got, want):
                if g is not None:
                    assert same(g.detach(), w.detach())
            if grad:
                assert same(torch.autograd.grad(got.y.sum(), trained.w_hh)[0], want_grad[0])
    if layer._pair is not None:
        calls.clear()
        r = a._replace(reverse=True, w_ih=a.w_ih.flip(0), w_hh=a.w_hh.flip(0))
        with torch.no_grad(), watch():
            layer.pair(a, r, **options)
        assert calls == (["pair_fwd"] if dispatched else []), calls


def _expected_saved(a: LayerArgs):
    """What the glue saves: the inputs that are not None, y, and the Saved layout."""
    return sum(t is not None for t in (a.x, a.batch_sizes, *a.tensors()[1:])) + 1 + len(Saved._fields)


@pytest.mark.parametrize("impl, c", params(FUSED, [Case(m, 5, 3, 4, 6, proj=2 if m == "LSTM" else 0, packed=True)
                                                   for m in MODES]))
def test_saved_tensors_hooks_see_every_saved_tensor(impl, c):
    """Offloading every saved tensor to a packed CPU copy and back gives identical gradients, and the hooks
    see all of them: nothing is kept on the side of save_for_backward."""
    inputs = make_inputs(c, impl)
    want_outs, want_grads = run(impl.layer, c, inputs)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.device, t.detach().to("cpu", copy=True).contiguous()

    def unpack(p):
        device, t = p
        return t.to(device)

    outs, grads = run(impl.layer, c, inputs, around=lambda: torch.autograd.graph.saved_tensors_hooks(pack, unpack))
    assert len(packed) == _expected_saved(LayerArgs(c.mode, reverse=c.reverse, **inputs)), packed
    for got, want in zip(outs, want_outs):
        assert torch.equal(got, want)
    for name in grads:
        assert torch.equal(grads[name], want_grads[name]), name


@pytest.mark.parametrize("impl, c", params([i for i in FUSED if i.dtype == torch.float32],
                                           [Case(m, 5, 3, 4, 6, proj=2 if m == "LSTM" else 0, packed=True)
                                            for m in MODES]))
def test_autocast_region_does_not_change_the_dtype(impl, c):
    """Inside torch.autocast the ops still compute in their inputs' dtype (the caller casts, as the modules do)."""
    inputs = make_inputs(c, impl)
    want, want_grads = run(reference.layer, c, inputs)
    with torch.autocast(impl.device, dtype=torch.bfloat16):
        got, got_grads = run(impl.layer, c, inputs)
    for g, w in zip(got + list(got_grads.values()), want + list(want_grads.values())):
        assert g.dtype == torch.float32
        assert_close(g, w)


@pytest.mark.parametrize("impl, c", params(FP64, option_cases(T=3, B=3, I=2, H=2, P=1)))
def test_gradcheck(impl, c):
    assert torch.autograd.gradcheck(*as_function(impl, c), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", WIDE, ids=lambda i: i.id)
def test_matches_torch_nn_bidirectional(impl, mode, packed):
    """Both directions of a bidirectional torch.nn layer (fp64, independent of fastrnn), dense and packed."""
    T, B, I, H = 6, 4, 3, 5
    proj = 2 if mode == "LSTM" else 0
    if not impl.supports(Case(mode, T, B, I, H, proj)):
        proj = 0
    m = nn_module(mode, I, H, proj, True, True)
    hout = proj or H
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(2, B, hout, dtype=torch.float64)
    c0 = torch.randn(2, B, H, dtype=torch.float64)
    lengths = torch.tensor([6, 5, 5, 2])
    hx = (h0, c0) if mode == "LSTM" else h0
    if packed:
        seq = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        out, hn = m(seq, hx)
        y_nn, rows, batch_sizes = out.data, seq.data, seq.batch_sizes
    else:
        out, hn = m(x, hx)
        y_nn, rows, batch_sizes = out.reshape(T * B, 2 * hout), x.reshape(T * B, I), None
    h_nn, c_nn = hn if mode == "LSTM" else (hn, None)
    cast = lambda t: None if t is None else t.detach().to(impl.device, impl.dtype)  # noqa: E731
    for d, sfx in enumerate(("", "_reverse")):
        p = [cast(getattr(m, f"{n}_l0{sfx}", None)) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                                "weight_hr")]
        y, h_n, c_n = impl.layer(mode, cast(rows), batch_sizes, cast(h0[d]), cast(c0[d]) if mode == "LSTM" else None,
                                 *p, d == 1)
        assert_close(y, cast(y_nn[:, d * hout:(d + 1) * hout]), "y")
        assert_close(h_n, cast(h_nn[d]), "h_n")
        if mode == "LSTM":
            assert_close(c_n, cast(c_nn[d]), "c_n")


BAD = {
    "h0-shape": ("LSTM", dict(h0=lambda a: a["h0"][:, :-1]), "h0 must have shape"),
    "c0-missing": ("LSTM", dict(c0=None), "c0 is required"),
    "c0-for-gru": ("GRU", dict(c0=lambda a: torch.randn(4, 5)), "c0 must be None"),
    "w_ih-shape": ("GRU", dict(w_ih=lambda a: a["w_ih"][:, :-1]), "w_ih must have shape"),
    "w_hh-rows": ("LSTM", dict(w_hh=lambda a: a["w_hh"][:-1]), "w_hh must be 2-D"),
    "w_ih-dtype": ("RNN_TANH", dict(w_ih=lambda a: a["w_ih"].double()), "w_ih must have dtype"),
    "w_ih-device": ("GRU", dict(w_ih=lambda a: a["w_ih"].to("meta")), "w_ih must be on cpu like x, got meta"),
    "b_hh-shape": ("GRU", dict(b_hh=lambda a: a["b_hh"][:-1]), "b_hh must have shape"),
    "w_hr-for-gru": ("GRU", dict(w_hr=lambda a: torch.randn(2, 5)), "w_hr (proj_size) is only supported for LSTM"),
    "x-3d": ("LSTM", dict(x=lambda a: a["x"].reshape(3, -1, 3)), "x must be 2-D"),
    "x-int": ("RNN_RELU", dict(x=lambda a: a["x"].long()), "x must be a floating-point"),
    "x-rows": ("LSTM", dict(x=lambda a: a["x"][:-1]), "dense x must have T*B rows"),
    "batch_sizes-increasing": ("GRU", dict(batch_sizes=torch.tensor([2, 4, 4]), x=lambda a: a["x"][:10]),
                               "batch_sizes must be non-increasing"),
    "batch_sizes-sum": ("GRU", dict(batch_sizes=torch.tensor([4, 4, 3])), "batch_sizes sum to 11"),
    "batch_sizes-dtype": ("LSTM", dict(batch_sizes=torch.tensor([4, 4, 4], dtype=torch.int32)),
                          "batch_sizes must be a 1-D int64 CPU tensor"),
    "batch_sizes-too-big": ("RNN_TANH", dict(batch_sizes=torch.tensor([6, 6])), "within [1, B = 4]"),
    "mode": ("RNN_SIGMOID", {}, "mode must be one of"),
}
CPU32 = [Impl(b, "cpu", torch.float32) for b in _backend.BACKENDS if Impl(b, "cpu", torch.float32).reason() is None]


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("impl", CPU32, ids=lambda i: i.id)
def test_bad_input_raises_naming_the_argument(impl, name):
    """Every backend checks the contract in the same place, with the same words."""
    mode, changes, message = BAD[name]
    inputs = make_inputs(Case(mode if mode in MODES else "RNN_TANH", 3, 4, 3, 5), impl)
    inputs.update({k: v(inputs) if callable(v) else v for k, v in changes.items()})
    with pytest.raises(RuntimeError, match=re.escape(message)):
        impl.layer(mode, reverse=False, **inputs)


@pytest.mark.parametrize("backend", _backend.BACKENDS)
def test_unsupported_dtype_raises_availabilitys_reason(backend):
    c = Case("GRU", 3, 2, 3, 4)
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        impl = Impl(backend, "cpu", dtype)
        reason = impl.reason()
        if reason is not None and not reason.startswith(("fastrnn._C", "triton could not")):
            with pytest.raises(RuntimeError, match=re.escape(f"fastrnn {backend} backend unavailable: {reason}")):
                impl.layer(c.mode, reverse=False, **make_inputs(c, Impl(backend, "cpu", dtype)))


def test_unknown_backend_option_is_refused():
    impl = next(i for i in FUSED if i.backend == "cpp")
    c = Case("GRU", 3, 2, 3, 4)
    with pytest.raises(TypeError, match="unexpected backend option"):
        impl.layer(c.mode, reverse=False, variant="seq", **make_inputs(c, impl))


# ------------------------------------------------------------------------------------------------------
# The cpp backend's own hooks and limits.

@pytest.mark.parametrize("impl, c", params(CPP_CPU64, option_cases(T=9, B=4, I=3, H=5, P=2)))
def test_cpp_backward_across_chunks(impl, c):
    """The backward flushes dgates into dx/dW every ~1024 rows; 6-row chunks put many flushes, and the dense
    h_prev shortcut at the first/last chunk, into a small problem."""
    with backward_chunk_rows(6):
        assert_matches_reference(impl, c)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, or the absolute norm where ``want`` is exactly zero (a ReLU RNN's dh0 after
    10,000 steps can vanish in both)."""
    diff, scale = float((got.double() - want).norm()), float(want.norm())
    return diff / scale if scale > 0 else diff


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", CPP_CPU64, ids=lambda i: i.id)
def test_cpp_long_sequence_matches_torch_nn(impl, mode):
    """T = 10,000 (so the backward's row chunks are flushed many times): fp64 matches torch.nn's fp64 autograd
    elementwise; fp32 stays finite, its outputs match elementwise and its gradients, sums over 20,000 rows
    whose fp32 rounding grows with the row count in any summation order, match in relative norm."""
    T, B, I, H = 10_000, 2, 3, 4
    proj = 3 if mode == "LSTM" else 0
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
        y, h_n, c_n = impl.layer(mode, xs.reshape(T * B, I), None, h, c, *w, False)
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


def test_cpp_availability():
    cpp = _backend._module("cpp")
    if cpp is None or cpp._C is None:
        pytest.skip("fastrnn._C is not built")
    assert cpp.availability(torch.device("cpu"), torch.float32) is None
    assert cpp.availability(torch.device("cpu"), torch.float64) is None
    for dtype in (torch.float16, torch.bfloat16):
        assert cpp.availability(torch.device("cpu"), dtype) is None
    assert "float16 and bfloat16" in cpp.availability(torch.device("cpu"), torch.int32)
    cuda = torch.device("cuda")
    if cpp._build_info().get("with_cuda"):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            assert cpp.availability(cuda, dtype) is None
        assert "float16 and bfloat16" in cpp.availability(cuda, torch.int32)
    else:
        assert "without CUDA" in cpp.availability(cuda, torch.float32)
    assert "no kernels" in cpp.availability(torch.device("meta"), torch.float32)


if torch.cuda.is_available():  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
    @pytest.mark.parametrize("backend", ["cpp", "triton"])
    def test_layer_on_a_gpu_other_than_the_current_one(backend):
        """Tensors on cuda:1 while cuda:0 is current: the layer runs on theirs (Triton launches, CUDA graphs
        and the persistent engine's device queries go to the current device unless told)."""
        impl = Impl(backend, "cuda:1", torch.float32)
        if impl.reason() is not None:
            pytest.skip(impl.reason())
        with torch.cuda.device(0):
            assert_matches_reference(impl, Case("LSTM", 5, 3, 4, 20, packed=True))
            assert torch.cuda.current_device() == 0
