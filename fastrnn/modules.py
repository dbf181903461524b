"""Drop-in replacements for ``torch.nn.LSTM/GRU/RNN`` and the three ``*Cell`` modules.

The classes derive from ``torch.nn.RNNBase``/``torch.nn.RNNCellBase`` rather than from ``nn.LSTM`` & co.:
they inherit torch's constructor checks, parameter names, registration order and initialisation (so a
``state_dict`` loads both ways) while staying outside the ``isinstance`` test that makes ``torch.compile``
graph-break on torch's own recurrent modules.
"""

import warnings
from types import ModuleType
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastrnn import interop as _interop
from fastrnn import backend as _backend
from fastrnn.ops import LayerArgs


class HiddenStateTypeError(TypeError, AttributeError, IndexError):
    """``hx`` of the wrong Python type (a tuple for GRU/RNN, a bare Tensor for LSTM).

    torch.nn fails on these deep inside with an AttributeError or an IndexError; deriving from both keeps
    ``except`` clauses written for torch.nn working while the message says what is wrong.
    """


def _check_state(name: str, t: Tensor, x: Tensor, expected: Tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise HiddenStateTypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(expected):
        raise RuntimeError(f"Expected {name} size {tuple(expected)}, got {list(t.shape)}")
    if t.dtype != x.dtype:
        raise RuntimeError(f"{name} dtype must equal the input dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise RuntimeError(f"{name} must be on the input's device {x.device}, got {t.device}")


def _check_params(params: List[Optional[Tensor]], names: List[str], x: Tensor) -> None:
    for p, n in zip(params, names):
        if p is not None and p.device != x.device:
            raise RuntimeError(f"parameter {n} is on {p.device} but the input is on {x.device}")


def _check_backend_options(options: Optional[Dict[str, dict]]) -> Dict[str, dict]:
    """``backend_options``: ``{backend name: {option: value}}``; a layer run by that backend gets the options
    as keywords of its ``layer`` (``fastrnn.ops.triton`` lists the Triton ones), the others ignore them."""
    options = dict(options or {})
    for name, opts in options.items():
        if name not in _backend.BACKENDS or not isinstance(opts, dict):
            raise ValueError(f"backend_options must map backend names {_backend.BACKENDS} to dicts of options, "
                             f"got {name!r}: {opts!r}")
    return options


class _BackendMixin:
    backend: str
    backend_options: Dict[str, dict]

    def _backend_for(self, x: Tensor) -> Tuple[ModuleType, dict]:
        """The backend module that runs this module on ``x`` and the options the module gives it."""
        name, impl = _backend.resolve_named(self.backend, x.device, x.dtype)
        return impl, self.backend_options.get(name, {})


class _Rows(NamedTuple):
    """An input flattened to time-major rows (``fastrnn.ops`` layout) and what restores its form."""

    rows: Tensor
    batch_sizes: Optional[Tensor]
    sorted_indices: Optional[Tensor]
    unsorted_indices: Optional[Tensor]
    T: int
    B: int
    batched: bool


class _RNNBase(_BackendMixin, nn.RNNBase):
    def __init__(self, mode: str, *args, backend: str = "auto", backend_options: Optional[Dict[str, dict]] = None,
                 **kwargs) -> None:
        super().__init__(mode, *args, **kwargs)
        self.backend = _backend._check_name(backend)
        self.backend_options = _check_backend_options(backend_options)

    def flatten_parameters(self) -> None:
        """A no-op kept for API compatibility: fastrnn reads the parameters in place."""

    __prepare_scriptable__ = _interop.prepare_scriptable

    def _layer_params(self, layer: int, direction: int) -> List[Optional[Tensor]]:
        suffix = "_reverse" if direction == 1 else ""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        return [getattr(self, f"{n}_l{layer}{suffix}", None) for n in names]

    def _autocast_dtype(self, device_type: str) -> Optional[torch.dtype]:
        # as torch.nn: under autocast every mode computes in the autocast dtype (cuDNN; on CPU oneDNN's LSTM
        # and autocast-listed linear ops), but CPU GRU returns the weights' dtype (see _run)
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)

    def _check_input(self, x: Tensor, packed: bool) -> None:
        w = self.weight_ih_l0
        if x.dtype != w.dtype and self._autocast_dtype(x.device.type) is None:
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({w.dtype}). "
                f"Convert input: input.to({w.dtype}), or convert model: model.to({x.dtype})"
            )
        expected_dim = 2 if packed else 3
        if x.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {x.dim()}")
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.size(-1)}"
            )
        if x.device != w.device:
            raise RuntimeError(f"input is on {x.device} but the module's weights are on {w.device}")

    def _check_hx_type(self, hx) -> None:
        if hx is None:
            return
        if self.mode != "LSTM":
            if not isinstance(hx, Tensor):
                raise HiddenStateTypeError(f"{self._get_name()} hx must be a Tensor, got {type(hx).__name__}")
        elif not isinstance(hx, (tuple, list)):
            raise HiddenStateTypeError(f"LSTM hx must be a tuple (h_0, c_0) of Tensors, got {type(hx).__name__}")
        elif len(hx) != 2:
            raise HiddenStateTypeError(f"LSTM hx must be a tuple (h_0, c_0) of 2 Tensors, got {len(hx)}")

    def _flatten_input(self, input: Union[Tensor, PackedSequence]) -> _Rows:
        """Time-major ``[N, I]`` rows of a padded, batch-first, unbatched or packed input, checked."""
        if isinstance(input, PackedSequence):
            x, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_input(x, True)
            B = int(batch_sizes[0]) if batch_sizes.numel() else 0
            return _Rows(x, batch_sizes, sorted_indices, unsorted_indices, batch_sizes.numel(), B, True)
        x = input
        if x.dim() not in (2, 3):
            raise ValueError(f"{self.mode.split('_')[0]}: Expected input to be 2D or 3D, got {x.dim()}D instead")
        is_batched = x.dim() == 3
        if not is_batched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        self._check_input(x, False)
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        T, B = x.shape[:2]
        return _Rows(x.reshape(T * B, self.input_size), None, None, None, T, B, is_batched)

    def _state_shapes(self, B: int) -> Tuple[Tuple[int, int, int], ...]:
        num_dir = 2 if self.bidirectional else 1
        h_shape = (self.num_layers * num_dir, B, self.proj_size or self.hidden_size)
        return (h_shape, (h_shape[0], B, self.hidden_size)) if self.mode == "LSTM" else (h_shape,)

    def _check_hidden_size(self, hx, inp: _Rows) -> Tuple[Tensor, ...]:
        """``hx`` as a tuple of ``[layers*directions, B, *]`` states, batched, checked against the input."""
        shapes = self._state_shapes(inp.B)
        if hx is None:
            return tuple(inp.rows.new_zeros(shape) for shape in shapes)
        states = tuple(hx) if self.mode == "LSTM" else (hx,)
        names = ("hx[0]", "hx[1]") if self.mode == "LSTM" else ("hx",)
        want_dim = 3 if inp.batched else 2
        for n, s in zip(names, states):
            if not isinstance(s, Tensor):
                raise HiddenStateTypeError(f"{n} must be a Tensor, got {type(s).__name__}")
            if inp.batch_sizes is None and s.dim() != want_dim:
                raise RuntimeError(
                    f"For {'batched 3-D' if inp.batched else 'unbatched 2-D'} input, {n} should also be "
                    f"{want_dim}-D but got {s.dim()}-D tensor"
                )
        if not inp.batched:
            states = tuple(s.unsqueeze(1) for s in states)
        for n, s, shape in zip(names, states, shapes):
            _check_state(n, s, inp.rows, shape)
        return states

    @staticmethod
    def _permute_hidden(states: Tuple[Tensor, ...], permutation: Optional[Tensor]) -> Tuple[Tensor, ...]:
        """Reorder the batch dimension of every state (packed sequences sorted by length, and back)."""
        if permutation is None:
            return states
        return tuple(s.index_select(1, permutation) for s in states)

    def _run_layers(self, rows: Tensor, batch_sizes: Optional[Tensor], states: Tuple[Tensor, ...],
                    amp_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """Every layer and direction through the backend: ``(last layer's rows, final states)``."""
        num_dir = 2 if self.bidirectional else 1
        impl, options = self._backend_for(rows)
        finals: List[List[Tensor]] = [[] for _ in states]
        for layer in range(self.num_layers):
            outs = []
            for d in range(num_dir):
                params = self._layer_params(layer, d)
                _check_params(params, ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"], rows)
                if amp_dtype is not None:
                    params = [None if p is None else p.to(amp_dtype) for p in params]
                k = layer * num_dir + d
                c0 = states[1][k] if self.mode == "LSTM" else None
                out = impl.layer(LayerArgs(self.mode, rows, batch_sizes, states[0][k], c0, *params, d == 1), **options)
                outs.append(out.y)
                for final, s in zip(finals, (out.h_n, out.c_n)):
                    final.append(s)
            rows = outs[0] if num_dir == 1 else torch.cat(outs, 1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                rows = F.dropout(rows, self.dropout, True)
        return rows, tuple(torch.stack(f) for f in finals)

    def _format_output(self, rows: Tensor, states: Tuple[Tensor, ...], inp: _Rows):
        """The output and hidden state in the form of the input (packed, padded, batch-first, unbatched)."""
        if inp.batch_sizes is not None:
            states = self._permute_hidden(states, inp.unsorted_indices)
            out = PackedSequence(rows, inp.batch_sizes, inp.sorted_indices, inp.unsorted_indices)
        else:
            out = rows.reshape(inp.T, inp.B, rows.size(-1))
            if self.batch_first:
                out = out.transpose(0, 1)
            if not inp.batched:
                out = out.squeeze(0 if self.batch_first else 1)
                states = tuple(s.squeeze(1) for s in states)
        return out, (states if self.mode == "LSTM" else states[0])

    def _run(self, input: Union[Tensor, PackedSequence], hx: Optional[Union[Tensor, Tuple[Tensor, Tensor]]]):
        """Shared forward, in torch.nn's steps: check the input and hidden state, permute the hidden state to
        the packed order, run the layers, restore the input's form."""
        tool = _interop.torch_nn_tool()
        if tool is not None:
            return _interop.run_as_torch_nn(self, tool, input, hx)
        self._check_hx_type(hx)
        inp = self._flatten_input(input)
        states = self._permute_hidden(self._check_hidden_size(hx, inp), inp.sorted_indices)
        rows = inp.rows
        amp_dtype = self._autocast_dtype(rows.device.type)
        if amp_dtype is not None:
            rows, states = rows.to(amp_dtype), tuple(s.to(amp_dtype) for s in states)
        rows, states = self._run_layers(rows, inp.batch_sizes, states, amp_dtype)
        if amp_dtype is not None and self.mode == "GRU" and rows.device.type == "cpu":
            # torch.nn's CPU GRU computes in the autocast dtype but returns the weights' dtype
            w_dtype = self.weight_ih_l0.dtype
            rows, states = rows.to(w_dtype), tuple(s.to(w_dtype) for s in states)
        return self._format_output(rows, states, inp)

    @classmethod
    def from_torch(cls, module: nn.RNNBase, backend: str = "auto", backend_options: Optional[Dict[str, dict]] = None):
        """A fastrnn module sharing ``module``'s parameters (the same objects, so optimizers keep working)."""
        if not isinstance(module, nn.RNNBase) or module.mode not in cls._modes:
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn module of mode {cls._modes}, got {module!r}")
        kwargs = dict(
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
        )
        if module.proj_size:
            kwargs["proj_size"] = module.proj_size
        if module.mode.startswith("RNN_"):
            kwargs["nonlinearity"] = module.nonlinearity
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = cls(module.input_size, module.hidden_size, backend=backend, backend_options=backend_options,
                      **kwargs)
        for name in module._flat_weights_names:
            new._parameters[name] = module._parameters[name]
        new._init_flat_weights()
        return new.train(module.training)


class LSTM(_RNNBase):
    """``torch.nn.LSTM`` (same constructor, including ``proj_size``) plus keyword-only ``backend`` and
    ``backend_options``."""

    _modes = ("LSTM",)

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__("LSTM", *args, backend=backend, **kwargs)

    def forward(self, input, hx=None):
        return self._run(input, hx)


class GRU(_RNNBase):
    """``torch.nn.GRU`` plus keyword-only ``backend`` and ``backend_options``."""

    _modes = ("GRU",)

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, backend=backend, **kwargs)

    def forward(self, input, hx=None):
        return self._run(input, hx)


class RNN(_RNNBase):
    """``torch.nn.RNN`` (``nonlinearity`` 'tanh' or 'relu') plus keyword-only ``backend`` and
    ``backend_options``."""

    _modes = ("RNN_TANH", "RNN_RELU")

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if self.nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(modes[self.nonlinearity], *args, backend=backend, **kwargs)

    def forward(self, input, hx=None):
        return self._run(input, hx)


class _CellBase(_BackendMixin, nn.RNNCellBase):
    _mode = ""

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int, backend: str,
                 backend_options: Optional[Dict[str, dict]], **kw) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks, **kw)
        self.backend = _backend._check_name(backend)
        self.backend_options = _check_backend_options(backend_options)

    def _step(self, input: Tensor, hx, n_states: int):
        tool = _interop.torch_nn_tool()
        if tool is not None:
            return _interop.run_as_torch_nn(self, tool, input, hx)
        name = self._get_name()
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        w = self.weight_ih
        if x.size(1) != self.input_size:
            raise RuntimeError(f"{name}: input has inconsistent input_size: got {x.size(1)} expected {self.input_size}")
        if x.dtype != w.dtype:
            raise RuntimeError(f"{name}: input dtype {x.dtype} does not match weight dtype {w.dtype}")
        if x.device != w.device:
            raise RuntimeError(f"{name}: input is on {x.device} but the weights are on {w.device}")
        names = ("hx[0]", "hx[1]") if n_states == 2 else ("hx",)
        if hx is None:
            states = tuple(x.new_zeros(x.size(0), self.hidden_size) for _ in range(n_states))
        else:
            if n_states == 2 and not isinstance(hx, (tuple, list)):
                raise HiddenStateTypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            if n_states == 1 and not isinstance(hx, Tensor):
                raise HiddenStateTypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
            states = tuple(hx) if n_states == 2 else (hx,)
            for n, s in zip(names, states):
                if not isinstance(s, Tensor):
                    raise HiddenStateTypeError(f"{name}: {n} must be a Tensor, got {type(s).__name__}")
                if s.dim() not in (1, 2):
                    raise ValueError(f"{name}: Expected {n} to be 1D or 2D, got {s.dim()}D instead")
            if not is_batched:
                states = tuple(s.unsqueeze(0) for s in states)
            for n, s in zip(names, states):
                _check_state(n, s, x, (x.size(0), self.hidden_size))
        impl, options = self._backend_for(x)
        c0 = states[1] if n_states == 2 else None
        h, _, c = impl.layer(LayerArgs(self._mode, x, None, states[0], c0, self.weight_ih, self.weight_hh,
                                       self.bias_ih, self.bias_hh, None, False), **options)
        if not is_batched:
            h = h.squeeze(0)
            c = None if c is None else c.squeeze(0)
        return (h, c) if n_states == 2 else h

    __prepare_scriptable__ = _interop.prepare_scriptable

    @classmethod
    def from_torch(cls, module: nn.RNNCellBase, backend: str = "auto",
                   backend_options: Optional[Dict[str, dict]] = None):
        """A fastrnn cell that shares ``module``'s parameters (same objects, so optimizers keep working)."""
        if type(module) is not _TORCH_CELLS[cls.__name__]:
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{cls.__name__}, got {module!r}")
        kwargs = {"nonlinearity": module.nonlinearity} if isinstance(module, nn.RNNCell) else {}
        with torch.device("meta"):
            new = cls(module.input_size, module.hidden_size, module.bias, backend=backend,
                      backend_options=backend_options, **kwargs)
        for name, p in module._parameters.items():
            new._parameters[name] = p
        return new.train(module.training)


_TORCH_CELLS = {"LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell, "RNNCell": nn.RNNCell}


class LSTMCell(_CellBase):
    """``torch.nn.LSTMCell`` plus keyword-only ``backend`` and ``backend_options``; one fused step per call."""

    _mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, backend: str = "auto",
                 backend_options: Optional[Dict[str, dict]] = None) -> None:
        super().__init__(input_size, hidden_size, bias, 4, backend, backend_options, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        return self._step(input, hx, 2)


class GRUCell(_CellBase):
    """``torch.nn.GRUCell`` plus keyword-only ``backend`` and ``backend_options``; one fused step per call."""

    _mode = "GRU"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, backend: str = "auto",
                 backend_options: Optional[Dict[str, dict]] = None) -> None:
        super().__init__(input_size, hidden_size, bias, 3, backend, backend_options, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)


class RNNCell(_CellBase):
    """``torch.nn.RNNCell`` (``nonlinearity`` 'tanh' or 'relu') plus keyword-only ``backend`` and
    ``backend_options``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        backend_options: Optional[Dict[str, dict]] = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, 1, backend, backend_options, device=device, dtype=dtype)

    @property
    def _mode(self) -> str:  # type: ignore[override]
        return "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)
