import functools
import os
import sys
from typing import Optional

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Without a GPU the Triton kernels run in its interpreter, which must be on before triton is first imported
# (fastrnn imports it lazily); tests/test_triton.py reruns itself in a child where that came too late.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# cuBLAS is deterministic only with a fixed workspace; set before CUDA starts (tests/test_deterministic.py)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# fp32 is fp32 in every test: cuDNN's RNN (torch.nn) and fastrnn's persistent engine both take TF32 where torch
# allows it for cuDNN's RNN, which it does by default; the TF32 tests ask for it themselves. The older switch sets
# conv and RNN alike (setting only the RNN's newer per-operator flag would make the older getter raise).
torch.backends.cudnn.allow_tf32 = False

import fastrnn  # noqa: E402
from fastrnn import backend as _backend  # noqa: E402

# The one tolerance table. fp32: the kernels' polynomial exp/tanh (~2 ulp) and other GEMM summation orders;
# bf16/fp16: h rounded to 8/11 bits for the recurrent product.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}

# fp32 storage with the recurrent products on tensor cores in TF32 (10-bit mantissas, as fp16's), where torch
# allows TF32 for cuDNN's RNN: fp16's bound.
TOL_TF32 = {**TOL, torch.float32: TOL[torch.float16]}

# LayerNorm cells against the fp64 truth: the normalisation divides by each row's deviation, so a row whose
# gates are nearly equal magnifies fp32 rounding. torch's own ops (the reference backend) reach 7e-5 of the
# largest magnitude in the worst of ~900 random fp32 cases (tests/test_cells_ext.py shapes); the bound is
# about twice that. About one 2-layer bidirectional LSTM draw in a thousand is worse conditioned than that, for
# every backend alike: test_cells_ext.check_module then asks how far one fp32 rounding of the inputs and
# parameters moves the truth.
TOL_LAYER_NORM = {**TOL, torch.float32: dict(rtol=2e-4, atol=2e-4)}


def _allowed(want: torch.Tensor, table: dict, dtype: torch.dtype):
    """``rtol`` and ``atol`` of ``table`` for ``dtype``, ``atol`` relative to the largest magnitude of ``want``
    (a gradient summed over many rows is as exact as its largest terms, not its smallest)."""
    tol = table[dtype]
    scale = max(1.0, want.detach().abs().max().item()) if want.numel() else 1.0
    return tol["rtol"], tol["atol"] * scale


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str = "", table: dict = TOL) -> None:
    """``got`` matches ``want`` to ``table`` (``TOL``) of ``got``'s dtype."""
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
    rtol, atol = _allowed(want, table, got.dtype)
    torch.testing.assert_close(got.detach().cpu().double(), want.detach().cpu().double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


def tolerance_used(got: torch.Tensor, want: torch.Tensor, table: dict = TOL, dtype=None) -> float:
    """How much of ``assert_close``'s allowance ``got`` takes, at its worst element (at most 1 passes; NaN takes
    all of it and more), with ``dtype``'s row of ``table`` (``got``'s dtype by default)."""
    rtol, atol = _allowed(want, table, dtype or got.dtype)
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if not got.numel():
        return 0.0
    used = (got - want).abs() / (atol + rtol * want.abs())
    return float("inf") if used.isnan().any() else used.max().item()


def usable_backends(device="cpu", dtype=torch.float32):
    """Backends that run here; Triton only under its interpreter, which has its own test module."""
    names = ["reference", "cpp"]
    return [n for n in names if _backend.reason_unavailable(n, torch.device(device), dtype) is None]


@functools.lru_cache(maxsize=None)
def nn_lstm_autocast_error() -> Optional[str]:
    """Why torch.nn.LSTM cannot run under CPU bf16 autocast on this CPU, or None where it can: torch.nn hands it
    to oneDNN, which has no bf16 LSTM primitive on CPUs without AVX-512 (an AVX2-only Zen 1, say). fastrnn runs
    it there all the same; tests that compare with torch.nn compare with float64 instead and say so."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(2, 2)(torch.randn(1, 1, 2))
    except RuntimeError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


@pytest.fixture(autouse=True)
def _seed():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {seed}")  # shown by pytest on failure, to replay it
    torch.manual_seed(seed)
    yield



@pytest.fixture
def emulated_cuda_graphs(monkeypatch):
    """The Triton backend's CUDA-graph replay (``host.run_loop``) on the CPU: the capture (``host._capture``)
    swapped for a rerun of the capturing call's loop on the graph's copies of its inputs. Like a graph, that rerun
    reads whatever tensors that call's loop closed over, so a loop that reads a tensor past its inputs
    replays stale values; ``cuda_graph=True`` is let through on the CPU. Yields the (fresh) cache of captures."""
    from fastrnn.ops import triton as tb

    def capture(loop, static_in):
        loop(*static_in)  # the warm-up run, as on a GPU
        return lambda: loop(*static_in)

    monkeypatch.setattr(tb._host, "_GRAPHS", type(tb._host._GRAPHS)())
    monkeypatch.setattr(tb._host, "_SEEN", type(tb._host._SEEN)())
    monkeypatch.setattr(tb._host, "_capture", capture)
    monkeypatch.setattr(tb, "_resolve_graph", lambda a, variant, cuda_graph: bool(cuda_graph) and variant == "step")
    yield tb._host._GRAPHS
