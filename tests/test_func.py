"""torch.func on every fastrnn module and backend, against torch.nn: per-sample gradients (``vmap`` of ``grad``
of a ``functional_call``), ensembles (``vmap`` over stacked parameters), ``jacrev``/``jacfwd`` and forward-mode
AD, and ``functional_call`` itself.

Under a transform or forward-mode AD a layer runs on the reference backend's ops (``fastrnn.ops.glue``); plain
``functional_call`` keeps the backend's kernels, which must read the parameters it substitutes.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacfwd, jacrev, stack_module_state, vmap

from conftest import TOL
from rnn_cases import CELLS, KINDS, _flat, every_backend, twins

# torch's forward-mode decompositions compile themselves with torch.jit.script on first use
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.script.* is deprecated:FutureWarning")
MODULES = [*KINDS, *CELLS]
T, B, I, H = 4, 3, 3, 4


def _pair(kind, backend_dtype):
    backend, dtype = backend_dtype
    kw = dict(num_layers=2, bidirectional=True) if kind in KINDS else {}
    return (*twins(kind, I, H, dtype, backend, **kw), dtype)


def _batch(kind, dtype, n=B):
    """A batch: ``[T, n, I]`` sequences for the sequence modules, ``[n, I]`` for the cells."""
    return torch.randn((T, n, I) if kind in KINDS else (n, I), dtype=dtype)


def _weighted_sum(module, weights):
    """A random linear function of every output (sequence, h_n, c_n) of ``functional_call(module, params, x)``."""

    def loss(params, x):
        return sum((o * w).sum() for o, w in zip(_flat(functional_call(module, params, (x,))), weights))

    return loss


@pytest.mark.parametrize("backend_dtype", every_backend())
@pytest.mark.parametrize("kind", MODULES)
def test_per_sample_gradients(kind, backend_dtype):
    """vmap(grad(...)) over the samples of a batch (DP-SGD's per-sample gradients), each sample unbatched,
    equals torch.nn's gradients sample by sample."""
    ref, fast, dtype = _pair(kind, backend_dtype)
    xs = _batch(kind, dtype).transpose(0, 1) if kind in KINDS else _batch(kind, dtype)
    weights = [torch.randn_like(o) for o in _flat(ref(xs[0]))]
    params = {k: v.detach() for k, v in fast.named_parameters()}
    got = vmap(grad(_weighted_sum(fast, weights)), in_dims=(None, 0))(params, xs)
    names = [n for n, _ in ref.named_parameters()]
    for i, x in enumerate(xs):
        loss = sum((o * w).sum() for o, w in zip(_flat(ref(x)), weights))
        for name, want in zip(names, torch.autograd.grad(loss, list(ref.parameters()))):
            torch.testing.assert_close(got[name][i], want, **TOL[dtype], msg=lambda m: f"{name}[{i}]: {m}")


@pytest.mark.parametrize("backend_dtype", every_backend())
@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm_cell"])
def test_vmap_over_stacked_parameters(kind, backend_dtype):
    """An ensemble: vmap over the stacked parameters of several modules, one input, equals each module's
    torch.nn twin."""
    pairs = [_pair(kind, backend_dtype) for _ in range(3)]
    dtype = pairs[0][2]
    params, _ = stack_module_state([fast for _, fast, _ in pairs])
    x = _batch(kind, dtype)
    got = vmap(lambda p: _flat(functional_call(pairs[0][1], p, (x,))))(params)
    for k, (ref, _, _) in enumerate(pairs):
        for g, want in zip(got, _flat(ref(x))):
            torch.testing.assert_close(g[k], want, **TOL[dtype])


@pytest.mark.parametrize("backend_dtype", every_backend())
@pytest.mark.parametrize("kind", MODULES)
def test_jacobians_and_forward_mode(kind, backend_dtype):
    """jacrev, jacfwd and a forward-mode AD tangent w.r.t. the input equal torch.nn's Jacobian (taken in fp64:
    one backward per output element, which oneDNN's fp32 LSTM makes slow on a busy machine)."""
    ref, fast, dtype = _pair(kind, backend_dtype)
    x = _batch(kind, dtype, n=2)
    ref = ref.double()
    want = [j.to(dtype) for j in torch.autograd.functional.jacobian(lambda v: tuple(_flat(ref(v))), x.double())]
    for transform in (jacrev, jacfwd):
        got = transform(lambda v: tuple(_flat(fast(v))))(x)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m: f"{transform.__name__}: {m}")
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        outs = _flat(fast(fwAD.make_dual(x, tangent)))
        jvps = [fwAD.unpack_dual(o).tangent for o in outs]
    for g, w in zip(jvps, want, strict=True):
        torch.testing.assert_close(g, (w.flatten(g.dim()) @ tangent.flatten()).reshape(g.shape), **TOL[dtype])


@pytest.mark.parametrize("backend_dtype", every_backend())
@pytest.mark.parametrize("kind", MODULES)
def test_functional_call_substitutes_parameters(kind, backend_dtype):
    """functional_call with other parameters (the backend's own kernels, no transform): the outputs and the
    gradients w.r.t. those parameters are torch.nn's with them."""
    ref, fast, dtype = _pair(kind, backend_dtype)
    x = _batch(kind, dtype)
    new = {k: torch.randn_like(v).mul_(0.5).requires_grad_() for k, v in ref.named_parameters()}
    outs = {}
    for name, module in (("torch.nn", ref), ("fastrnn", fast)):
        out = _flat(functional_call(module, new, (x,)))
        loss = sum((o * (k + 1)).sum() for k, o in enumerate(out))
        outs[name] = out + list(torch.autograd.grad(loss, list(new.values())))
    for g, w in zip(outs["fastrnn"], outs["torch.nn"], strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])
    assert all(not torch.equal(v, p) for v, p in zip(new.values(), fast.parameters()))


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
@pytest.mark.parametrize("backend_dtype", every_backend())
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh_cell"])
def test_batched_backward_of_a_graph_built_outside_vmap(kind, backend_dtype):
    """A graph built without a transform (the backend's own forward), then its backward batched over several
    output gradients: ``autograd.grad(..., is_grads_batched=True)`` and ``vmap`` over ``autograd.grad``; each
    equals torch.nn's, one gradient at a time. The batched gradients reach the backward without storage, so the
    backward must not hand them to the kernels directly."""
    ref, fast, dtype = _pair(kind, backend_dtype)
    x = _batch(kind, dtype)
    outs = {m: _flat(m(x)) for m in (ref, fast)}
    seeds = [torch.randn((3, *o.shape), dtype=dtype) for o in outs[ref]]
    wrt = {m: list(m.parameters()) for m in (ref, fast)}
    want = torch.autograd.grad(outs[ref], wrt[ref], seeds, is_grads_batched=True, retain_graph=True)
    got = torch.autograd.grad(outs[fast], wrt[fast], seeds, is_grads_batched=True, retain_graph=True)
    mapped = vmap(lambda *g: torch.autograd.grad(outs[fast], wrt[fast], list(g), retain_graph=True))(*seeds)
    for g, m, w in zip(got, mapped, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype])
        torch.testing.assert_close(m, w, **TOL[dtype])
