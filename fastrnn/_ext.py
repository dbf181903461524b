"""Loads the compiled extension ``fastrnn._C`` once; fastrnn stays importable without it. Also the variables that
cap the CPU's vector ISA, which decide what the extension and the libraries beside it run."""

import os
import warnings
from typing import Mapping, Optional

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


# The variables that cap the vector ISA fastrnn, oneDNN, ATen and MKL run at (README, "CPU"), to see a smaller
# machine's path on a larger one. Under some but not all of them the uncapped libraries keep the CPU's full ISA:
# MKL left alone ran torch.nn's GRU and RNN, and every at::mm of fastrnn's, at AVX-512 in an "AVX2" benchmark
# (408.6 GF/s fp32 against 219.1 capped).
ISA_CAPS = ("FASTRNN_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def isa_cap_warning(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why a process under some of ``ISA_CAPS`` but not all runs no one machine's path, or ``None``."""
    env = os.environ if env is None else env
    missing = [k for k in ISA_CAPS if not env.get(k)]
    if not missing or len(missing) == len(ISA_CAPS):
        return None
    capped = [k for k in ISA_CAPS if k not in missing]
    return (f"WARNING: the ISA is capped by {', '.join(capped)} but not by {', '.join(missing)}: those libraries still "
            "run at the CPU's full ISA, so this process mixes two machines' paths (README, \"CPU\").")
