"""The "cpp" backend: fused C++/CUDA kernels of ``fastrnn._C`` (csrc/) behind the backend contract.

``layer`` is a :class:`fastrnn.ops.glue.LayerOp` (custom ops ``fastrnn::layer_fwd``/``layer_bwd``, and for both
directions of a bidirectional layer ``fastrnn::layer_pair_fwd``/``layer_pair_bwd``). The kernels save gates, c and
hn (``fastrnn.ops.Saved``) in the storage dtype and recompute the rest.

fastrnn's own cells (``CellExt``: LayerNorm, zoneout, recurrent dropout) run through ``fastrnn::layer_ext_fwd``/
``layer_ext_bwd`` (csrc/rnn_ext.cpp), saving ``fastrnn.ops.SavedExt``; 16-bit calls compute them in fp32 and
round what they return, on the CPU and on CUDA alike.
"""

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastrnn import _buildcfg
from fastrnn._ext import _C, _C_ERROR
from fastrnn import ops as _ops
from fastrnn.ops import CellExt, LayerArgs, LayerOut, Saved, SavedExt
from fastrnn.ops.glue import N_REVERSE, ExtImpl, LayerOp, PairImpl, saving

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
EXT_FEATURES = _ops.EXT_FEATURES  # LayerNorm, zoneout and recurrent dropout, fused


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
    info = _build_info()
    archs = [str(a) for a in info.get("cuda_archs", [])]
    ptx = info.get("cuda_ptx")
    capability = torch.cuda.get_device_capability(device)
    if _buildcfg.runs_on(archs, capability, None if ptx is None else str(ptx)):
        return None
    return (f"fastrnn._C was built for sm_{', sm_'.join(archs)} ({f'PTX of compute_{ptx}' if ptx else 'no PTX'}) "
            f"and cannot run on this sm_{capability[0]}{capability[1]} GPU; rebuild with FASTRNN_CUDA_ARCHS "
            f"including {capability[0]}{capability[1]}")


def persistent_plan(mode: str, batch: int, hidden: int, dtype: torch.dtype = torch.float32, *,
                    device: Optional[torch.device] = None, proj_size: int = 0, cells: bool = False,
                    bidirectional: bool = False, limits: Optional[dict] = None) -> dict:
    """How the ``cpp`` backend runs one layer of ``mode`` at this batch and hidden size on a CUDA device: the
    persistent engine's scheme (``"block"``: each block holds all of W_hh for its batch rows; ``"grid"``: hidden
    units split over blocks, a grid barrier per step, two with ``cells``; ``"cluster"``: split over the blocks of a
    thread-block cluster per batch tile (sm_90 and later), a cluster barrier per step, two with ``cells``;
    ``"per-step"``: a cuBLAS GEMM and a cell kernel per step), its blocks, shared memory, whether its GEMMs run
    on tensor cores (``"mma"``: 16-bit storage on sm_80 and later, and fp32 in TF32 where torch allows TF32 for
    cuDNN's RNN: ``torch.backends.cudnn.rnn.fp32_precision``, or ``torch.backends.cudnn.allow_tf32``), and why. ``cells``:
    fastrnn's own cells (LayerNorm, zoneout, recurrent dropout), which compute in fp32 whatever ``dtype``.
    ``bidirectional``: the plan of each direction of a bidirectional layer of plain cells; ``"dirs"`` is 2 where
    both share one launch, each on half the SMs, because the cost model prices that below two launches one after
    the other (``"blocks"`` then counts both directions').
    ``limits`` (``{"sms": ..., "smem": ...}``, optionally ``"cooperative"``, ``"cluster"``: most blocks per
    cluster, ``"clusters_at_once"``: ``{blocks per cluster: clusters the GPU holds at once}``, a block per SM (its
    GPCs may hold fewer than ``sms // size``, the default for a size left out; a plan whose tiles need more clusters
    meets at the grid barrier, as its launch would), ``"mma"``: tensor cores, ``"tf32"``: torch allows TF32 for
    cuDNN's RNN, which puts fp32 on them too,
    ``"pad"``: False plans as ``FASTRNN_PERSISTENT_PAD=0`` does; ``"costs"``: the cost model's prices by name,
    ``grid_sync`` (and ``grid_sync_member``, per block of a grid barrier's group), ``cluster_sync``, ``stage``,
    ``mma``, ``exchange``, in its unit, instead of csrc/persist.h's, as
    ``benchmarks/persist_calibrate.py`` asks with measured ones) stands for a device that is not here; otherwise
    ``device`` (default: the current CUDA device) is asked. ``"padded"``: the SIMT loop's shared-memory strides
    padded against bank conflicts (where they fit; else unpadded, the conflicts priced into the plan's cost);
    ``"chunks"``: the K chunk in which the forward's and the backward's block GEMM stage their operand (the whole
    K where shared memory allows); ``"push"``: whether a cluster's blocks write each other's operand of that GEMM
    (h_t, dgates) in distributed shared memory, two staged operands each, rather than exchange it through L2.
    ``enabled`` says whether ``FASTRNN_PERSISTENT=1`` is set, without which every CUDA call takes the per-step
    path."""
    if limits is None:
        device = torch.device(device or "cuda")
        limits = dict(_lib().cuda_limits(torch.cuda.current_device() if device.index is None else device.index))
    esize = 4 if cells and dtype != torch.float64 else torch.tensor([], dtype=dtype).element_size()
    plan = dict(_lib().persist_plan(_ops.GATES[mode], batch, hidden, esize, limits["sms"], limits["smem"],
                                    limits.get("cooperative", True), bool(proj_size), cells,
                                    limits.get("cluster", 0), limits.get("mma", False), limits.get("tf32", False),
                                    bidirectional, limits.get("pad", True), limits.get("costs", {}),
                                    limits.get("clusters_at_once", {})))
    plan["enabled"] = bool(_lib().persistent_enabled())
    return plan


def _lib() -> object:
    if _C is None:
        raise RuntimeError(_C_ERROR or "fastrnn._C is not built")
    return _C


def _forward(a: LayerArgs, _options: tuple, save: bool):
    y, h_n, c_n, gates, c, hn = _lib().layer_fwd(*a, save)
    return y, h_n, c_n, Saved(gates, c, hn, *_absent(gates, 2))


def _ws_dtype(x: Tensor) -> torch.dtype:
    """The saved activations' dtype (csrc/seq.h ws_dtype): the CPU keeps 16-bit sequences' state in fp32."""
    return torch.float32 if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _backward(a: LayerArgs, _options: tuple, y, saved: Saved, dy, dh_n, dc_n, need_dx: bool):
    return tuple(_lib().layer_bwd(*a, y, saved.gates, saved.c, saved.hn, dy, dh_n, dc_n, need_dx))


def _fake_saved(a: LayerArgs, _options: tuple, save: bool) -> Saved:
    return Saved.empty_like(a, save, _ws_dtype(a.x))


def _ext_forward(a: LayerArgs, e: CellExt, _options: tuple, save: bool):
    y, h_n, c_n, *saved = _lib().layer_ext_fwd(*a, list(e), save)
    return y, h_n, c_n, SavedExt(*saved)


def _ext_backward(a: LayerArgs, e: CellExt, _options: tuple, y, saved: SavedExt, dy, dh_n, dc_n, need_dx: bool):
    return tuple(_lib().layer_ext_bwd(*a, list(e), y, *saved, dy, dh_n, dc_n, need_dx))


def _ext_fake_saved(a: LayerArgs, e: CellExt, _options: tuple, save: bool) -> SavedExt:
    wide = a.x.dtype not in (torch.float16, torch.bfloat16)  # fastrnn's cells compute 16-bit in fp32 everywhere
    return SavedExt.empty_like(a, e, save, a.x.dtype if wide else torch.float32)


def _pair_forward(a: LayerArgs, r: LayerArgs, _options: tuple, save: bool):
    out = _lib().layer_pair_fwd(*a[:-1], *r.tensors()[1:], save)
    y, h_n, c_n, gates, c, hn, y_r, h_n_r, c_n_r, gates_r, c_r, hn_r = out
    return (y, h_n, c_n, Saved(gates, c, hn, *_absent(gates, 2)), y_r, h_n_r, c_n_r,
            Saved(gates_r, c_r, hn_r, *_absent(gates_r, 2)))


def _absent(like: torch.Tensor, n: int) -> list:
    """``n`` distinct empty [0] tensors for absent outputs (custom-op outputs may not alias one another)."""
    return [like.new_empty(0) for _ in range(n)]


def _pair_backward(a: LayerArgs, r: LayerArgs, _options: tuple, y, saved: Saved, y_r, saved_r: Saved, dy, dh_n, dc_n,
                   dy_r, dh_n_r, dc_n_r, need_dx: bool):
    return tuple(_lib().layer_pair_bwd(*a[:-1], *r.tensors()[1:], y, *saved[:3], y_r, *saved_r[:3], dy, dh_n, dc_n,
                                       dy_r, dh_n_r, dc_n_r, need_dx))


def layer_forward(a: LayerArgs) -> LayerOut:
    """``layer(a)`` without its op and the contract's checks in Python, for a call ``glue.unwatched`` lets through
    (the C++ checks every input itself): the kernels alone without gradients, with them csrc/rnn.cpp's
    ``LayerNode``, an autograd node in C++ whose backward runs ``layer_bwd`` (or ``_node_grad``)."""
    lstm = a.mode == "LSTM"
    out = _lib().layer_node(*a) if saving(a.tensors()) else _lib().layer_fwd(*a, False)
    return LayerOut(out[0], out[1], out[2] if lstm else None)


def cell_forward(mode: str, x: Tensor, hx: Optional[Tensor], cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                 b_ih: Optional[Tensor], b_hh: Optional[Tensor]):
    """One call of a torch.nn-style cell in one C++ entry (csrc/rnn.cpp ``cell_call``), for a call
    ``glue.unwatched`` lets through: ``x`` [B, I] or [I], ``hx``/``cx`` as ``x`` or None for zeros; returns h' (LSTM:
    ``(h', c')``), through ``LayerNode`` where gradients are needed."""
    out = _lib().cell_call(mode, x, hx, cx, w_ih, w_hh, b_ih, b_hh)
    return (out[0], out[1]) if mode == "LSTM" else out[0]


def pair_forward(a: LayerArgs, r: LayerArgs) -> Tuple[LayerOut, LayerOut]:
    """``layer.pair(a, r)`` as ``layer_forward`` calls one direction: the kernels alone without gradients, with them
    csrc/rnn.cpp's ``PairNode``. Both directions save or neither (``layer.pair`` runs the other case)."""
    lstm = a.mode == "LSTM"
    if saving(a.tensors()):
        out = _lib().layer_pair_node(*a[:-1], *r.tensors()[1:])  # per direction y, h_n and LSTM's c_n
        n = 3 if lstm else 2
        fwd, rev = out[:n], out[n:]
    else:
        out = _lib().layer_pair_fwd(*a[:-1], *r.tensors()[1:], False)
        fwd, rev = out[:3], out[6:9]
    return tuple(LayerOut(d[0], d[1], d[2] if lstm else None) for d in (fwd, rev))


class _NodeContext(NamedTuple):
    """What the ops' autograd formula reads of its context, from a node of csrc/rnn.cpp (``opts``: the cpp layer
    has no options)."""

    saved_tensors: tuple
    mode: str
    needs_input_grad: Sequence[bool]
    reverse: bool = False
    opts: tuple = ()


_REVERSE_AT = LayerArgs._fields.index("reverse")


def _node_grad(mode: str, pair: bool, reverse: bool, saved: list, needs: list, grads: list) -> list:
    """The backward of csrc/rnn.cpp's ``LayerNode`` (``pair``: ``PairNode``) where the ops' formula decides (a
    graph of its own, batched gradients, a watched backward): that formula on the node's saved tensors, returning
    a gradient per node argument; ``grads``: y, h_n and c_n (None unless LSTM) per direction. The node saves the
    op's tensors but the two per direction it leaves empty, and a ``PairNode`` takes no ``reverse``."""
    empty = _absent(saved[0], 2)
    if not pair:
        ctx = _NodeContext((*saved, *empty), mode, needs, reverse)
        return list(layer._plain._grad(ctx, *grads)[:len(needs)])
    k = 2 + 2 * N_REVERSE  # x, batch_sizes, each direction's own tensors; then y, gates, c, hn of each
    ctx = _NodeContext((*saved[:k], *saved[k:k + 4], *empty, *saved[k + 4:k + 8], *empty), mode,
                       (*needs[:_REVERSE_AT], False, *needs[_REVERSE_AT:]))
    unused = (None,) * (len(Saved._fields))  # the Saved outputs of each direction take no gradient
    got = layer._pair._grad(ctx, *grads[:3], *unused, *grads[3:], *unused)
    return [*got[:_REVERSE_AT], *got[_REVERSE_AT + 1:len(needs) + 1]]


def stack_forward(mode: str, x: Tensor, batch_sizes: Optional[Tensor], states: Tuple[Tensor, ...],
                  weights: List[Tensor], num_layers: int, bidirectional: bool, bias: bool,
                  proj: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """A module's layers in one C++ call (csrc/rnn.cpp ``stack_fwd``) for a call without gradients that
    ``glue.unwatched`` lets through: ``states`` ``(hx,)`` or LSTM's ``(hx, cx)``, ``[layers*directions, B, *]``,
    and ``weights`` in torch.nn's ``_flat_weights`` order; returns the last layer's rows and the final states in
    the form of ``states``."""
    y, h_n, c_n = _lib().stack_fwd(mode, x, batch_sizes, states[0], states[1] if len(states) == 2 else None,
                                   weights, num_layers, bidirectional, bias, proj, 0.0)
    return y, (h_n, c_n) if len(states) == 2 else (h_n,)


def module_forward(mode: str, x: Tensor, hx: Optional[Tensor], cx: Optional[Tensor], weights: List[Tensor],
                   num_layers: int, bidirectional: bool, bias: bool, proj_size: int, batch_first: bool,
                   dropout: float):
    """A module's call on a dense input in one C++ entry (csrc/rnn.cpp ``module_call``), for a call
    ``glue.unwatched`` lets through: ``x`` and ``hx``/``cx`` (None for zeros) in any form torch.nn's modules take
    them, gradients through csrc/rnn.cpp's nodes, ``dropout`` between layers (0 outside training); returns what the
    module returns: ``(y, (h_n, c_n))``, or ``(y, h_n)`` unless LSTM, ``y`` in the form of ``x``."""
    y, h_n, c_n = _lib().module_call(mode, x, hx, cx, weights, num_layers, bidirectional, bias, proj_size, batch_first,
                                     dropout)
    return y, (h_n, c_n) if mode == "LSTM" else h_n


layer = LayerOp("cpp", "layer", availability, _forward, _backward, _fake_saved,
                ext=ExtImpl(_ext_forward, _ext_backward, _ext_fake_saved), pair=PairImpl(_pair_forward, _pair_backward))
"""One layer in one direction: ``layer(args: LayerArgs)`` or the fields flat (see ``fastrnn.ops``), with
fastrnn's cells through ``ext=CellExt(...)``; ``layer.pair(a, r)`` both directions of a bidirectional layer of
plain cells, in one persistent launch where ``persistent_plan(..., bidirectional=True)`` says so."""
layer_pair = layer.pair
if _C is not None:
    _C._set_node_grad(_node_grad)
