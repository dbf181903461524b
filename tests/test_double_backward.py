"""Double backward (``create_graph=True``): gradgradcheck of every layer option and module in fp64, and a
gradient penalty on every module and backend against torch.nn's (non-cuDNN, CPU) result.

In a backward with ``create_graph=True`` the glue differentiates the layer recomputed on the reference backend's
ops (``fastrnn.ops.glue``); the gradient of the penalty still reaches the forward through the fused backward.
"""

import pytest
import torch
from torch.func import functional_call

from conftest import TOL
from layer_cases import as_function, impls, option_cases, params
from rnn_cases import CELLS, KINDS, _flat, every_backend, random_state, twins


@pytest.mark.parametrize("impl, c", params(impls(("cpp",), (torch.float64,)), option_cases(T=3, B=2, I=2, H=2, P=1)))
def test_layer_gradgradcheck(impl, c):
    """Every layer option of the fused backend (the reference backend is plain autograd)."""
    assert torch.autograd.gradgradcheck(*as_function(impl, c), eps=1e-6, atol=1e-6, rtol=1e-5)


def _state(ref, kind, batch, dtype):
    if kind in KINDS:
        return random_state(ref, batch, dtype)
    h = torch.randn(batch, ref.hidden_size, dtype=dtype)
    return (h, torch.randn_like(h)) if kind == "lstm_cell" else h


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("kind", [*KINDS, *CELLS])
def test_module_gradgradcheck(kind, backend):
    """Input, initial state and every parameter, through the module (two layers: a layer's output is the
    next one's input; the layer options are test_layer_gradgradcheck's)."""
    kw = dict(num_layers=2) if kind in KINDS else {}
    ref, fast = twins(kind, 2, 3, torch.float64, backend, **kw)
    x = torch.randn((2, 2, 2) if kind in KINDS else (2, 2), dtype=torch.float64)
    hx = _state(ref, kind, 2, torch.float64)
    hx = list(hx) if isinstance(hx, tuple) else [hx]
    names = [n for n, _ in fast.named_parameters()]

    def f(x, *rest):
        states, weights = rest[:len(hx)], rest[len(hx):]
        state = tuple(states) if len(states) == 2 else states[0]
        return tuple(_flat(functional_call(fast, dict(zip(names, weights)), (x, state))))

    leaves = [t.detach().clone().requires_grad_() for t in (x, *hx, *fast.parameters())]
    assert torch.autograd.gradgradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def _penalty_grads(module, x, hx, weights):
    """A gradient penalty: the squared norm of d(loss)/d(x, hx), differentiated w.r.t. x, hx and the
    parameters; the loss is quadratic in the outputs, so its gradient also flows back through them."""
    x = x.detach().clone().requires_grad_()
    hx = tuple(h.detach().clone().requires_grad_() for h in hx)
    out = _flat(module(x, hx if len(hx) == 2 else hx[0]))
    loss = sum((o.pow(2) * w).sum() for o, w in zip(out, weights))
    first = torch.autograd.grad(loss, (x, *hx), create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return torch.autograd.grad(penalty, [x, *hx, *module.parameters()])


@pytest.mark.parametrize("backend_dtype", every_backend())
@pytest.mark.parametrize("kind", [*KINDS, *CELLS])
def test_gradient_penalty_matches_torch_nn(kind, backend_dtype):
    backend, dtype = backend_dtype
    kw = dict(num_layers=2, bidirectional=True) if kind in KINDS else {}
    ref, fast = twins(kind, 3, 4, dtype, backend, **kw)
    ref = ref.double()
    x = torch.randn((5, 3, 3) if kind in KINDS else (3, 3), dtype=torch.float64)
    hx = _state(ref, kind, 3, torch.float64)
    hx = hx if isinstance(hx, tuple) else (hx,)
    weights = [torch.randn_like(o) for o in _flat(ref(x, hx if len(hx) == 2 else hx[0]))]
    want = _penalty_grads(ref, x, hx, weights)
    got = _penalty_grads(fast, x.to(dtype), tuple(h.to(dtype) for h in hx), [w.to(dtype) for w in weights])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("frozen", [True, False], ids=["reverse-frozen", "both-trained"])
def test_bidirectional_double_backward_with_a_frozen_direction(frozen):
    """A bidirectional layer on data (x takes no gradient) whose reverse direction is frozen: that direction runs
    on its own, not in the cpp backend's pair (op or C++ node, which would save and back-propagate it for
    nothing, and give double backward nothing to differentiate there); a gradient penalty on the forward
    direction's weights matches torch.nn's either way."""
    ref, fast = twins("lstm", 3, 4, torch.float64, "cpp", bidirectional=True)
    for m in (ref, fast):
        for name, p in m.named_parameters():
            p.requires_grad_(not (frozen and name.endswith("_reverse")))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads, nodes = [], []
    for m in (ref, fast):
        out = m(x)[0]
        nodes = [out.grad_fn]
        first = torch.autograd.grad(out.pow(2).sum(), m.weight_hh_l0, create_graph=True)[0]
        grads.append(torch.autograd.grad(first.pow(2).sum(), [m.weight_ih_l0, m.bias_hh_l0]))
    for g, w in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    while nodes and not any(n in nodes[-1].name() for n in ("PairNode", "LayerNode")):
        nodes += [f for f, _ in nodes.pop().next_functions if f is not None]
    assert nodes and ("PairNode" in nodes[-1].name()) == (not frozen)
