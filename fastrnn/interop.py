"""fastrnn modules under the PyTorch tools that need torch.nn's own recurrent ops.

ONNX export and ``torch.jit.trace`` know ``aten::lstm``/``gru``/``rnn_*`` (the ops torch.nn calls), not
fastrnn's custom ops: there the modules run as the torch.nn module they replace, built on the spot around
the same parameters, so the exported file or traced graph is torch.nn's (for the LSTM and GRU one ONNX
``LSTM``/``GRU`` node per layer). What torch.nn cannot express there fails with an error naming the option.
``torch.jit.script`` fails with an error that names these tools.

``torch.compile`` and ``torch.export.export`` keep fastrnn's kernels (custom ops); torch.func transforms
and double backward switch to differentiable ops inside ``fastrnn.ops.glue``.
"""

import sys
import warnings
from typing import Optional

import torch
from torch import nn

_TORCH_RNNS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}
_TORCH_CELLS = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell, "RNN_TANH": nn.RNNCell, "RNN_RELU": nn.RNNCell}
# fastrnn's own cells: the value that turns each off (a module without the attribute has it off) and whether it
# acts in eval mode (recurrent dropout does not: a model trained with it exports for inference)
_OWN_OPTIONS = (("layer_norm", False, True), ("zoneout", 0.0, True), ("recurrent_dropout", 0.0, False))
_EXPORT_INSTEAD = "torch.export.export keeps fastrnn's ops and runs every option"


def torch_nn_tool() -> Optional[str]:
    """The tool in progress that needs torch.nn's ops (ONNX export, ``torch.jit.trace``), else ``None``."""
    if _onnx_exporting():
        return "ONNX export"
    if not torch.compiler.is_dynamo_compiling() and torch.jit.is_tracing():
        return "torch.jit.trace"
    return None


def _onnx_exporting() -> bool:
    if not torch.compiler.is_dynamo_compiling():
        # an export has imported torch.onnx; a process that never exports is spared importing it here
        return "torch.onnx" in sys.modules and torch.onnx.is_in_onnx_export()
    # dynamo folds torch.onnx.is_in_onnx_export() to False, also where the exporter retries with strict=True
    # (dynamo): there the flag behind it is read directly, a constant of the graph; if torch moves it, the retry
    # records fastrnn's ops, which the exporter then reports it cannot translate
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


def _check_expressible(module: nn.Module, tool: str) -> None:
    name = type(module).__name__
    for option, off, in_eval in _OWN_OPTIONS:
        value = getattr(module, option, off)
        if value != off and (in_eval or module.training):
            raise RuntimeError(f"fastrnn.{name}({option}={value!r}) has no torch.nn equivalent for {tool}, which "
                               f"runs the module as torch.nn.{name}; {_EXPORT_INSTEAD}")
    if tool == "ONNX export" and getattr(module, "proj_size", 0):
        # torch.nn.LSTM(proj_size=...) itself exports a file onnxruntime rejects (ONNX's LSTM has no projection)
        raise RuntimeError(f"fastrnn.LSTM(proj_size={module.proj_size}) cannot be exported to ONNX: the ONNX LSTM "
                           f"operator has no projection (proj_size); {_EXPORT_INSTEAD}")


def as_torch_nn(module: nn.Module) -> nn.Module:
    """The torch.nn module ``module`` replaces, holding the very tensors ``module`` reads as parameters now
    (so ``functional_call``, export and tracing see them)."""
    if isinstance(module, nn.RNNBase):
        cls = _TORCH_RNNS[module.mode]
        keys = ("num_layers", "bias", "batch_first", "dropout", "bidirectional")
        kwargs = {k: getattr(module, k) for k in keys}
        kwargs.update({"proj_size": module.proj_size} if cls is nn.LSTM else {})
    else:
        cls = _TORCH_CELLS[module._mode]
        kwargs = {"bias": module.bias}
    if cls in (nn.RNN, nn.RNNCell):
        kwargs["nonlinearity"] = module.nonlinearity
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn's notice about dropout with one layer: the user saw it once
        twin = cls(module.input_size, module.hidden_size, **kwargs)
    for name in twin._parameters:
        twin._parameters[name] = getattr(module, name)
    if isinstance(twin, nn.RNNBase):
        # torch.nn's flatten_parameters would move the parameters into one cuDNN buffer (on CUDA): they are the
        # user's, read by fastrnn in place, and stay where they are
        twin.flatten_parameters = lambda: None
        twin._init_flat_weights()
    return twin.train(module.training)


def run_as_torch_nn(module: nn.Module, tool: str, *inputs):
    """``module(*inputs)`` through the torch.nn module it replaces, for ``tool`` (see :func:`torch_nn_tool`)."""
    _check_expressible(module, tool)
    return as_torch_nn(module)(*inputs)


def prepare_scriptable(module: nn.Module) -> nn.Module:
    """The modules' ``__prepare_scriptable__``: ``torch.jit.script`` cannot compile fastrnn's Python. (Handing it
    the torch.nn module instead would not do: it puts what this returns into the user's model, in place.)"""
    raise RuntimeError(f"torch.jit.script cannot compile fastrnn.{type(module).__name__}: torch.jit.trace records "
                       f"it as torch.nn's ops; torch.onnx.export and torch.export.export are the maintained ways "
                       f"(fastrnn.unpatch(model) puts torch.nn's modules back into a patched model)")
