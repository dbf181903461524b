"""``python -m fastrnn``: versions, the compiled extension, and which backend runs where."""

import platform
from typing import Optional

import torch

import fastrnn
from fastrnn import _ext, backend


def report() -> str:
    lines = [
        f"fastrnn {fastrnn.__version__}",
        f"python {platform.python_version()} on {platform.machine()}, {torch.get_num_threads()} torch threads",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"CUDA available: {torch.cuda.is_available()})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton: not importable ({exc})")
    if _ext._C is None:
        lines.append(f"fastrnn._C: missing. {_ext._C_ERROR}")
    else:
        info = _ext._C.build_info() if hasattr(_ext._C, "build_info") else {}
        gemm = info.pop("cpu_gemm", {})
        lines.append("fastrnn._C: " + ", ".join(f"{k}={v}" for k, v in sorted(info.items())))
        lines += [f"cpu {dtype} GEMM engine: {engine}" for dtype, engine in gemm.items()]
    partial_cap = _ext.isa_cap_warning()
    if partial_cap:
        lines.append(partial_cap)
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    lines.append(f"default backend request: {backend.requested_backend()!r}")
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16):
            lines.append(f"{dev} {dtype}:")
            lines.append(backend.availability_report(dev, dtype))
    if _ext._C is not None and torch.cuda.is_available() and _ext._C.build_info().get("with_cuda"):
        lines += persistent_report()
    if torch.cuda.is_available():
        lines += triton_variant_report(torch.device("cuda"))
    return "\n".join(lines)


# (batch, hidden) of the benchmark's standard configurations
_PLAN_SHAPES = ((64, 256), (64, 1024), (1, 512), (16, 128), (64, 512))


def persistent_report(limits: Optional[dict] = None) -> list:
    """The persistent CUDA engine's scheme per mode (plain fp32 and bf16, fastrnn's own cells, and a bidirectional
    layer's pair) and standard shape on the current GPU, or on a device of these ``limits`` (``cpp.persistent_plan``'s)."""
    from fastrnn.ops import MODES, cpp

    on = cpp.persistent_plan("LSTM", 1, 1, limits=limits)["enabled"]
    lines = [f"cuda persistent engine (FASTRNN_PERSISTENT=1 {'set' if on else 'not set: every call per-step'}),"
             " scheme [blocks, units per block x batch rows per block], 'mma': GEMMs on tensor cores, 'unpadded':"
             " no room for the SIMT loop's padding against bank conflicts:"]
    for mode in MODES:
        for label, ext, dtype, bidir in (("", False, torch.float32, False), (" bf16", False, torch.bfloat16, False),
                                         (" cells", True, torch.float32, False),
                                         (" bidirectional", False, torch.float32, True)):
            cells = []
            for B, H in _PLAN_SHAPES:
                p = cpp.persistent_plan(mode, B, H, dtype, cells=ext, bidirectional=bidir, limits=limits)
                detail = f" [{p['blocks']}, {p['units']}x{p['batch_tile']}]" if p["blocks"] else ""
                both = " both directions in one launch" if p["dirs"] == 2 else ""
                pad = "" if p["padded"] or not p["blocks"] else " unpadded"
                cells.append(f"B={B} H={H}: {p['scheme']}{detail}{' mma' if p['mma'] else ''}{pad}{both}")
            lines.append(f"  {mode}{label}: " + "; ".join(cells))
    return lines


def triton_variant_report(device: torch.device) -> list:
    """The Triton kernel variant a layer without projection takes per standard shape on ``device``, and its
    grid where it is one of the whole-sequence kernels."""
    from fastrnn.ops import triton as tb

    if tb._host is None:
        return [f"triton variants: {tb._IMPORT_ERROR}"]
    persist = tb._host.persist
    on = persist.enabled_by_default()
    lines = [f"triton variant, fp32 (FASTRNN_PERSISTENT=1 {'set' if on else 'not set: no persist'}; "
             f"persist grids up to {persist.device_programs(device)} programs):"]
    cells = []
    for B, H in _PLAN_SHAPES:
        variant = tb._host.pick_variant(H, torch.float32, False, "LSTM", B, device)
        cfg = persist.persist_config(B, H, persist.device_programs(device))
        tiles, slices = persist.grid(B, H, cfg) if cfg else (0, 0)
        detail = f" [{tiles} batch tiles x {slices} hidden slices]" if variant == "persist" else ""
        cells.append(f"B={B} H={H}: {variant}{detail}")
    lines.append("  LSTM: " + "; ".join(cells))
    return lines


if __name__ == "__main__":
    print(report())
