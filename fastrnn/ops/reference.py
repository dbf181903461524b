"""Reference backend: whole-tensor PyTorch ops per time step, differentiated by autograd.

It is the ground truth the fused kernels are tested against and the fallback wherever they cannot run.
Half-precision storage is computed in fp32 and cast back on return, as the fused kernels do.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrnn import ops as _ops
from fastrnn.ops import LN_EPS, CellExt, LayerArgs, LayerOut, check, check_ext, parse_layer_args

Norm = Optional[Tuple[Tensor, Tensor]]


def availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if not dtype.is_floating_point:
        return f"needs a floating-point dtype, got {dtype}"
    return None


EXT_FEATURES = _ops.EXT_FEATURES  # the reference runs every one of fastrnn's cells


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def project(v: Tensor, w: Tensor, b: Optional[Tensor], ln: Norm = None) -> Tensor:
    """``v @ w.T + b``, with ``ln = (gain, shift)`` a LayerNorm of ``v @ w.T`` before ``b``."""
    if ln is None:
        return F.linear(v, w, b)
    p = F.layer_norm(F.linear(v, w), (w.shape[0],), ln[0], ln[1], LN_EPS)
    return p if b is None else p + b


def cell_step(
    mode: str,
    xp: Tensor,
    h: Tensor,
    c: Optional[Tensor],
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    ln_hh: Norm = None,
    ln_c: Norm = None,
    rec_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """One step given the input projection ``xp`` (``project(x, w_ih, b_ih, ln_ih)``) for the active rows."""
    hp = project(h if rec_mask is None else h * rec_mask, w_hh, b_hh, ln_hh)
    if mode == "LSTM":
        i, f, g, o = (xp + hp).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = c_new if ln_c is None else F.layer_norm(c_new, (c_new.shape[1],), ln_c[0], ln_c[1], LN_EPS)
        h_new = torch.sigmoid(o) * torch.tanh(c_out)
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


def zoneout(z: Tensor, prev: Tensor, new: Tensor) -> Tensor:
    """Each unit keeps ``prev`` with weight ``z`` (0/1 in training, ``p`` in eval)."""
    return z * prev + (1 - z) * new


def layer(*args, ext: Optional[CellExt] = None, **kwargs) -> LayerOut:
    """One layer in one direction: ``layer(args: LayerArgs)`` or the fields flat (see ``fastrnn.ops``), with
    fastrnn's own cells through ``ext``."""
    a, options = parse_layer_args(args, kwargs)
    if options:
        raise TypeError(f"the reference backend takes no options, got {sorted(options)}")
    check(a)
    if ext is not None:
        check_ext(a, ext)
    return _layer(a, ext or CellExt())


def _layer(a: LayerArgs, e: CellExt) -> LayerOut:
    mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse = a
    out_dtype = x.dtype
    cdt = compute_dtype(out_dtype)

    def up(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(cdt)

    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = map(up, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    e = CellExt(*map(up, e))
    ln_ih, ln_hh = ((e.ln_ih_weight, e.ln_ih_bias), (e.ln_hh_weight, e.ln_hh_bias)) if e.layer_norm else (None, None)
    ln_c = (e.ln_c_weight, e.ln_c_bias) if e.layer_norm and mode == "LSTM" else None
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

    xp = project(x, w_ih, b_ih, ln_ih)
    h, c = h0, c0
    outs: List[Optional[Tensor]] = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        b, rows = sizes[t], slice(offsets[t], offsets[t] + sizes[t])
        rec_mask = None if e.rec_mask is None else e.rec_mask[:b]
        h_new, c_new = cell_step(mode, xp[rows], h[:b], None if c is None else c[:b], w_hh, b_hh, w_hr,
                                 ln_hh, ln_c, rec_mask)
        if e.zoneout_h is not None:
            h_new = zoneout(e.zoneout_h[rows], h[:b], h_new)
            if c is not None:
                c_new = zoneout(e.zoneout_c[rows], c[:b], c_new)
        outs[t] = h_new
        h = torch.cat([h_new, h[b:]]) if b < B else h_new
        if c is not None:
            c = torch.cat([c_new, c[b:]]) if b < B else c_new
    y = torch.cat(outs) if T else x.new_empty(0, h0.shape[1])
    cast = lambda t: None if t is None else t.to(out_dtype)  # noqa: E731
    return LayerOut(cast(y), cast(h), cast(c))
