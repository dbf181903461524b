"""Host driver of the Triton backend: row bookkeeping, the time loops and CUDA-graph replay.

The input projection of all steps is one GEMM before the loop, written in fp32 like every buffer kept
between forward and backward, whatever the storage dtype (state stays fp32; only ``y``, ``h_n`` and
``c_n`` are cast on the way out). Step buffers, kept for backward in the ``fastrnn.ops.Saved`` layout:

- ``hs: [N, Hout]``: h of every row after its step (``y`` before the cast; the state the next step reads).
- ``hr: [N, H]``: LSTM with projection only, h before ``w_hr``.
- ``cs: [N, H]``: LSTM cell of every row.
- ``gates: [N, G*H]``, ``hn: [N, H]``: activated gates and GRU's ``W_hn h + b_hn`` (see ``cells``), written
  only when backward will run.

Backward produces ``g_h: [N, G*H]`` (gradients of the recurrent pre-activations) and, for GRU, ``g_x: [N, H]``
(input-side n gradient); all weight gradients are then single GEMMs over all rows.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrnn.ops import GATES, MODES, LayerArgs, Saved
from fastrnn.ops.triton import persist
from fastrnn.ops.triton.cells import INTERPRETER_PROBLEM, interpreting
from fastrnn.ops.triton.seq import bwd_seq, fwd_seq, seq_config, seq_max_h
from fastrnn.ops.triton.step import bwd_step, fwd_step

MODE_IDS = {m: i for i, m in enumerate(MODES)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VARIANTS = ("step", "seq", "persist")
__all__ = ["DTYPES", "VARIANTS", "seq_max_h", "seq_config", "backward", "forward", "INTERPRETER_PROBLEM",
           "interpreting", "pick_variant"]


def upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def persist_fits(B: int, H: int, has_proj: bool, device: torch.device) -> bool:
    """Whether the ``"persist"`` kernels take this layer (no projection, a grid the device holds at once)."""
    return not has_proj and persist.persist_config(B, H, persist.device_programs(device)) is not None


def pick_variant(H: int, dtype: torch.dtype, has_proj: bool, mode: str, B: int = 1,
                 device: torch.device = torch.device("cpu")) -> str:
    """``"seq"`` where W_hh fits in registers, else ``"persist"`` where it fits and ``FASTRNN_PERSISTENT=1``
    asks for it on CUDA (see ``persist.enabled_by_default``), else ``"step"``."""
    if not has_proj and seq_config(H, dtype, mode) is not None:
        return "seq"
    if device.type == "cuda" and persist.enabled_by_default() and persist_fits(B, H, has_proj, device):
        return "persist"
    return "step"


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host table on ``device``: to CUDA from pinned memory without waiting for the GPU, which a blocking copy
    does and a CUDA graph capture (a user's ``torch.cuda.graph`` around a fastrnn model) refuses; torch's caching
    host allocator keeps the pinned block until the copy has run, and for as long as a capture's graph lives."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def step_tables(rows: "Rows", device: torch.device) -> Tuple[Tensor, Tensor]:
    """Rows and first row of every step, ``int32``/``int64 [T]`` on the device, for the kernels that loop over
    time themselves."""
    return (to_device(torch.tensor(rows.sizes, dtype=torch.int32), device),
            to_device(torch.tensor(rows.offsets, dtype=torch.int64), device))


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
        prev_index=to_device(prev_index, device),
        first_rows=to_device(off[t_first] + idx, device),
        last_rows=to_device(off[t_last] + idx, device),
    )


def nan_fill() -> bool:
    """NaN-fill kernel outputs before launch so an element a kernel forgot to write shows up: always under
    the interpreter (the tests), on a GPU only with ``FASTRNN_TRITON_NAN_FILL=1`` since each fill is an
    extra full write of the buffer."""
    return interpreting() or os.environ.get("FASTRNN_TRITON_NAN_FILL") == "1"


def nan_buffer(n: int, m: int, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[n, m]`` kernel output buffer, fp32 unless ``dtype`` (NaN-filled, see :func:`nan_fill`)."""
    if nan_fill():
        return torch.full((n, m), float("nan"), device=like.device, dtype=dtype)
    return torch.empty((n, m), device=like.device, dtype=dtype)


def placeholder(ref: Tensor) -> Tensor:
    """A one-element fp32 tensor for pointer arguments a constexpr flag keeps the kernel from touching."""
    return torch.empty(1, device=ref.device, dtype=torch.float32)


def _ptr(t: Tensor, ref: Tensor) -> Tensor:
    return t if t.numel() else placeholder(ref)


def padded_state(B: int, H: int, w_hh: Tensor, mode: str, present: bool = True) -> Tensor:
    """fp32 final-state buffer of the seq kernels, padded to whole tiles (they store it unmasked)."""
    if not present:
        return placeholder(w_hh)
    cfg = seq_config(H, w_hh.dtype, mode)
    return nan_buffer(-(-B // cfg["BB"]) * cfg["BB"], cfg["BH"], w_hh)


# Captured graphs, least recently used first. Each holds a copy of its loop's inputs and its outputs (for
# one layer and direction: about the activations kept for backward, G*H+2H fp32 values per row) plus the
# graph's private memory pool, so the cache is bounded: GRAPH_CACHE_SIZE shapes, the oldest dropped first.
GRAPH_CACHE_SIZE = 16
_GRAPHS: "OrderedDict[tuple, tuple]" = OrderedDict()
# Keys called once and not captured yet (a few hundred bytes each; the oldest forgotten first). A capture costs a
# device synchronisation, a gc.collect() and an emptied cache (torch.cuda.graph's entry), paid back only by a
# shape that comes again: packed batches whose lengths change every call never do, and run as they are.
_SEEN: "OrderedDict[tuple, None]" = OrderedDict()
SEEN_SIZE = 4 * GRAPH_CACHE_SIZE


def run_loop(key: Optional[tuple], loop: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor]) -> List[Tensor]:
    """Run ``loop(*inputs)``, or with a ``key`` replay a CUDA graph of it, captured on the key's second call.

    UNVERIFIED on a GPU (the CPU tests replay an emulation of the capture, see :func:`_capture`). Per call the new
    inputs are copied into the copies the graph was captured on, the graph replays and its outputs are cloned
    (the next replay overwrites them). So ``loop`` must read every tensor through ``inputs`` (a tensor of the
    caller's it closed over would stay the capturing call's) and allocate what it writes, or return what it writes
    into an input (the caller's own tensor is not written then); and ``key`` must determine every host-side
    decision it makes (batch sizes, flags). The inputs' dtypes and shapes are added here, since a graph's input
    copies keep the capturing call's (``copy_`` would convert a later call's inputs to them silently: fp32 weights
    replayed in fp16), and whether inference mode is on (copies made in it refuse a later call's ``copy_``).
    """
    if key is None or (inputs[0].is_cuda and torch.cuda.is_current_stream_capturing()):
        # inside a caller's own capture the launches are recorded into that graph already
        return list(loop(*inputs))
    key = (key, torch.is_inference_mode_enabled(), tuple((t.dtype, tuple(t.shape)) for t in inputs))
    entry = _GRAPHS.get(key)
    if entry is not None:
        _GRAPHS.move_to_end(key)
    elif key not in _SEEN:
        _SEEN[key] = None
        while len(_SEEN) > SEEN_SIZE:
            _SEEN.popitem(last=False)
        return list(loop(*inputs))
    else:
        del _SEEN[key]
        while len(_GRAPHS) >= GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
        static_in = [t.clone() for t in inputs]
        entry = _GRAPHS[key] = (_capture(loop, static_in), static_in)
    replay, static_in = entry
    for dst, src in zip(static_in, inputs):
        dst.copy_(src)
    return [t.clone() for t in replay()]


def _capture(loop: Callable[..., Sequence[Tensor]], static_in: List[Tensor]) -> Callable[[], Sequence[Tensor]]:
    """Capture ``loop(*static_in)`` into a CUDA graph (after a warm-up on a side stream, as ``torch.cuda.graphs``
    asks); returns what replays it and gives its outputs. The tests swap in a CPU emulation that reruns the
    capturing call's ``loop`` on ``static_in``: like the graph, it reads every tensor that call closed over."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop(*static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # The capture is fastrnn's, not the caller's: with the default ("global") mode a cudaMalloc or cudaHostAlloc
    # that another thread of the program makes meanwhile (a DataLoader's pinning thread) would fail. Only this
    # thread's calls are checked, as torch.compile's own CUDA graphs do.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out = list(loop(*static_in))

    def replay() -> Sequence[Tensor]:
        graph.replay()
        return static_out

    return replay


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor]) -> Tensor:
    """``x @ w_ih.T + b_ih`` for all steps in one GEMM, kept in fp32 so half storage loses no gate precision.

    On CUDA a half-precision GEMM writes fp32 directly (``out_dtype``); elsewhere the operands are upcast.
    """
    if x.dtype != torch.float32 and x.is_cuda:
        xp = torch.mm(x, w_ih.t(), out_dtype=torch.float32)
        return xp if b_ih is None else xp.add_(b_ih.float())
    return F.linear(x.float(), w_ih.float(), None if b_ih is None else b_ih.float())


def none_if_empty(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is not None and t.numel() else None


def _saved_buffers(mode: str, N: int, H: int, save: bool, like: Tensor) -> Tuple[Tensor, Tensor]:
    """``gates`` and GRU's ``hn``, or placeholders when nothing is saved."""
    gates = nan_buffer(N, GATES[mode] * H, like) if save and mode in ("LSTM", "GRU") else placeholder(like)
    hn = nan_buffer(N, H, like) if save and mode == "GRU" else placeholder(like)
    return gates, hn


def forward(a: LayerArgs, options: tuple, save: bool) -> Tuple[Tensor, Tensor, Tensor, Saved]:
    """``(y, h_n, c_n, saved)``; ``c_n`` is empty unless LSTM, ``saved`` is empty unless ``save``."""
    variant, cuda_graph = options
    mode, x, w_hr, reverse = a.mode, a.x, a.w_hr, a.reverse
    mode_id, G, lstm, gru = MODE_IDS[mode], GATES[mode], mode == "LSTM", mode == "GRU"
    # The kernels index rows with their logical width as stride.
    h0, c0, w_hh, b_hh = (None if t is None else t.contiguous() for t in (a.h0, a.c0, a.w_hh, a.b_hh))
    B, H, N, dt = h0.shape[0], a.H, x.shape[0], x.dtype
    nothing = Saved(*(x.new_empty(0, dtype=torch.float32) for _ in Saved._fields))
    if N == 0:
        return x.new_empty(0, h0.shape[1]), h0.clone(), (c0.clone() if lstm else x.new_empty(0)), nothing
    rows = plan_rows(a.batch_sizes, B, N, reverse, x.device)
    upcast = upcast_dot(w_hh.dtype)
    xp = input_projection(x, a.w_ih, a.b_ih)
    empty = x.new_empty(0, dtype=torch.float32)
    if variant == "seq":
        hs = nan_buffer(N, H, x)
        cs = nan_buffer(N, H, x) if lstm else placeholder(x)
        gates, hn = _saved_buffers(mode, N, H, save, x)
        h_n, c_n = padded_state(B, H, w_hh, mode), padded_state(B, H, w_hh, mode, lstm)
        bs, off = step_tables(rows, x.device)
        fwd_seq(mode_id, G, xp, b_hh, w_hh, h0, c0 if c0 is not None else placeholder(x), bs, off,
                hs, cs, gates, hn, h_n, c_n, save, reverse, upcast)
        h_n, c_n = h_n[:B, :H].contiguous(), (c_n[:B, :H].contiguous() if lstm else c_n)
        hr = empty
    else:
        def loop(xp, h0, c0, w_hh, b_hh, w_hr, last_rows):
            HO = h0.shape[1]
            hs = nan_buffer(N, HO, xp)
            hr = nan_buffer(N, H, xp) if w_hr.numel() else hs
            cs = nan_buffer(N, H, xp) if lstm else placeholder(xp)
            gates, hn = _saved_buffers(mode, N, H, save, xp)
            w_hr32 = w_hr.float()
            if variant == "persist":
                bs, off = step_tables(rows, xp.device)
                persist.fwd_persist(mode_id, G, xp, none_if_empty(b_hh), w_hh, h0, c0 if c0.numel() else cs, bs, off,
                                    hs, cs, gates, hn, save, reverse, upcast)
            else:
                for k, t in enumerate(rows.order):
                    r, n = rows.rows(t), rows.sizes[t]
                    rp, n_prev = rows.neighbour(k - 1)
                    fwd_step(mode_id, G, xp[r], none_if_empty(b_hh), w_hh, hs[rp], h0, cs[rp] if lstm else cs,
                             c0 if c0.numel() else cs, hr[r], cs[r] if lstm else cs,
                             gates[r] if save and (lstm or gru) else gates, hn[r] if save and gru else hn,
                             n, n_prev, save, upcast)
                    if w_hr.numel():
                        torch.mm(hr[r], w_hr32.t(), out=hs[r])
            h_n = hs[last_rows]
            c_n = cs[last_rows] if lstm else placeholder(xp)
            return hs, (hr if w_hr.numel() else hs.new_empty(0, H)), cs, gates, hn, h_n, c_n

        key = None
        if cuda_graph and variant == "step":
            key = ("fwd", mode, tuple(rows.sizes), reverse, save, x.device, b_hh is not None, c0 is not None,
                   w_hr is not None)
        hs, hr, cs, gates, hn, h_n, c_n = run_loop(
            key, loop, [xp, h0, c0 if c0 is not None else empty, w_hh, b_hh if b_hh is not None else empty,
                        w_hr if w_hr is not None else empty, rows.last_rows])
    y = hs if dt == torch.float32 else hs.to(dt)
    c_out = c_n.to(dt) if lstm else x.new_empty(0)
    if not save:
        return y, h_n.to(dt), c_out, nothing

    def keep(t: Tensor, present: bool) -> Tensor:
        return t if present else x.new_empty(0, dtype=torch.float32)  # custom-op outputs must not alias

    saved = Saved(keep(gates, lstm or gru), keep(cs, lstm), keep(hn, gru),
                  keep(hs, dt != torch.float32), keep(hr, w_hr is not None))
    return y, h_n.to(dt), c_out, saved


def backward(a: LayerArgs, options: tuple, y: Tensor, saved: Saved, dy: Tensor, dh_n: Tensor,
             dc_n: Optional[Tensor], need_dx: bool):
    """Gradients ``(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)``; absent ones are empty."""
    variant, cuda_graph = options
    mode, x, h0, c0, w_hr, reverse = a.mode, a.x, a.h0, a.c0, a.w_hr, a.reverse
    mode_id, G = MODE_IDS[mode], GATES[mode]
    B, HO, N, H = h0.shape[0], h0.shape[1], x.shape[0], a.H
    lstm, gru, proj = mode == "LSTM", mode == "GRU", w_hr is not None
    f32 = dict(device=x.device, dtype=torch.float32)
    w_hh = a.w_hh.contiguous()
    dy = dy.contiguous()
    dh_n = dh_n.float().contiguous()
    dc_n = dc_n.float().contiguous() if lstm else placeholder(x)
    hs = saved.h if saved.h.numel() else y
    if N == 0:
        g_h, g_x = torch.empty(0, G * H, **f32), torch.empty(0, H, **f32)
        h_prev, hr, dhs = torch.empty(0, HO, **f32), torch.empty(0, H, **f32), torch.empty(0, HO, **f32)
        dh0, dc0 = dh_n.clone(), dc_n.clone()  # custom-op outputs must not alias its inputs
    else:
        rows = plan_rows(a.batch_sizes, B, N, reverse, x.device)
        upcast = upcast_dot(w_hh.dtype)
        gates, hn = _ptr(saved.gates, x), _ptr(saved.hn, x)
        cs = saved.c if lstm else placeholder(x)
        hr = saved.hr
        h_prev = torch.cat([hs, h0.float()])[rows.prev_index]
        c_prev = torch.cat([cs, c0.float()])[rows.prev_index] if lstm else placeholder(x)
        h_cell = hr if proj else hs
        if variant == "seq":
            g_h = nan_buffer(N, G * H, x)
            g_x = nan_buffer(N, H, x) if gru else placeholder(x)
            dh0, dc0 = padded_state(B, H, w_hh, mode), padded_state(B, H, w_hh, mode, lstm)
            bs, off = step_tables(rows, x.device)
            bwd_seq(mode_id, G, dy, dh_n, dc_n, w_hh, gates, hn, hs, cs, h_prev, c_prev, bs, off,
                    g_h, g_x, dh0, dc0, reverse, upcast)
            dh0, dc0 = dh0[:B, :H].contiguous(), (dc0[:B, :H].contiguous() if lstm else dc0)
            dhs = torch.empty(0, **f32)
        else:
            g_h, g_x, dh0, dc0, dhs = _backward_steps(
                mode, rows, dy, dh_n, dc_n, w_hh, w_hr, gates, hn, h_cell, cs, h_prev, c_prev, upcast,
                variant == "persist", reverse,
                cuda_graph and variant == "step" and ("bwd", mode, tuple(rows.sizes), reverse, x.device, x.dtype,
                                                      tuple(h0.shape), tuple(w_hh.shape), proj))
    g_in = torch.cat([g_h[:, : 2 * H], g_x], 1) if gru else g_h
    dt = x.dtype

    def absent() -> Tensor:
        return x.new_empty(0)  # custom-op outputs must not alias each other

    dx = (g_in @ a.w_ih.float()).to(dt) if need_dx else absent()
    dw_ih = (g_in.t() @ x.float()).to(dt)
    dw_hh = (g_h.t() @ h_prev).to(dt)
    db_ih = g_in.sum(0).to(dt) if a.b_ih is not None else absent()
    db_hh = g_h.sum(0).to(dt) if a.b_hh is not None else absent()
    dw_hr = (dhs.t() @ hr).to(dt) if proj else absent()
    return dx, dh0.to(dt), (dc0.to(dt) if lstm else absent()), dw_ih, dw_hh, db_ih, db_hh, dw_hr


def _backward_steps(mode: str, rows: Rows, dy, dh_n, dc_n, w_hh, w_hr, gates, hn, h_cell, cs, h_prev, c_prev,
                    upcast: bool, in_kernel: bool, reverse: bool, key):
    """The step variant's backward loop, or with ``in_kernel`` the persist variant's one launch:
    ``(g_h, g_x, dh0, dc0, dhs)``; ``key`` as :func:`run_loop`'s."""
    mode_id, G = MODE_IDS[mode], GATES[mode]
    lstm, gru, proj = mode == "LSTM", mode == "GRU", w_hr is not None
    N, H, HO = dy.shape[0], h_cell.shape[1], dy.shape[1]
    empty = dy.new_empty(0, dtype=torch.float32)

    def loop(dy, dh_n, dc_n, w_hh, w_hr, gates, hn, h_cell, cs, h_prev, c_prev, first_rows):
        g_h = nan_buffer(N, G * H, dy)
        g_x = nan_buffer(N, H, dy) if gru else placeholder(dy)
        dh_state, dc_state = dh_n.clone(), dc_n.clone()
        dhs = nan_buffer(N, HO, dy) if proj else placeholder(dy)
        w_hh32, w_hr32 = w_hh.float(), w_hr.float()
        if in_kernel:
            bs, off = step_tables(rows, dy.device)
            persist.bwd_persist(mode_id, G, dy, dh_state, dc_state, w_hh, gates, hn, h_cell, cs, h_prev, c_prev,
                                bs, off, g_h, g_x, reverse, upcast)
        else:
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
                bwd_step(mode_id, G, dh_step, dh_state, dc_state, g_h[rp], w_hh, gates[r] if lstm or gru else gates,
                         hn[r] if gru else hn, h_cell[r], cs[r] if lstm else cs, h_prev[r],
                         c_prev[r] if lstm else c_prev, g_h[r], g_x[r] if gru else g_x, n, n_prev, proj, upcast)
        dh0 = g_h[first_rows] @ w_hh32
        if not proj:
            dh0 = dh0 + dh_state
        return g_h, g_x, dh0, dc_state, dhs

    return run_loop(key or None, loop, [dy, dh_n, dc_n, w_hh, w_hr if proj else empty, gates, hn, h_cell, cs,
                                        h_prev, c_prev, rows.first_rows])
