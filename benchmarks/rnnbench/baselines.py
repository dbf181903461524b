"""``loop-eager`` and ``loop-compiled``: a plain PyTorch cell loop, written the way one would by hand."""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _cell(mode: str, xp: Tensor, h: Tensor, c: Optional[Tensor], w_hh_t: Tensor, b_hh: Tensor):
    """One step; ``xp`` already holds the input projection with every bias that can be folded into it."""
    if mode == "GRU":
        # b_hn sits inside r * (W_hn h + b_hn), so GRU keeps b_hh on the recurrent side
        hp = torch.addmm(b_hh, h, w_hh_t)
        xr, xz, xn = xp.chunk(3, 1)
        hr, hz, hn = hp.chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(torch.addcmul(xn, r, hn))
        return n + z * (h - n), None
    pre = torch.addmm(xp, h, w_hh_t)
    if mode == "LSTM":
        i, f, g, o = pre.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _loop_direction(mode, steps: Sequence[Tensor], h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hh, reverse):
    """Runs the cell over ``steps`` (rows active at each step; packed batches shrink over time).

    Rows leaving the batch (forward direction) are stashed as their final state; rows joining it (reverse
    direction) start from ``h0``, which is how torch.nn treats packed sequences.
    """
    seq = steps[::-1] if reverse else steps
    w_hh_t = w_hh.t()
    n = seq[0].shape[0]
    h, c = h0[:n], (None if c0 is None else c0[:n])
    gone_h: List[Tensor] = []
    gone_c: List[Tensor] = []
    outs = []
    for xp in seq:
        bs = xp.shape[0]
        if bs < h.shape[0]:
            gone_h.append(h[bs:])
            h = h[:bs]
            if c is not None:
                gone_c.append(c[bs:])
                c = c[:bs]
        elif bs > h.shape[0]:
            h = torch.cat([h, h0[h.shape[0] : bs]])
            if c is not None:
                c = torch.cat([c, c0[c.shape[0] : bs]])
        h, c = _cell(mode, xp, h, c, w_hh_t, b_hh)
        outs.append(h)
    if reverse:
        outs.reverse()
    h_n = torch.cat([h] + gone_h[::-1])
    c_n = None if c is None else torch.cat([c] + gone_c[::-1])
    return torch.cat(outs), h_n, c_n


def loop_forward(
    mode: str,
    rows: Tensor,
    batch_sizes: Tuple[int, ...],
    packed: bool,
    params: List[Tensor],
    num_layers: int,
    num_dir: int,
):
    """Multi-layer (bi)directional RNN over time-major rows; returns (rows, h_n, c_n) like torch.nn.

    The input projection of a whole layer is one GEMM; ``unbind`` (or ``split`` for packed rows) then
    hands out the steps, because indexing ``xp[t]`` would give backward one full-size gradient buffer per
    step, quadratic in T.
    """
    B = batch_sizes[0]
    H = params[1].shape[1]
    h0 = rows.new_zeros(B, H)
    c0 = h0 if mode == "LSTM" else None
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(num_dir):
            w_ih, w_hh, b_ih, b_hh = params[4 * (layer * num_dir + d) : 4 * (layer * num_dir + d) + 4]
            xp = F.linear(rows, w_ih, b_ih if mode == "GRU" else b_ih + b_hh)
            steps = xp.split(list(batch_sizes)) if packed else xp.view(len(batch_sizes), B, -1).unbind(0)
            y, h, c = _loop_direction(mode, steps, h0, c0, w_hh, b_hh, d == 1)
            outs.append(y)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        rows = outs[0] if num_dir == 1 else torch.cat(outs, 1)
    return rows, torch.stack(h_n), (torch.stack(c_n) if c_n else None)
