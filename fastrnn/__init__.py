"""fastrnn: fused LSTM, GRU and Elman-RNN kernels behind drop-in ``torch.nn`` modules."""

from fastrnn._ext import _C  # noqa: F401  (warns once if the extension is missing)
from fastrnn.backend import BACKENDS, availability_report, set_backend, use_backend
from fastrnn.explain import explain
from fastrnn.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from fastrnn.patch import patch, unpatch

__version__ = "0.1.0"

# What torch.load(..., weights_only=True) of a whole model holding fastrnn modules needs allowed on top of what
# the same model with torch.nn's modules needs: torch.serialization.add_safe_globals(fastrnn.SAFE_GLOBALS)
SAFE_GLOBALS = [LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell]

__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "patch",
    "unpatch",
    "set_backend",
    "use_backend",
    "availability_report",
    "explain",
    "BACKENDS",
    "SAFE_GLOBALS",
]
