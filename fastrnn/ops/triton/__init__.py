"""Triton backend: fused recurrent kernels behind the backend contract (``fastrnn.ops``).

The package, kernel to public entry: ``cells`` (cell arithmetic shared by the kernels), ``step`` and
``seq`` (kernels and their launchers), ``host`` (the time loops and buffers), and here the custom ops
(``fastrnn::triton_layer_fwd``/``_bwd``, through :class:`fastrnn.ops.glue.LayerOp`) and ``layer``.

Three kernel variants, chosen per layer:

- ``"seq"``: whole-sequence kernels, one launch forward and one backward per layer and direction, for H
  small enough that W_hh stays in registers (``seq.seq_config``) and no projection.
- ``"persist"``: whole-sequence kernels for any H without projection whose grid (batch tiles x hidden
  slices) the GPU holds at once: the step kernels' tiles looping over time themselves, W_hh streamed from
  L2 each step, the hidden slices of a batch tile meeting at a barrier in global memory after each step
  (``persist``). Chosen automatically only with ``FASTRNN_PERSISTENT=1`` until measured on a GPU.
- ``"step"``: one fused launch per time step forward and one per step backward for any H; with an LSTM
  projection the per-step ``w_hr`` product (and its backward) run as torch matmuls beside the kernel.

The input projection of all steps is one GEMM before the loop and the weight gradients are GEMMs after it.

fastrnn's own cells (``CellExt``: LayerNorm, zoneout, recurrent dropout; ``EXT_FEATURES``) run through
``fastrnn::triton_layer_ext_fwd``/``_ext_bwd`` (``ext``, mirroring the cpp backend's csrc/rnn_ext.cpp), saving
``fastrnn.ops.SavedExt`` in fp32; 16-bit storage is computed in fp32. Three variants (``EXT_VARIANTS``):
``"step"``, per step a torch GEMM for the recurrent product and one fused row kernel (the recurrent
LayerNorm's statistics, the cell, LSTM's LayerNorm of c, zoneout, the next step's masked GEMM operand),
backward likewise; ``"seq"`` (no projection), one launch per direction forward and one backward, each program
owning a few batch rows for the whole sequence and computing their recurrent product itself; ``"persist"``
(no projection), the same kernels with each batch tile's product split over hidden slices that meet at a
barrier twice per step, for parallelism at small batches.

On a GPU (an H200, 2026-12-04) the "step" and "seq" kernels passed every CUDA test; the ext kernels (every
variant), the "persist" kernels and ``cuda_graph`` have not been checked on one yet. All are tested in the interpreter on
CPU and compiled ahead of time for sm_80/sm_90 (benchmarks/kernel_report.py: registers, no spills).
On CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the tests exercise them.

Options, as keywords of ``layer`` or, from a module, ``backend_options={"triton": {...}}``:

- ``variant``: ``"step"``, ``"seq"`` or ``"persist"``; ``None`` (default) picks ``"seq"`` wherever it applies,
  then ``"persist"`` (with ``FASTRNN_PERSISTENT=1``), else ``"step"``. fastrnn's cells take the same names;
  ``None`` picks, on CUDA with ``FASTRNN_PERSISTENT=1`` and no projection, ``"persist"`` where the seq grid
  would leave half the SMs idle and H >= 128, else ``"seq"``; otherwise ``"step"`` (``ext.pick_variant``).
- ``cuda_graph``: capture the per-step launches of the ``"step"`` variant (the plain cells' and fastrnn's
  own) into a CUDA graph on the second call with given shapes and batch sizes and replay it afterwards,
  removing the per-launch host cost (``host.run_loop``: at most ``GRAPH_CACHE_SIZE`` shapes kept).
  ``None`` (default): on for the step variant on CUDA with ``FASTRNN_PERSISTENT=1``, off otherwise.
  UNVERIFIED on a GPU: the CPU tests replay an emulation of the capture.
"""

from typing import Optional

import torch

from fastrnn import ops as _ops
from fastrnn.ops import CellExt, LayerArgs, Saved, SavedExt
from fastrnn.ops.glue import ExtImpl, LayerOp

try:
    from fastrnn.ops.triton import ext as _ext
    from fastrnn.ops.triton import host as _host
except ImportError as exc:  # triton missing or broken
    _host = _ext = None
    _IMPORT_ERROR: Optional[str] = f"triton could not be imported ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = None

EXT_FEATURES = _ops.EXT_FEATURES  # LayerNorm, zoneout and recurrent dropout: the ext kernels
EXT_VARIANTS = ("step", "seq", "persist")

CPU_REASON = (
    "Triton kernels need a CUDA GPU; set TRITON_INTERPRET=1 before importing triton to run them on CPU "
    "for testing"
)


def availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``None`` when the Triton kernels can run on ``device`` with ``dtype`` storage, else why not."""
    if _host is None:
        return _IMPORT_ERROR
    if dtype not in _host.DTYPES:
        return f"Triton kernels support float32, float16 and bfloat16 storage, got {dtype}"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _host.interpreting():
        return _host.INTERPRETER_PROBLEM
    if device.type == "cpu":
        return CPU_REASON
    return f"Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1), got {device.type}"


def _resolve_options(a: LayerArgs, options: tuple, cells: bool = False) -> tuple:
    variant, cuda_graph = options
    B, proj = a.h0.shape[0], a.w_hr is not None
    if cells:
        return _resolve_ext_options(a, variant, cuda_graph)
    if variant is None:
        variant = _host.pick_variant(a.H, a.w_hh.dtype, proj, a.mode, B, a.x.device)
    if variant not in _host.VARIANTS:
        raise ValueError(f"variant must be one of {_host.VARIANTS} or None, got {variant!r}")
    with_proj = " with a projection" if proj else ""
    if variant == "seq" and (proj or _host.seq_config(a.H, a.w_hh.dtype, a.mode) is None):
        raise ValueError(f"the 'seq' variant needs no projection and H <= {_host.seq_max_h(a.w_hh.dtype, a.mode)}, "
                         f"got H = {a.H}{with_proj}")
    if variant == "persist" and not _host.persist_fits(B, a.H, proj, a.x.device):
        raise ValueError("the 'persist' variant needs no projection and a grid of batch tiles x hidden slices no "
                         f"larger than the device's {_host.persist.device_programs(a.x.device)} SMs, got batch {B}, "
                         f"H = {a.H}{with_proj}")
    return variant, _resolve_graph(a, variant, cuda_graph)


def _resolve_graph(a: LayerArgs, variant: str, cuda_graph: Optional[bool]) -> bool:
    """Whether the step loop replays from a CUDA graph: as asked (on CUDA only), by default where
    ``FASTRNN_PERSISTENT=1`` asks for the fast way; the whole-sequence variants have no loop to replay."""
    if cuda_graph and a.x.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors, got x on {a.x.device}")
    if cuda_graph is None:
        cuda_graph = a.x.device.type == "cuda" and _host.persist.enabled_by_default()
    return bool(cuda_graph) and variant == "step"


def _resolve_ext_options(a: LayerArgs, variant: Optional[str], cuda_graph: Optional[bool]) -> tuple:
    """fastrnn's cells: ``"seq"`` or ``"persist"`` (one launch per direction, no projection) or ``"step"``, whose
    loop replays from a CUDA graph as the plain cells' does; ``None``: ``ext.pick_variant``."""
    B, G, proj = a.h0.shape[0], a.w_hh.shape[0] // a.H, a.w_hr is not None
    if variant not in EXT_VARIANTS + (None,):
        raise ValueError(f"variant must be one of {EXT_VARIANTS} or None, got {variant!r}")
    if variant is None:
        variant = _ext.pick_variant(B, a.H, G, proj, a.x.device)
    if variant != "step" and proj:
        raise ValueError(f"the {variant!r} variant of fastrnn's cells needs no projection, got proj_size "
                         f"{a.w_hr.shape[0]}")
    if variant != "step" and not _ext.w_hh_addressable(G, a.H):
        raise ValueError(f"the {variant!r} variant of fastrnn's cells addresses W_hh with int32 offsets, so it needs "
                         f"{G}*H*H < 2^31, got H = {a.H}; variant='step' takes any H")
    if variant == "persist" and _ext.tiles_for(variant, B, a.H, G, False, a.x.device) is None:
        raise ValueError(f"the 'persist' variant of fastrnn's cells needs H >= {_ext.PERSIST_MIN_H} on a GPU and no "
                         f"more batch tiles of {_ext.PERSIST_ROWS} rows than the device's "
                         f"{_host.persist.device_programs(a.x.device)} SMs, got H = {a.H}, batch {B}")
    return variant, _resolve_graph(a, variant, cuda_graph)


def _fake_saved(a: LayerArgs, _options: tuple, save: bool) -> Saved:
    return Saved.empty_like(a, save, torch.float32, h=a.x.dtype != torch.float32, hr=True)


def _forward(a, options, save):
    return _host.forward(a, options, save)


def _backward(a, options, y, saved, dy, dh_n, dc_n, need_dx):
    return _host.backward(a, options, y, saved, dy, dh_n, dc_n, need_dx)


def _ext_forward(a: LayerArgs, e: CellExt, options: tuple, save: bool):
    return _ext.forward(a, e, save, variant=options[0], graph=options[1])


def _ext_backward(a: LayerArgs, e: CellExt, options: tuple, y, saved: SavedExt, dy, dh_n, dc_n, need_dx: bool):
    return _ext.backward(a, e, y, saved, dy, dh_n, dc_n, need_dx, variant=options[0], graph=options[1])


def _ext_fake_saved(a: LayerArgs, e: CellExt, _options: tuple, save: bool) -> SavedExt:
    return SavedExt.empty_like(a, e, save, torch.float32)


layer = LayerOp("triton", "triton_layer", availability, _forward, _backward, _fake_saved,
                options=(("variant", "str?", None), ("cuda_graph", "bool?", None)), resolve_options=_resolve_options,
                ext=ExtImpl(_ext_forward, _ext_backward, _ext_fake_saved))
"""One layer in one direction: ``layer(args: LayerArgs, variant=None, cuda_graph=None)`` or the fields flat."""
