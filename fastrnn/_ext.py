"""Loads the compiled extension ``fastrnn._C`` once; fastrnn stays importable without it."""

import warnings
from typing import Optional

import torch  # noqa: F401  (loads libc10/libtorch that fastrnn._C links against)

_C = None
_C_ERROR: Optional[str] = None

try:
    from fastrnn import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # an ImportError, or an OSError from a missing shared library
    _C_ERROR = (
        f"fastrnn._C could not be loaded ({type(exc).__name__}: {exc}). Rebuild it with "
        "`pip install -e . --no-build-isolation` (see README); until then the 'cpp' backend is unavailable "
        "and fastrnn uses its 'reference' backend."
    )
    warnings.warn(_C_ERROR, RuntimeWarning, stacklevel=2)
