import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import fastrnn  # noqa: E402
from fastrnn import backend as _backend  # noqa: E402

TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-9),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def usable_backends(device="cpu", dtype=torch.float32):
    """Backends that run here; Triton only under its interpreter, which has its own test module."""
    names = ["reference", "cpp"]
    return [n for n in names if _backend.reason_unavailable(n, torch.device(device), dtype) is None]


@pytest.fixture(autouse=True)
def _seed():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {seed}")  # shown by pytest on failure, to replay it
    torch.manual_seed(seed)
    yield

