"""``torch.use_deterministic_algorithms(True)``: every backend runs (no op raises for lack of a deterministic
implementation) and repeats forward and backward bit for bit, on the CPU with all its threads, and on CUDA
where a GPU is present (cuBLAS under CUBLAS_WORKSPACE_CONFIG, which tests/conftest.py sets)."""

import pytest
import torch

from fastrnn import backend as _backend
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


CUDA_BACKENDS = [b for b in ("cpp", "triton") if torch.cuda.is_available()
                 and _backend.reason_unavailable(b, torch.device("cuda"), torch.float32) is None]


if CUDA_BACKENDS:  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.parametrize("backend", CUDA_BACKENDS)
    @pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_relu"])
    def test_repeats_bitwise_on_cuda(kind, backend, deterministic):
        _, fast = twins(kind, 16, 64, torch.float32, backend, num_layers=2, bidirectional=True)
        fast = fast.cuda()
        x = random_packed(7, 8, 16, torch.float32, sorted_=False).to("cuda")
        first, second = _forward_backward(fast, x), _forward_backward(fast, x)
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
