"""Which backend runs a layer: by module argument, by ``use_backend``/``set_backend``, by ``FASTRNN_BACKEND``.

Precedence, most specific first: a module's own ``backend=`` (when not ``"auto"``), then the innermost
``use_backend`` block or ``set_backend`` call, then the ``FASTRNN_BACKEND`` environment variable, then
``"auto"``. ``"auto"`` takes the first usable backend in ``AUTO_ORDER`` for the device type: the C++
kernels wherever they are built; on CUDA then Triton; ``"reference"`` always works.
"""

import contextlib
import importlib
import os
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple

import torch

BACKENDS = ("reference", "cpp", "triton")
AUTO_ORDER = {"cuda": ("cpp", "triton", "reference")}
AUTO_ORDER_DEFAULT = ("cpp", "reference")

_override: List[str] = []
_modules: Dict[str, ModuleType] = {}
_import_errors: Dict[str, str] = {}
# (requested, device type, device index, dtype) -> backend name
_resolved: Dict[Tuple[str, str, Optional[int], torch.dtype], str] = {}


def _check_name(name: str, argument: str = "backend") -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{argument} must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


def _module(name: str) -> Optional[ModuleType]:
    if name not in _modules and name not in _import_errors:
        try:
            _modules[name] = importlib.import_module(f"fastrnn.ops.{name}")
        except Exception as exc:
            _import_errors[name] = f"fastrnn.ops.{name} failed to import ({type(exc).__name__}: {exc})"
    return _modules.get(name)


def reason_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when backend ``name`` can run on ``device`` with ``dtype`` storage, otherwise why not."""
    mod = _module(name)
    if mod is None:
        return _import_errors[name]
    return mod.availability(device, dtype)


def availability_report(device: torch.device, dtype: torch.dtype) -> str:
    lines = []
    for name in BACKENDS:
        why = reason_unavailable(name, device, dtype)
        lines.append(f"  {name}: " + ("available" if why is None else f"unavailable: {why}"))
    return "\n".join(lines)


def requested_backend() -> str:
    """The name in force for modules constructed with ``backend="auto"``."""
    if _override:
        return _override[-1]
    return _check_name(os.environ.get("FASTRNN_BACKEND", "auto") or "auto", "FASTRNN_BACKEND")


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (``None`` clears it back to ``FASTRNN_BACKEND``/``auto``)."""
    _override.clear()
    if name is not None:
        _override.append(_check_name(name))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run modules built with ``backend="auto"`` on ``name`` inside the block."""
    _override.append(_check_name(name))
    try:
        yield
    finally:
        _override.pop()


def resolve(requested: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module that runs ``requested`` on ``device`` with ``dtype`` storage, or a RuntimeError."""
    return resolve_named(requested, device, dtype)[1]


def resolve_named(requested: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, ModuleType]:
    """``(name, module)`` of the backend :func:`resolve` picks."""
    if requested == "auto":
        requested = requested_backend()
    name = _resolve_name(requested, device.type, device.index, dtype)
    return name, _modules[name]


def _resolve_name(requested: str, device_type: str, device_index: Optional[int], dtype: torch.dtype) -> str:
    key = (requested, device_type, device_index, dtype)
    if key not in _resolved:
        device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
        candidates = AUTO_ORDER.get(device_type, AUTO_ORDER_DEFAULT) if requested == "auto" else (requested,)
        for name in candidates:
            if reason_unavailable(name, device, dtype) is None:
                _resolved[key] = name
                break
        else:
            raise RuntimeError(
                f"fastrnn backend {requested!r} cannot run on device {device} with dtype {dtype}. "
                f"Backends:\n{availability_report(device, dtype)}"
            )
    return _resolved[key]


# The reference backend is plain PyTorch and cheap to import. Imported here, it is in _modules before any
# torch.compile trace: a module whose layer falls back to it (a cell another backend lacks) finds it there
# even when the first call is traced, since dynamo does not see the constant-folded lookup's import.
_module("reference")

# torch.compile runs _resolve_name once at trace time and bakes the answer in: no graph break on imports.
# This is the mark torch.compiler.assume_constant_result sets; the decorator itself imports torch._dynamo,
# and with it Triton, which `import fastrnn` must not pay for on a machine that never runs a Triton kernel
# (tests/test_package.py checks both that the mark is still dynamo's and that the import stays light).
_resolve_name._dynamo_marked_constant = True  # type: ignore[attr-defined]
