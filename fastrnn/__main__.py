"""``python -m fastrnn``: versions, the compiled extension, and which backend runs where."""

import platform

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
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    lines.append(f"default backend request: {backend.requested_backend()!r}")
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16):
            lines.append(f"{dev} {dtype}:")
            lines.append(backend.availability_report(dev, dtype))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
