"""The "cpp" backend: fused C++/CUDA kernels of ``fastrnn._C`` (csrc/) behind the backend contract.

The kernels are registered as ``torch.library`` custom ops with fake (meta) implementations and an autograd
formula, so ``torch.compile`` traces a layer as two opaque ops (forward, backward) without a graph break.
"""

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastrnn import _buildcfg
from fastrnn._ext import _C, _C_ERROR
from fastrnn.ops import GATES

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _build_info() -> dict:
    return _C.build_info() if _C is not None else {}


def availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if _C is None:
        return _C_ERROR or "fastrnn._C is not built"
    device = torch.device(device)
    if device.type == "cpu":
        if dtype not in _DTYPES:
            return f"the CPU kernels support float32, float64, float16 and bfloat16, got {dtype}"
        return None
    if device.type == "cuda":
        if not _build_info().get("with_cuda"):
            return "fastrnn._C was built without CUDA (nvcc or a CUDA build of torch was missing at build time)"
        if dtype not in _DTYPES:
            return f"the CUDA kernels support float32, float64, float16 and bfloat16, got {dtype}"
        return _arch_mismatch(device)
    return f"no kernels for device type {device.type!r}"


def _arch_mismatch(device: torch.device) -> Optional[str]:
    if not torch.cuda.is_available():
        return None  # no device to ask; a CUDA tensor cannot exist here anyway
    archs = [str(a) for a in _build_info().get("cuda_archs", [])]
    capability = torch.cuda.get_device_capability(device)
    if _buildcfg.runs_on(archs, capability):
        return None
    return (f"fastrnn._C was built for sm_{', sm_'.join(archs)} and cannot run on this sm_{capability[0]}"
            f"{capability[1]} GPU; rebuild with FASTRNN_CUDA_ARCHS including {capability[0]}{capability[1]}")


def _lib() -> object:
    if _C is None:
        raise RuntimeError(_C_ERROR or "fastrnn._C is not built")
    return _C


@torch.library.custom_op("fastrnn::layer_fwd", mutates_args=())
def layer_fwd(
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
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns y, h_n, c_n and the saved gates, c, hn (see csrc/rnn.cpp); absent ones are empty [0]."""
    return tuple(_lib().layer_fwd(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save))


def _ws_dtype(x: Tensor) -> torch.dtype:
    """The saved activations' dtype (csrc/seq.h ws_dtype): the CPU keeps 16-bit sequences' state in fp32."""
    return torch.float32 if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x.dtype


@layer_fwd.register_fake
def _(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save):
    n, (b, hout), gh = x.shape[0], h0.shape, w_hh.shape[0]
    h = gh // GATES.get(mode, 1)
    ws = _ws_dtype(x)

    def saved(want: bool, *shape: int) -> Tensor:
        return x.new_empty(*shape, dtype=ws) if want else x.new_empty(0, dtype=ws)

    return (
        x.new_empty(n, hout),
        x.new_empty(b, hout),
        x.new_empty(b, h) if mode == "LSTM" else x.new_empty(0),
        saved(save and mode in ("LSTM", "GRU"), n, gh),
        saved(save and mode == "LSTM", n, h),
        saved(save and mode == "GRU", n, h),
    )


@torch.library.custom_op("fastrnn::layer_bwd", mutates_args=())
def layer_bwd(
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
    y: Tensor,
    gates: Tensor,
    c: Tensor,
    hn: Tensor,
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Optional[Tensor],
    need_dx: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr; absent inputs, and x unless need_dx, get an
    empty [0] gradient."""
    return tuple(
        _lib().layer_bwd(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, y, gates, c, hn, dy,
                         dh_n, dc_n, need_dx)
    )


@layer_bwd.register_fake
def _(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, y, gates, c, hn, dy, dh_n, dc_n,
      need_dx):
    def like(t: Optional[Tensor]) -> Tensor:
        return x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    dx = like(x if need_dx else None)
    return dx, like(h0), like(c0), like(w_ih), like(w_hh), like(b_ih), like(b_hh), like(w_hr)


def _setup_context(ctx, inputs, output) -> None:
    mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, _save = inputs
    y, _h_n, _c_n, gates, c, hn = output
    ctx.mode, ctx.reverse = mode, reverse
    # otherwise autograd would hand backward zero-filled [N, G*H] gradients for the saved activations
    ctx.mark_non_differentiable(gates, c, hn)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, gates, c, hn)


def _backward(ctx, dy, dh_n, dc_n, *_saved_grads):
    x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, gates, c, hn = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    if dh_n is None:
        dh_n = torch.zeros_like(h0)
    if c0 is None:
        dc_n = None
    elif dc_n is None:
        dc_n = torch.zeros_like(c0)
    need_dx = ctx.needs_input_grad[1]
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = layer_bwd(
        ctx.mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ctx.reverse, y, gates, c, hn, dy, dh_n,
        dc_n, need_dx
    )

    def present(g: Tensor, t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else g

    return (None, dx if need_dx else None, None, dh0, present(dc0, c0), dw_ih, dw_hh, present(db_ih, b_ih),
            present(db_hh, b_hh), present(dw_hr, w_hr), None, None)


layer_fwd.register_autograd(_backward, setup_context=_setup_context)


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
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer in one direction; see fastrnn/ops/__init__.py for the contract."""
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    # inference skips the saved activations (gates, c, hn): less memory and traffic
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, h_n, c_n, _, _, _ = layer_fwd(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save)
    return y, h_n, (c_n if mode == "LSTM" else None)
