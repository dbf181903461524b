"""Builders shared by the module tests: torch.nn twins, random inputs, and comparisons of every gradient."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from fastrnn import backend as _backend

KINDS = {
    "lstm": (nn.LSTM, {}),
    "lstm_proj": (nn.LSTM, {"proj_size": 2}),
    "gru": (nn.GRU, {}),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
}
CELLS = {
    "lstm_cell": (nn.LSTMCell, {}),
    "gru_cell": (nn.GRUCell, {}),
    "rnn_tanh_cell": (nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu_cell": (nn.RNNCell, {"nonlinearity": "relu"}),
}


def twins(kind, input_size, hidden_size, dtype, backend, **kw):
    """A torch.nn module and the fastrnn module loaded from its state_dict (``kind`` from KINDS or CELLS)."""
    cls, extra = {**KINDS, **CELLS}[kind]
    ref = cls(input_size, hidden_size, dtype=dtype, **extra, **kw)
    fast = getattr(fastrnn, cls.__name__)(input_size, hidden_size, dtype=dtype, backend=backend, **extra, **kw)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), fast.eval()


def random_state(module, batch, dtype, batched=True):
    nd = 2 if module.bidirectional else 1
    h_out = module.proj_size or module.hidden_size
    shape = (module.num_layers * nd, batch, h_out) if batched else (module.num_layers * nd, h_out)
    h = torch.randn(shape, dtype=dtype)
    if module.mode != "LSTM":
        return h
    c_shape = shape[:-1] + (module.hidden_size,)
    return h, torch.randn(c_shape, dtype=dtype)


def random_packed(T, B, feat, dtype, sorted_=True):
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    if sorted_:
        lengths = lengths.sort(descending=True).values
    else:
        lengths = lengths[torch.randperm(B)]
    padded = torch.randn(T, B, feat, dtype=dtype)
    return pack_padded_sequence(padded, lengths, enforce_sorted=sorted_)


def _flat(out):
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, tuple):
        return [t for o in out for t in _flat(o)]
    return [out]


def run_and_grad(module, inputs, hx, weights):
    """Forward, then backward of a fixed random projection of every output; returns outputs and grads."""
    leaves = [t for t in _flat(inputs) + _flat(hx if hx is not None else ()) if t.requires_grad]
    out = module(inputs) if hx is None else module(inputs, hx)
    flat = _flat(out)
    loss = sum((o * w).sum() for o, w in zip(flat, weights))
    params = [p for _, p in sorted(module.named_parameters())]
    grads = torch.autograd.grad(loss, leaves + params)
    return flat, grads


def clone_leaf(obj):
    if isinstance(obj, PackedSequence):
        return PackedSequence(obj.data.detach().clone().requires_grad_(), obj.batch_sizes, obj.sorted_indices, obj.unsorted_indices)
    if isinstance(obj, tuple):
        return tuple(clone_leaf(o) for o in obj)
    return obj.detach().clone().requires_grad_()


def compare(ref, fast, inputs, hx, tol):
    """Outputs, returned states and the gradients of input, hx and every parameter agree."""
    ref_out = ref(inputs) if hx is None else ref(inputs, hx)
    weights = [torch.randn_like(t) for t in _flat(ref_out)]
    a_in, b_in = clone_leaf(inputs), clone_leaf(inputs)
    a_hx = None if hx is None else clone_leaf(hx)
    b_hx = None if hx is None else clone_leaf(hx)
    a_out, a_grads = run_and_grad(ref, a_in, a_hx, weights)
    b_out, b_grads = run_and_grad(fast, b_in, b_hx, weights)
    assert len(a_out) == len(b_out)
    for x, y in zip(a_out, b_out):
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(y, x, **tol)
    assert len(a_grads) == len(b_grads)
    for x, y in zip(a_grads, b_grads):
        torch.testing.assert_close(y, x, **tol)


def every_backend(dtype=None):
    """``pytest.param((backend, dtype))`` for each backend, in ``dtype`` or else fp64, fp32 for Triton (no fp64
    kernels; on the CPU under its interpreter); a backend that cannot run here is skipped with its reason."""
    out = []
    for name in _backend.BACKENDS:
        dt = dtype or (torch.float32 if name == "triton" else torch.float64)
        why = _backend.reason_unavailable(name, torch.device("cpu"), dt)
        marks = [pytest.mark.skip(reason=why)] if why else []
        out.append(pytest.param((name, dt), id=f"{name}-{str(dt)[6:]}", marks=marks))
    return out
