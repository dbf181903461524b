"""Host side of the Triton backend: row bookkeeping, the time loops, CUDA-graph replay and the custom ops.

The input projection of all steps is one GEMM before the loop, written in fp32 like every buffer kept
between forward and backward, whatever the storage dtype (state stays fp32; only ``y``, ``h_n`` and
``c_n`` are cast on the way out):

- ``hs [N, Hout]``: h of every row after its step (``y`` before the cast; the state the next step reads).
- ``hr [N, H]``: LSTM with projection only, h before ``w_hr``.
- ``cs [N, H]``: LSTM cell of every row.
- ``save [N, 4H]``: activated gates (see ``triton_cells``).

Backward produces ``g_h [N, G*H]`` (gradients of the recurrent pre-activations) and, for GRU, ``g_x [N, H]``
(input-side n gradient); all weight gradients are then single GEMMs over all rows.
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton.language as tl
from torch import Tensor

from fastrnn.ops import GATES, MODES
from fastrnn.ops.triton_seq import SEQ_MAX_H, _fwd_seq_kernel, bwd_seq, fwd_seq, seq_config
from fastrnn.ops.triton_step import bwd_step, fwd_step, placeholder

MODE_IDS = {m: i for i, m in enumerate(MODES)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VARIANTS = ("step", "seq")


def interpreting() -> bool:
    """Whether the kernels run in the Triton interpreter.

    Triton decides per function when it is decorated, so both ours and triton.language's own jit helpers
    (``tl.zeros``) must have been created with ``TRITON_INTERPRET=1``: setting it after importing triton
    but before fastrnn would mix the two and fail inside the kernels.
    """
    return all(type(fn).__name__ == "InterpretedFunction" for fn in (_fwd_seq_kernel, tl.zeros))


def upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def pick_variant(H: int, dtype: torch.dtype, has_proj: bool) -> str:
    return "seq" if not has_proj and seq_config(H, dtype) is not None else "step"


@dataclass
class Rows:
    """Which rows of the ``[N, *]`` time-major layout each processed step covers.

    ``order`` lists the steps in processing order (``T-1 .. 0`` in reverse). A step's rows start their state
    from the previous processed step's rows when active there, else from the initial state.
    """

    sizes: List[int]
    offsets: List[int]
    order: List[int]
    prev_index: Tensor
    first_rows: Tensor
    last_rows: Tensor

    @property
    def N(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0

    def rows(self, t: int) -> slice:
        return slice(self.offsets[t], self.offsets[t] + self.sizes[t])

    def neighbour(self, k: int) -> Tuple[slice, int]:
        """Rows and count of processing position ``k`` (empty if out of range)."""
        if 0 <= k < len(self.order):
            t = self.order[k]
            return self.rows(t), self.sizes[t]
        return slice(0, 0), 0


def plan_rows(batch_sizes: Optional[Tensor], B: int, N: int, reverse: bool, device: torch.device) -> Rows:
    if batch_sizes is None:
        T = N // B if B else 0
        sz = torch.full((T,), B, dtype=torch.int64)
    else:
        sz = batch_sizes.to("cpu", torch.int64)
        T = sz.numel()
    off = torch.cumsum(sz, 0) - sz
    order = torch.arange(T - 1, -1, -1) if reverse else torch.arange(T)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(T)
    step = torch.repeat_interleave(torch.arange(T), sz)
    b = torch.arange(int(sz.sum())) - off[step]
    k_prev = pos[step] - 1
    t_prev = order[k_prev.clamp(min=0)]
    has_prev = (k_prev >= 0) & (b < sz[t_prev])
    prev_index = torch.where(has_prev, off[t_prev] + b, N + b)
    lengths = (sz[None, :] > torch.arange(B)[:, None]).sum(1)
    t_first = lengths - 1 if reverse else torch.zeros_like(lengths)
    t_last = torch.zeros_like(lengths) if reverse else lengths - 1
    idx = torch.arange(B)
    return Rows(
        sizes=sz.tolist(),
        offsets=off.tolist(),
        order=order.tolist(),
        prev_index=prev_index.to(device),
        first_rows=(off[t_first] + idx).to(device),
        last_rows=(off[t_last] + idx).to(device),
    )


def nan_fill() -> bool:
    """NaN-fill kernel outputs before launch so an element a kernel forgot to write shows up: always under
    the interpreter (the tests), on a GPU only with ``FASTRNN_TRITON_NAN_FILL=1`` since each fill is an
    extra full write of the buffer."""
    return interpreting() or os.environ.get("FASTRNN_TRITON_NAN_FILL") == "1"


def nan_buffer(n: int, m: int, like: Tensor) -> Tensor:
    """fp32 ``[n, m]`` kernel output buffer (NaN-filled, see :func:`nan_fill`)."""
    if nan_fill():
        return torch.full((n, m), float("nan"), device=like.device, dtype=torch.float32)
    return torch.empty((n, m), device=like.device, dtype=torch.float32)


def padded_state(B: int, H: int, w_hh: Tensor, present: bool = True) -> Tensor:
    """fp32 final-state buffer of the seq kernels, padded to whole tiles (they store it unmasked)."""
    if not present:
        return placeholder(w_hh)
    cfg = seq_config(H, w_hh.dtype)
    return nan_buffer(-(-B // cfg["BB"]) * cfg["BB"], cfg["BH"], w_hh)


_GRAPHS: Dict[tuple, tuple] = {}


def run_loop(key: Optional[tuple], loop: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor]) -> List[Tensor]:
    """Run ``loop(*inputs)``, or with a ``key`` replay a CUDA graph of it captured on first use.

    UNVERIFIED: this path has never run on a GPU. Capture follows ``torch.cuda.graphs``: warm up on a side
    stream, capture into a graph whose inputs are copies held by the cache, then per call copy the new
    inputs in, replay and clone the outputs (the next replay overwrites them). ``key`` must determine
    every host-side decision the loop makes (shapes, batch sizes, flags).
    """
    if key is None:
        return list(loop(*inputs))
    entry = _GRAPHS.get(key)
    if entry is None:
        static_in = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = list(loop(*static_in))
        entry = _GRAPHS[key] = (graph, static_in, static_out)
    graph, static_in, static_out = entry
    for dst, src in zip(static_in, inputs):
        dst.copy_(src)
    graph.replay()
    return [t.clone() for t in static_out]


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor]) -> Tensor:
    """``x @ w_ih.T + b_ih`` for all steps in one GEMM, kept in fp32 so half storage loses no gate precision.

    On CUDA a half-precision GEMM writes fp32 directly (``out_dtype``); elsewhere the operands are upcast.
    """
    if x.dtype != torch.float32 and x.is_cuda:
        xp = torch.mm(x, w_ih.t(), out_dtype=torch.float32)
        return xp if b_ih is None else xp.add_(b_ih.float())
    return F.linear(x.float(), w_ih.float(), None if b_ih is None else b_ih.float())


def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is not None and t.numel() else None


def forward(mode: str, x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
            w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
            w_hr: Optional[Tensor], reverse: bool, variant: str, cuda_graph: bool):
    """Returns ``(y, h_n, c_n, hs, hr, cs, save)``; absent tensors are empty."""
    mode_id, G = MODE_IDS[mode], GATES[mode]
    # The kernels index rows with their logical width as stride.
    h0, c0, w_hh, b_hh = (None if t is None else t.contiguous() for t in (h0, c0, w_hh, b_hh))
    B, H, N = h0.shape[0], w_hh.shape[0] // G, x.shape[0]
    rows = plan_rows(batch_sizes, B, N, reverse, x.device)
    upcast = upcast_dot(w_hh.dtype)
    xp = input_projection(x, w_ih, b_ih)
    empty = x.new_empty(0, dtype=torch.float32)
    if variant == "seq":
        hs = nan_buffer(N, H, x)
        cs = nan_buffer(N, H, x) if mode == "LSTM" else placeholder(x)
        save = nan_buffer(N, 4 * H, x) if mode in ("LSTM", "GRU") else placeholder(x)
        h_n, c_n = padded_state(B, H, w_hh), padded_state(B, H, w_hh, mode == "LSTM")
        bs = torch.tensor(rows.sizes, dtype=torch.int32, device=x.device)
        off = torch.tensor(rows.offsets, dtype=torch.int64, device=x.device)
        fwd_seq(mode_id, G, xp, b_hh, w_hh, h0, c0 if c0 is not None else placeholder(x), bs, off,
                hs, cs, save, h_n, c_n, reverse, upcast)
        h_n, c_n = h_n[:B, :H].contiguous(), (c_n[:B, :H].contiguous() if mode == "LSTM" else c_n)
        hr = x.new_empty(0, H, dtype=torch.float32)
    else:
        def loop(xp, h0, c0, w_hh, b_hh, w_hr, last_rows):
            HO = h0.shape[1]
            hs = nan_buffer(N, HO, xp)
            hr = nan_buffer(N, H, xp) if w_hr.numel() else hs
            cs = nan_buffer(N, H, xp) if mode == "LSTM" else placeholder(xp)
            save = nan_buffer(N, 4 * H, xp) if mode in ("LSTM", "GRU") else placeholder(xp)
            w_hr32 = w_hr.float()
            for k, t in enumerate(rows.order):
                r, n = rows.rows(t), rows.sizes[t]
                rp, n_prev = rows.neighbour(k - 1)
                fwd_step(mode_id, G, xp[r], _opt(b_hh), w_hh, hs[rp], h0, cs[rp] if mode == "LSTM" else cs,
                         c0 if c0.numel() else cs, hr[r], cs[r] if mode == "LSTM" else cs,
                         save[r] if mode in ("LSTM", "GRU") else save, n, n_prev, upcast)
                if w_hr.numel():
                    torch.mm(hr[r], w_hr32.t(), out=hs[r])
            h_n = hs[last_rows]
            c_n = cs[last_rows] if mode == "LSTM" else placeholder(xp)
            return hs, (hr if w_hr.numel() else hs.new_empty(0, H)), cs, save, h_n, c_n

        key = None
        if cuda_graph:
            key = ("fwd", mode, tuple(rows.sizes), reverse, x.device, xp.dtype, tuple(h0.shape), tuple(w_hh.shape),
                   b_hh is not None, c0 is not None, w_hr is not None)
        hs, hr, cs, save, h_n, c_n = run_loop(
            key, loop, [xp, h0, c0 if c0 is not None else empty, w_hh, b_hh if b_hh is not None else empty,
                        w_hr if w_hr is not None else empty, rows.last_rows])
    dt = x.dtype
    y = hs if dt == torch.float32 else hs.to(dt)
    hs_keep = x.new_empty(0, hs.shape[1], dtype=torch.float32) if dt == torch.float32 else hs
    c_out = c_n.to(dt) if mode == "LSTM" else x.new_empty(0)
    return y, h_n.to(dt), c_out, hs_keep, hr, cs, save


def backward(mode: str, x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
             w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
             w_hr: Optional[Tensor], reverse: bool, variant: str, cuda_graph: bool,
             hs: Tensor, hr: Tensor, cs: Tensor, save: Tensor,
             dy: Optional[Tensor], dh_n: Optional[Tensor], dc_n: Optional[Tensor]):
    """Gradients ``(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)``; absent ones are empty."""
    mode_id, G = MODE_IDS[mode], GATES[mode]
    B, HO, N = h0.shape[0], h0.shape[1], x.shape[0]
    H = w_hh.shape[0] // G
    rows = plan_rows(batch_sizes, B, N, reverse, x.device)
    upcast = upcast_dot(w_hh.dtype)
    empty = x.new_empty(0, dtype=torch.float32)
    lstm, gru, proj = mode == "LSTM", mode == "GRU", w_hr is not None
    w_hh = w_hh.contiguous()
    dy = torch.zeros(N, HO, device=x.device, dtype=x.dtype) if dy is None else dy.contiguous()
    dh_n = torch.zeros(B, HO, device=x.device) if dh_n is None else dh_n.float().contiguous()
    if lstm:
        dc_n = torch.zeros(B, H, device=x.device) if dc_n is None else dc_n.float().contiguous()
    else:
        dc_n = placeholder(x)
    h_prev = torch.cat([hs, h0.float()])[rows.prev_index]
    c_prev = torch.cat([cs, c0.float()])[rows.prev_index] if lstm else placeholder(x)
    h_cell = hr if proj else hs
    if variant == "seq":
        g_h = nan_buffer(N, G * H, x)
        g_x = nan_buffer(N, H, x) if gru else placeholder(x)
        dh0, dc0 = padded_state(B, H, w_hh), padded_state(B, H, w_hh, lstm)
        bs = torch.tensor(rows.sizes, dtype=torch.int32, device=x.device)
        off = torch.tensor(rows.offsets, dtype=torch.int64, device=x.device)
        bwd_seq(mode_id, G, dy, dh_n, dc_n, w_hh, save, hs, cs, h_prev, c_prev, bs, off,
                g_h, g_x, dh0, dc0, reverse, upcast)
        dh0, dc0 = dh0[:B, :H].contiguous(), (dc0[:B, :H].contiguous() if lstm else dc0)
        dhs = empty
    else:
        def loop(dy, dh_n, dc_n, w_hh, w_hr, save, h_cell, cs, h_prev, c_prev, first_rows):
            g_h = nan_buffer(N, G * H, dy)
            g_x = nan_buffer(N, H, dy) if gru else placeholder(dy)
            dh_state, dc_state = dh_n.clone(), dc_n.clone()
            dhs = nan_buffer(N, HO, dy) if proj else placeholder(dy)
            w_hh32, w_hr32 = w_hh.float(), w_hr.float()
            for k in range(len(rows.order) - 1, -1, -1):
                t = rows.order[k]
                r, n = rows.rows(t), rows.sizes[t]
                rp, n_prev = rows.neighbour(k + 1)
                if proj:
                    # The projection mixes all hidden units, so dh is assembled here: dh_t = dy_t + dG_{t+1} W_hh.
                    if n_prev:
                        torch.mm(g_h[rp], w_hh32, out=dh_state[:n_prev])
                    torch.add(dh_state[:n], dy[r], out=dhs[r])
                    dh_step = dhs[r] @ w_hr32
                else:
                    dh_step = dy[r]
                bwd_step(mode_id, G, dh_step, dh_state, dc_state, g_h[rp], w_hh, save[r] if lstm or gru else save,
                         h_cell[r], cs[r] if lstm else cs, h_prev[r], c_prev[r] if lstm else c_prev,
                         g_h[r], g_x[r] if gru else g_x, n, n_prev, proj, upcast)
            dh0 = g_h[first_rows] @ w_hh32
            if not proj:
                dh0 = dh0 + dh_state
            return g_h, g_x, dh0, dc_state, dhs

        key = None
        if cuda_graph:
            key = ("bwd", mode, tuple(rows.sizes), reverse, x.device, x.dtype, tuple(h0.shape), tuple(w_hh.shape),
                   proj)
        g_h, g_x, dh0, dc0, dhs = run_loop(
            key, loop, [dy, dh_n, dc_n, w_hh, w_hr if proj else empty, save, h_cell, cs, h_prev, c_prev,
                        rows.first_rows])
    g_in = torch.cat([g_h[:, : 2 * H], g_x], 1) if gru else g_h
    dt = x.dtype
    dx = (g_in @ w_ih.float()).to(dt)
    dw_ih = (g_in.t() @ x.float()).to(dt)
    dw_hh = (g_h.t() @ h_prev).to(dt)
    absent = lambda: x.new_empty(0)  # noqa: E731  (custom-op outputs must not alias each other)
    db_ih = g_in.sum(0).to(dt) if b_ih is not None else absent()
    db_hh = g_h.sum(0).to(dt) if b_hh is not None else absent()
    dw_hr = (dhs.t() @ hr).to(dt) if proj else absent()
    return dx, dh0.to(dt), (dc0.to(dt) if lstm else absent()), dw_ih, dw_hh, db_ih, db_hh, dw_hr


@torch.library.custom_op("fastrnn::triton_layer_fwd", mutates_args=())
def layer_fwd(mode: str, x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
              w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
              w_hr: Optional[Tensor], reverse: bool, variant: str, cuda_graph: bool
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return forward(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, variant, cuda_graph)


@layer_fwd.register_fake
def _(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, variant, cuda_graph):
    G = GATES[mode]
    N, (B, HO), H = x.shape[0], h0.shape, w_hh.shape[0] // G
    f32 = dict(dtype=torch.float32)
    lstm, has_save = mode == "LSTM", mode in ("LSTM", "GRU")
    return (
        x.new_empty(N, HO),
        x.new_empty(B, HO),
        x.new_empty(B, H) if lstm else x.new_empty(0),
        x.new_empty(0 if x.dtype == torch.float32 else N, HO, **f32),
        x.new_empty(N if w_hr is not None else 0, H, **f32),
        x.new_empty(N, H, **f32) if lstm else x.new_empty(1, **f32),
        x.new_empty(N, 4 * H, **f32) if has_save else x.new_empty(1, **f32),
    )


@torch.library.custom_op("fastrnn::triton_layer_bwd", mutates_args=())
def layer_bwd(mode: str, x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
              w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
              w_hr: Optional[Tensor], reverse: bool, variant: str, cuda_graph: bool,
              hs: Tensor, hr: Tensor, cs: Tensor, save: Tensor,
              dy: Optional[Tensor], dh_n: Optional[Tensor], dc_n: Optional[Tensor]
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, variant, cuda_graph,
                    hs, hr, cs, save, dy, dh_n, dc_n)


@layer_bwd.register_fake
def _(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, variant, cuda_graph,
      hs, hr, cs, save, dy, dh_n, dc_n):
    def like(t: Optional[Tensor]) -> Tensor:
        return x.new_empty(0) if t is None else torch.empty_like(t)

    return like(x), like(h0), like(c0), like(w_ih), like(w_hh), like(b_ih), like(b_hh), like(w_hr)


_INPUT_NAMES = ("mode", "x", "batch_sizes", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "reverse",
                "variant", "cuda_graph")


def _setup_context(ctx, inputs, output):
    ctx.args = dict(zip(_INPUT_NAMES, inputs))
    y, _, _, hs_keep, hr, cs, save = output
    ctx.save_for_backward(y, hs_keep, hr, cs, save)


def _backward(ctx, dy, dh_n, dc_n, *_unused):
    y, hs_keep, hr, cs, save = ctx.saved_tensors
    a = ctx.args
    hs = hs_keep if hs_keep.numel() else y
    grads = layer_bwd(*(a[k] for k in _INPUT_NAMES), hs, hr, cs, save, dy, dh_n,
                      dc_n if a["mode"] == "LSTM" else None)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = grads
    keep = lambda g, ref: g if ref is not None else None  # noqa: E731
    return (None, dx, None, dh0, keep(dc0, a["c0"]), dw_ih, dw_hh, keep(db_ih, a["b_ih"]),
            keep(db_hh, a["b_hh"]), keep(dw_hr, a["w_hr"]), None, None, None)


layer_fwd.register_autograd(_backward, setup_context=_setup_context)
