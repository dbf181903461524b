"""Triton backend: fused recurrent kernels (see ``triton_step`` and ``triton_seq``) behind the backend contract.

Two kernel variants, chosen per layer by :func:`layer`:

- ``"seq"``: whole-sequence kernels, one launch forward and one backward per layer and direction, for H
  small enough that W_hh stays in registers (``triton_seq.seq_config``) and no projection.
- ``"step"``: one fused launch per time step forward and one per step backward for any H; with an LSTM
  projection the per-step ``w_hr`` product (and its backward) run as torch matmuls beside the kernel.

The input projection of all steps is one GEMM before the loop and the weight gradients are GEMMs after it.
On CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the tests exercise them; nothing here has run on a GPU yet.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastrnn.ops import GATES, MODES, reference

try:
    from fastrnn.ops import triton_common as _common
except ImportError as exc:  # triton missing or broken
    _common = None
    _IMPORT_ERROR: Optional[str] = f"triton could not be imported ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = None

CPU_REASON = (
    "Triton kernels need a CUDA GPU; set TRITON_INTERPRET=1 before importing triton to run them on CPU "
    "for testing"
)


def availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``None`` when the Triton kernels can run on ``device`` with ``dtype`` storage, else why not."""
    if _common is None:
        return _IMPORT_ERROR
    if dtype not in _common.DTYPES:
        return f"Triton kernels support float32, float16 and bfloat16 storage, got {dtype}"
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and _common.interpreting()):
        return None
    if device.type == "cpu":
        return CPU_REASON
    return f"Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1), got {device.type}"


def layer(
    mode: str,
    x: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    reverse: bool,
    *,
    variant: Optional[str] = None,
    cuda_graph: bool = False,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer in one direction (see ``fastrnn.ops`` for the contract), differentiable in every tensor.

    ``variant``: ``"step"`` or ``"seq"``; ``None`` picks ``"seq"`` wherever it applies.
    ``cuda_graph``: capture the per-step launches of the ``"step"`` variant into a CUDA graph on the first
    call with given shapes and batch sizes and replay it afterwards, removing the per-launch host cost.
    UNVERIFIED: it has never run on a GPU.
    """
    reason = availability(x.device, x.dtype)
    if reason is not None:
        raise RuntimeError(f"fastrnn triton backend unavailable: {reason}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}, expected one of {MODES}")
    H = w_hh.shape[0] // GATES[mode]
    if variant is None:
        variant = _common.pick_variant(H, w_hh.dtype, w_hr is not None)
    if variant not in _common.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}, expected one of {_common.VARIANTS}")
    if variant == "seq" and (w_hr is not None or _common.seq_config(H, w_hh.dtype) is None):
        raise ValueError(f"the 'seq' variant needs no projection and H <= {_common.SEQ_MAX_H.get(w_hh.dtype)}")
    if cuda_graph and x.device.type != "cuda":
        raise ValueError("cuda_graph=True needs CUDA tensors")
    if x.shape[0] == 0:
        # No step to run: the reference returns the initial state with the right autograd graph.
        return reference.layer(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    y, h_n, c_n = _common.layer_fwd(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                    variant, cuda_graph)[:3]
    return y, h_n, (c_n if mode == "LSTM" else None)
