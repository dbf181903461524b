"""``torch.use_deterministic_algorithms(True)``: every backend runs (no op raises for lack of a deterministic
implementation) and repeats forward and backward bit for bit, on the CPU with all its threads."""

import pytest
import torch

from rnn_cases import _flat, every_backend, random_packed, twins


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _forward_backward(module, x):
    out = _flat(module(x))
    loss = sum((o * (k + 1)).sum() for k, o in enumerate(out))
    return [o.detach() for o in out] + list(torch.autograd.grad(loss, list(module.parameters())))


@pytest.mark.parametrize("backend_dtype", every_backend(torch.float32))
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_relu"])
def test_repeats_bitwise(kind, backend_dtype, deterministic):
    backend, dtype = backend_dtype
    hidden = 64 if backend == "cpp" else 6  # 64 units: two 32-unit blocks, one per thread of the CPU engine
    _, fast = twins(kind, 16, hidden, dtype, backend, num_layers=2, bidirectional=True)
    x = random_packed(7, 8, 16, dtype, sorted_=False)
    first, second = _forward_backward(fast, x), _forward_backward(fast, x)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
