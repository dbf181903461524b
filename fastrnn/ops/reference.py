"""Reference backend: whole-tensor PyTorch ops per time step, differentiated by autograd.

It is the ground truth the fused kernels are tested against and the fallback wherever they cannot run.
Half-precision storage is computed in fp32 and cast back on return, as the fused kernels do.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrnn.ops import LayerArgs, LayerOut, check, parse_layer_args


def availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if not dtype.is_floating_point:
        return f"needs a floating-point dtype, got {dtype}"
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cell_step(
    mode: str,
    xp: Tensor,
    h: Tensor,
    c: Optional[Tensor],
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
) -> Tuple[Tensor, Optional[Tensor]]:
    """One step given the input projection ``xp = x @ w_ih.T + b_ih`` for the active rows."""
    hp = F.linear(h, w_hh, b_hh)
    if mode == "LSTM":
        i, f, g, o = (xp + hp).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = F.linear(h_new, w_hr)
        return h_new, c_new
    if mode == "GRU":
        x_r, x_z, x_n = xp.chunk(3, 1)
        h_r, h_z, h_n = hp.chunk(3, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    if mode == "RNN_TANH":
        return torch.tanh(xp + hp), None
    if mode == "RNN_RELU":
        return torch.relu(xp + hp), None
    raise ValueError(f"unknown mode {mode!r}")


def layer(*args, **kwargs) -> LayerOut:
    """One layer in one direction: ``layer(args: LayerArgs)`` or the fields flat (see ``fastrnn.ops``)."""
    a, options = parse_layer_args(args, kwargs)
    if options:
        raise TypeError(f"the reference backend takes no options, got {sorted(options)}")
    check(a)
    return _layer(a)


def _layer(a: LayerArgs) -> LayerOut:
    mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse = a
    out_dtype = x.dtype
    cdt = compute_dtype(out_dtype)

    def up(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(cdt)

    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = map(up, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    B = h0.shape[0]
    if batch_sizes is None:
        T = x.shape[0] // B if B else 0
        sizes: List[int] = [B] * T
    else:
        sizes = [int(s) for s in batch_sizes.tolist()]
        T = len(sizes)
    offsets = [0] * T
    for t in range(1, T):
        offsets[t] = offsets[t - 1] + sizes[t - 1]

    xp = F.linear(x, w_ih, b_ih)
    h, c = h0, c0
    outs: List[Optional[Tensor]] = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        b = sizes[t]
        h_new, c_new = cell_step(
            mode, xp[offsets[t] : offsets[t] + b], h[:b], None if c is None else c[:b], w_hh, b_hh, w_hr
        )
        outs[t] = h_new
        h = torch.cat([h_new, h[b:]]) if b < B else h_new
        if c is not None:
            c = torch.cat([c_new, c[b:]]) if b < B else c_new
    y = torch.cat(outs) if T else x.new_empty(0, h0.shape[1])
    cast = lambda t: None if t is None else t.to(out_dtype)  # noqa: E731
    return LayerOut(cast(y), cast(h), cast(c))
