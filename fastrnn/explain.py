"""``fastrnn.explain(module, input, hx=None)``: which backend and which kernels each layer and direction of a
fastrnn module takes for an input, and why.

It runs the module once without gradients and records every layer call as the module makes it (the backend
``backend="auto"`` resolved to, the options the module passes), then asks each backend the same questions its
call asks: the Triton variant from the options resolution the call runs, the cpp backend's path from the
extension's own decisions (``layer_path`` in csrc/rnn.cpp) and its persistent plan.
"""

import contextlib
from types import ModuleType
from typing import List, Tuple

import torch
from torch import nn

from fastrnn import modules as _modules
from fastrnn.ops import GATES, CellExt, LayerArgs


def explain(module: nn.Module, input, hx=None) -> str:
    """One line per layer call of ``module(input, hx)``: its shape, the backend that ran it and the kernels it
    took there, with the reason where a choice was made. ``module`` is a fastrnn module (or a model holding
    them: every fastrnn layer call it makes is listed). It runs in the mode the module is in: in training,
    zoneout and recurrent dropout draw their masks (from torch's generator) as a forward call would."""
    calls: List[Tuple[LayerArgs, CellExt, ModuleType, dict, bool]] = []
    with _recording(calls), torch.no_grad():
        module(input) if hx is None else module(input, hx)
    if not calls:
        return "no fastrnn layer call was made (is there a fastrnn module in it?)"
    return "\n".join(f"call {k}: {describe(*call)}" for k, call in enumerate(calls))


@contextlib.contextmanager
def _recording(calls: list):
    observer = lambda *call: calls.append(call)  # noqa: E731
    _modules.LAYER_CALL_OBSERVERS.append(observer)
    try:
        yield
    finally:
        _modules.LAYER_CALL_OBSERVERS.remove(observer)


def describe(a: LayerArgs, ext: CellExt, impl: ModuleType, options: dict, pair: bool = False) -> str:
    """One layer call: shape, backend, kernels (``pair``: a direction of a bidirectional layer whose two
    directions the backend ran in one call)."""
    name = impl.__name__.rsplit(".", 1)[-1]
    N, (B, H_out) = a.x.shape[0], a.h0.shape
    T = a.batch_sizes.numel() if a.batch_sizes is not None else (N // B if B else 0)
    features = ext.features()
    shape = (f"{a.mode} {'reverse' if a.reverse else 'forward'}, T={T} B={B} I={a.x.shape[1]} H={a.H}"
             + (f" proj={H_out}" if a.w_hr is not None else "") + (", packed" if a.batch_sizes is not None else "")
             + f", {str(a.x.dtype)[6:]} on {a.x.device}" + (f", cells: {', '.join(features)}" if features else ""))
    how = {"cpp": _cpp, "triton": _triton}.get(name, lambda *_: "plain PyTorch ops, a GEMM and the cell per step")
    return f"{shape} -> {name}: {how(a, ext, impl, options, pair)}"


def _cpp(a: LayerArgs, ext: CellExt, impl: ModuleType, options: dict, pair: bool) -> str:
    cells = bool(ext.features())
    path = impl._lib().layer_path(*a, cells=cells, pair=pair)
    if a.x.device.type == "cuda" and not cells:
        plan = impl.persistent_plan(a.mode, a.h0.shape[0], a.H, a.x.dtype, device=a.x.device,
                                    proj_size=a.h0.shape[1] if a.w_hr is not None else 0, bidirectional=pair)
        if plan["scheme"] != "per-step":
            both = " (both directions)" if plan["dirs"] == 2 else ""
            grid = (f"scheme {plan['scheme']!r}, {plan['blocks']} blocks{both} of {plan['units']} units x "
                    f"{plan['batch_tile']} rows, {plan['smem']} B shared memory each"
                    f"{'' if plan['padded'] else ' (SIMT strides unpadded: no room for the pads)'}")
            path += f"; {grid}" if plan["enabled"] else f"; FASTRNN_PERSISTENT=1 would take the persistent {grid}"
    return path


def _triton(a: LayerArgs, ext: CellExt, impl: ModuleType, options: dict, _pair: bool) -> str:
    cells = bool(ext.features())
    opts = tuple(options.get(opt, default) for opt, _, default in impl.layer.options)
    variant, graph = impl._resolve_options(a, opts, cells)
    host, B, H = impl._host, a.h0.shape[0], a.H
    if cells:
        if variant in ("seq", "persist"):
            tiles = [impl._ext.tiles_for(variant, B, H, GATES[a.mode], backward, a.x.device)
                     for backward in (False, True)]
            grids = " and ".join(f"{-(-B // t['BR'])} x {t['S']} programs ({t['BR']} batch rows x {t['CW']} product "
                                 f"columns each) {d}" for t, d in zip(tiles, ("forward", "backward")))
            how = ("the slices of a tile meeting at a barrier twice per step" if variant == "persist" else
                   "each program computing its rows' recurrent product")
            return (f"fastrnn's cells, variant {variant!r}: one launch per direction forward and one backward, "
                    f"{grids}, {how}")
        return f"fastrnn's cells, variant 'step': per step a torch GEMM and one fused row kernel, {_replay(graph)}"
    if variant == "seq":
        return "variant 'seq': one launch per direction forward and one backward, W_hh held in registers"
    if variant == "persist":
        cfg = host.persist.persist_config(B, H, host.persist.device_programs(a.x.device))
        tiles, slices = host.persist.grid(B, H, cfg)
        held = "; ".join(_w_hh_held(host.persist, a, B, cfg, backward) for backward in (False, True))
        return (f"variant 'persist': one launch per direction forward and one backward, {tiles} batch tiles x "
                f"{slices} hidden slices meeting at a barrier each step; {held}")
    return f"variant 'step': one fused kernel per step, {_replay(graph)}"


def _w_hh_held(persist: ModuleType, a: LayerArgs, B: int, cfg: dict, backward: bool) -> str:
    """Whether a persist launch keeps its slice of W_hh on chip through the time loop: by size, then, on a GPU,
    by what the launches at this shape took (the resident kernel where it compiled without spills)."""
    what = "backward" if backward else "forward"
    nk = persist.resident_chunks(GATES[a.mode], a.H, cfg, a.w_hh.element_size(), backward)
    if not nk:
        return f"{what}: W_hh streamed from L2 each step (its slice exceeds the resident limit)"
    taken = persist.chunks_taken(backward, B, a.H, a.x.device)
    if a.x.device.type == "cuda" and not taken:
        return (f"{what}: W_hh held on chip ({nk} chunks) where its kernel compiles without spills on this "
                "device, else streamed (decided at the first launch)")
    if taken == {0}:
        return f"{what}: W_hh streamed from L2 each step (the resident kernel spilled or did not fit here)"
    if 0 in taken:
        return (f"{what}: W_hh held on chip ({nk} chunks) by some launches, streamed by others (their inputs' "
                "alignments compile apart, and some resident kernels spilled)")
    return f"{what}: W_hh held on chip through the time loop ({nk} chunks)"


def _replay(graph: bool) -> str:
    return "replayed from a CUDA graph (from a shape's second call)" if graph else "launched from Python"
