"""Swap torch.nn recurrent modules of an existing model for fastrnn's, in place, and back."""

from typing import Dict, List, Tuple

from torch import nn

from fastrnn import modules as _m

_TO_FAST = {
    nn.LSTM: _m.LSTM,
    nn.GRU: _m.GRU,
    nn.RNN: _m.RNN,
    nn.LSTMCell: _m.LSTMCell,
    nn.GRUCell: _m.GRUCell,
    nn.RNNCell: _m.RNNCell,
}
_ORIGINAL = "_fastrnn_original"


def _swap(model: nn.Module, make) -> List[Tuple[str, nn.Module, nn.Module]]:
    swapped = []
    if make(model) is not None:
        raise TypeError("patch/unpatch replace submodules in place; pass the parent model, not the RNN itself")
    todo = [(name, parent, child) for parent_name, parent in model.named_modules()
            for name, child in parent.named_children()
            for name in [f"{parent_name}.{name}" if parent_name else name]]
    for full, parent, child in todo:
        new = make(child)
        if new is not None:
            setattr(parent, full.rsplit(".", 1)[-1], new)
            swapped.append((full, child, new))
    return swapped


def patch(model: nn.Module, backend: str = "auto") -> Dict[str, nn.Module]:
    """Replace every ``torch.nn`` LSTM/GRU/RNN and ``*Cell`` submodule of ``model`` with fastrnn's.

    The replacements share the original parameters (same objects: optimizers and weight tying keep
    working), device, dtype and training mode. Returns ``{qualified name: new module}``.
    """

    def make(child):
        cls = _TO_FAST.get(type(child))
        if cls is None:
            return None
        new = cls.from_torch(child, backend=backend)
        object.__setattr__(new, _ORIGINAL, child)
        return new

    return {name: new for name, _, new in _swap(model, make)}


def unpatch(model: nn.Module) -> Dict[str, nn.Module]:
    """Put back the torch.nn modules that ``patch`` replaced. Returns ``{qualified name: restored module}``."""
    return {name: old for name, _, old in _swap(model, lambda child: child.__dict__.get(_ORIGINAL))}
