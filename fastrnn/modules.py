"""Drop-in replacements for ``torch.nn.LSTM/GRU/RNN`` and the three ``*Cell`` modules.

The classes derive from ``torch.nn.RNNBase``/``torch.nn.RNNCellBase`` rather than from ``nn.LSTM`` & co.:
they inherit torch's constructor checks, parameter names, registration order and initialisation (so a
``state_dict`` loads both ways) while staying outside the ``isinstance`` test that makes ``torch.compile``
graph-break on torch's own recurrent modules.
"""

import warnings
from types import ModuleType
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastrnn import interop as _interop
from fastrnn import backend as _backend
from fastrnn.ops import GATES, CellExt, LayerArgs
from fastrnn.ops import glue as _glue


class HiddenStateTypeError(TypeError, AttributeError, IndexError):
    """``hx`` of the wrong Python type (a tuple for GRU/RNN, a bare Tensor for LSTM).

    torch.nn fails on these deep inside with an AttributeError or an IndexError; deriving from both keeps
    ``except`` clauses written for torch.nn working while the message says what is wrong.
    """


def _check_state(name: str, t: Tensor, x: Tensor, expected: Tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise HiddenStateTypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != expected:
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


def _check_probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {p!r}")
    return float(p)


# Called with (args, ext, backend module, options, pair) before each layer call, per direction (pair: the call runs
# both directions of a bidirectional layer through the backend's layer.pair): how fastrnn.explain sees the calls.
LAYER_CALL_OBSERVERS: List[Callable[[LayerArgs, CellExt, ModuleType, dict, bool], None]] = []


_T = TypeVar("_T")
# torch.nn's cells: no LayerNorm, zoneout or recurrent dropout
_PLAIN_CELLS = CellExt(*(None,) * len(CellExt._fields))


class _BackendMixin:
    """Backend choice, and fastrnn's own cells (``CellExt``): options, LayerNorm parameters, masks."""

    backend: str
    backend_options: Dict[str, dict]
    layer_norm: bool
    zoneout: float
    recurrent_dropout: float

    def _init_ext(self, layer_norm: bool, zoneout: float, recurrent_dropout: float) -> None:
        if not isinstance(layer_norm, bool):
            raise ValueError(f"layer_norm must be a bool, got {layer_norm!r}")
        self.layer_norm = layer_norm
        self.zoneout = _check_probability("zoneout", zoneout)
        self.recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # torch's, next in the module classes' MRO
        self._reset_layer_norm()

    def extra_repr(self) -> str:
        opts = [("layer_norm", self.layer_norm, False), ("zoneout", self.zoneout, 0.0),
                ("recurrent_dropout", self.recurrent_dropout, 0.0)]
        return super().extra_repr() + "".join(f", {n}={v}" for n, v, off in opts if v != off)

    def _register_layer_norm(self, suffix: str, G: int, H: int, lstm: bool, factory: dict) -> None:
        """Gain (1) and shift (0) of the LayerNorms of one layer and direction, named ``layer_norm_*{suffix}``."""
        widths = {"ih": G * H, "hh": G * H, **({"c": H} if lstm else {})}
        for part, width in widths.items():
            for kind in ("weight", "bias"):
                name = f"layer_norm_{part}_{kind}{suffix}"
                self.register_parameter(name, nn.Parameter(torch.empty(width, **factory)))
        self._reset_layer_norm()

    def _reset_layer_norm(self) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters(recurse=False):
                if name.startswith("layer_norm_"):
                    p.fill_(1.0 if "_weight" in name else 0.0)

    def _layer_norm_params(self, suffix: str) -> List[Optional[Tensor]]:
        if not self.layer_norm:
            return [None] * 6
        return [getattr(self, f"layer_norm_{part}_{kind}{suffix}", None)
                for part in ("ih", "hh", "c") for kind in ("weight", "bias")]

    def _zoneout_mask(self, like: Tensor, rows: int, width: int) -> Optional[Tensor]:
        """Per row and unit, the weight of the previous state: a draw in training, ``p`` in eval."""
        if self.zoneout == 0:
            return None
        if not self.training:
            return like.new_full((rows, width), self.zoneout)
        return like.new_empty(rows, width).bernoulli_(self.zoneout)

    def _recurrent_dropout_mask(self, like: Tensor, B: int, width: int) -> Optional[Tensor]:
        """One inverted-dropout mask on ``h_{t-1}`` for a whole sequence (training only)."""
        p = self.recurrent_dropout
        if p == 0 or not self.training:
            return None
        if p == 1:
            return like.new_zeros(B, width)
        return like.new_empty(B, width).bernoulli_(1 - p).div_(1 - p)

    def _backend_for(self, x: Tensor, features: Tuple[str, ...] = ()) -> Tuple[ModuleType, dict]:
        """The backend module that runs this module on ``x`` and the options the module gives it; ``features``
        (``CellExt.features()``) a backend lacks send ``"auto"`` to the reference backend and fail otherwise."""
        name, impl = _backend.resolve_named(self.backend, x.device, x.dtype)
        missing = [f for f in features if f not in getattr(impl, "EXT_FEATURES", ())]
        if missing:
            if self.backend != "auto" or _backend.requested_backend() != "auto":
                raise RuntimeError(f"fastrnn backend {name!r} does not run {', '.join(missing)}; use backend='auto' "
                                   f"or a backend that does")
            name, impl = _backend.resolve_named("reference", x.device, x.dtype)
        return impl, self.backend_options.get(name, {})

    def _cpp_at_once(self, x: Tensor, tensors: Sequence[Optional[Tensor]],
                     run: Callable[[ModuleType], _T]) -> Optional[_T]:
        """``run(cpp)`` where a call of torch.nn's cells on ``x`` may skip the layer ops and the contract's checks
        in Python for the cpp backend's C++ entry points (the C++ checks every input itself), else None: the cpp
        backend without options, nothing tracing or watching ``tensors`` (``glue.unwatched``) and no
        ``LAYER_CALL_OBSERVERS``; None too where ``run`` fails, so that the op's path raises its error naming the
        argument. With gradients the entry points are csrc/rnn.cpp's autograd nodes. Those ~0.1-0.2 ms a layer in
        Python cost more than a layer at one step: a two-layer RNN at H = 512 generating took 350 µs a step against
        torch.nn's 130, and an RNNCell of 8 units in a training loop ran at 0.24x torch.nn."""
        if LAYER_CALL_OBSERVERS or not _glue.unwatched(tensors):
            return None
        name, impl = _backend.resolve_named(self.backend, x.device, x.dtype)
        if name != "cpp" or self.backend_options.get("cpp"):
            return None
        try:
            return run(impl)
        except (RuntimeError, TypeError):  # TypeError: an argument pybind cannot convert
            return None

    def _call_layer(self, a: LayerArgs, ext: CellExt):
        if ext is _PLAIN_CELLS or not ext.features():
            out = self._cpp_at_once(a.x, a.tensors(), lambda cpp: cpp.layer_forward(a))
            if out is not None:
                return out
        impl, options = self._backend_for(a.x, ext.features())
        for observe in LAYER_CALL_OBSERVERS:
            observe(a, ext, impl, options, False)
        if ext.features():
            return impl.layer(a, ext=ext, **options)
        return impl.layer(a, **options)

    def _call_pair(self, a: LayerArgs, ext: CellExt, r: LayerArgs, ext_r: CellExt) -> list:
        """Both directions of a bidirectional layer: in one call where the backend runs them as a pair (plain
        cells, both directions taking gradients or neither), else one call each."""
        if ext.features() or ext_r.features() or _glue.saving(a.tensors()) != _glue.saving(r.tensors()):
            return [self._call_layer(a, ext), self._call_layer(r, ext_r)]
        out = self._cpp_at_once(a.x, a.tensors() + r.tensors()[1:], lambda cpp: cpp.pair_forward(a, r))
        if out is not None:
            return list(out)
        impl, options = self._backend_for(a.x)
        if getattr(impl.layer, "pair_fwd", None) is None:
            return [self._call_layer(a, ext), self._call_layer(r, ext_r)]
        for observe in LAYER_CALL_OBSERVERS:
            observe(a, ext, impl, options, True)
            observe(r, ext_r, impl, options, True)
        return list(impl.layer.pair(a, r, **options))


def _plain_parameters(module: nn.Module, names: Sequence[str]) -> Optional[List[Optional[Tensor]]]:
    """``module``'s parameters ``names`` as they are registered (~0.5 µs a name less than ``nn.Module.__getattr__``),
    or None where one is not (a parametrization or ``weight_norm`` computes it; the checked path computes it, once
    a call) or is absent (no bias: None)."""
    p = module._parameters
    try:
        return [p[name] for name in names]
    except KeyError:
        return None


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _state_pair(hx, lstm: bool) -> Optional[tuple]:
    """``(h, c)`` of a module's or cell's ``hx`` for the C++ entries (``c`` None unless LSTM, both None for zeros),
    or None for an LSTM ``hx`` that is no pair (the checked path names what is wrong)."""
    if hx is None or not lstm:
        return hx, None
    return tuple(hx) if type(hx) in (tuple, list) and len(hx) == 2 else None


class _Rows(NamedTuple):
    """An input flattened to time-major rows (``fastrnn.ops`` layout) and what restores its form."""

    rows: Tensor
    batch_sizes: Optional[Tensor]
    sorted_indices: Optional[Tensor]
    unsorted_indices: Optional[Tensor]
    T: int
    B: int
    batched: bool


_EQUATIONS = {
    "LSTM": ("gates = LN_ih(W_ih x_t) + b_ih + LN_hh(W_hh h_{t-1}) + b_hh   (LN over all 4H gates i, f, g, o)\n"
             "c_t = f*c_{t-1} + i*g\n"
             "h_t = o*tanh(LN_c(c_t))   (LN_c over H), then W_hr if proj_size"),
    "GRU": ("gx = LN_ih(W_ih x_t) + b_ih,   gh = LN_hh(W_hh h_{t-1}) + b_hh   (each over all 3H gates r, z, n)\n"
            "r = sigmoid(gx_r + gh_r),   z = sigmoid(gx_z + gh_z),   n = tanh(gx_n + r*gh_n)\n"
            "h_t = (1-z)*n + z*h_{t-1}"),
    "RNN": "h_t = act(LN_ih(W_ih x_t) + b_ih + LN_hh(W_hh h_{t-1}) + b_hh)",
}


def _doc(head: str, kind: str, cell: bool) -> str:
    """A module's docstring: what it replaces, then fastrnn's own cells with their equations."""
    lstm = kind == "LSTM"
    names = "layer_norm_{ih,hh%s}_{weight,bias}%s" % (",c" if lstm else "", "" if cell else "_l{k}[_reverse]")
    equations = "\n".join("        " + line for line in _EQUATIONS[kind].splitlines())
    zoneout_c = ("\n      Each unit of ``c`` likewise, with its own draws; ``h'_t`` is computed from the new ``c``"
                 " before zoneout.") if lstm else ""
    once = ("sequence of calls (a call with ``hx=None``,\n      another batch size or ``reset_dropout_mask()`` "
            "starts one)") if cell else "sequence, layer and direction"
    return f"""{head} plus keyword-only ``backend`` and ``backend_options``{'; one fused step per call' if cell else ''}.

    fastrnn's own cells, keyword-only and off by default (off, the module is torch.nn's, ``state_dict`` too):

    - ``layer_norm=True`` (Ba et al. 2016): LayerNorms with eps 1e-5 and their own gain (initially 1) and shift
      (initially 0){' per layer and direction' if not cell else ''}, named ``{names}``::

{equations}

    - ``zoneout=p`` (Krueger et al. 2016): in training each unit of ``h`` keeps its previous value with
      probability ``p``: ``h_t = d*h_{{t-1}} + (1-d)*h'_t``, ``d ~ Bernoulli(p)`` drawn from torch's generator
      for every step, unit and sequence; in eval ``h_t = p*h_{{t-1}} + (1-p)*h'_t``.{zoneout_c}
    - ``recurrent_dropout=p`` (Gal and Ghahramani 2016; Keras' ``recurrent_dropout``): in training ``h_{{t-1}}``
      is multiplied by ``m/(1-p)`` where it enters ``W_hh`` (only there: the state is not dropped), with
      ``m ~ Bernoulli(1-p)`` drawn once per {once}.
    """


class _RNNBase(_BackendMixin, nn.RNNBase):
    def __init__(self, mode: str, *args, backend: str = "auto", backend_options: Optional[Dict[str, dict]] = None,
                 layer_norm: bool = False, zoneout: float = 0.0, recurrent_dropout: float = 0.0, **kwargs) -> None:
        self._init_ext(layer_norm, zoneout, recurrent_dropout)
        super().__init__(mode, *args, **kwargs)
        self.backend = _backend._check_name(backend)
        self.backend_options = _check_backend_options(backend_options)
        if layer_norm:
            factory = {"device": self.weight_ih_l0.device, "dtype": self.weight_ih_l0.dtype}
            for layer in range(self.num_layers):
                for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]:
                    self._register_layer_norm(f"_l{layer}{suffix}", GATES[mode], self.hidden_size, mode == "LSTM",
                                              factory)

    def flatten_parameters(self) -> None:
        """A no-op kept for API compatibility: fastrnn reads the parameters in place."""

    __prepare_scriptable__ = _interop.prepare_scriptable

    @staticmethod
    def _layer_param_names(layer: int, direction: int) -> List[str]:
        suffix = "_reverse" if direction == 1 else ""
        return [f"{n}_l{layer}{suffix}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")]

    def _layer_params(self, layer: int, direction: int) -> List[Optional[Tensor]]:
        return [getattr(self, name, None) for name in self._layer_param_names(layer, direction)]

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

    def _run_layers_at_once(self, rows: Tensor, batch_sizes: Optional[Tensor],
                            states: Tuple[Tensor, ...]) -> Optional[Tuple[Tensor, Tuple[Tensor, ...]]]:
        """``_run_layers`` in one C++ call (``fastrnn.ops.cpp.stack_forward``) where ``_cpp_at_once`` allows it
        and nothing runs between the layers (no dropout, no fastrnn cell), else None; None too where the call
        fails, so that the per-layer path raises its error naming the module's parameter. Decided before the
        weights are read where it can be: a parametrized weight is computed once per call either way."""
        if (self.layer_norm or self.zoneout or (self.training and (self.recurrent_dropout or
                                                                   (self.dropout and self.num_layers > 1)))):
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, *states, *self.parameters())):
            return None
        weights = [getattr(self, name) for name in self._flat_weights_names]
        if any(w is None for w in weights):
            return None
        return self._cpp_at_once(rows, (rows, *states, *weights), lambda cpp: cpp.stack_forward(
            self.mode, rows, batch_sizes, states, weights, self.num_layers, self.bidirectional, self.bias,
            bool(self.proj_size)))

    def _run_at_once(self, input, hx):
        """``_run`` in one C++ call (``fastrnn.ops.cpp.module_forward``) for a dense input where ``_cpp_at_once``
        allows it and nothing of fastrnn's own cells runs, else None (also where that call fails: the checked path
        then raises torch.nn's error). With gradients each layer is a node of csrc/rnn.cpp, as on the per-layer
        path, whose Python cost ~70 µs a call where a small layer computes a step in ~75."""
        if (not isinstance(input, Tensor) or self.layer_norm or self.zoneout
                or (self.training and self.recurrent_dropout) or _interop.torch_nn_tool() is not None):
            return None
        device_type = input.device.type  # the kernels' devices; autocast raises for some others (meta)
        if device_type not in ("cpu", "cuda") or self._autocast_dtype(device_type) is not None:
            return None
        states = _state_pair(hx, self.mode == "LSTM")
        weights = _plain_parameters(self, self._flat_weights_names)
        if states is None or weights is None:
            return None
        h, c = states
        dropout = self.dropout if self.training else 0.0
        return self._cpp_at_once(input, (input, h, c, *weights), lambda cpp: cpp.module_forward(
            self.mode, input, h, c, weights, self.num_layers, self.bidirectional, self.bias, self.proj_size,
            self.batch_first, dropout))

    def _run_layers(self, rows: Tensor, batch_sizes: Optional[Tensor], states: Tuple[Tensor, ...],
                    amp_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """Every layer and direction through the backend: ``(last layer's rows, final states)``."""
        at_once = self._run_layers_at_once(rows, batch_sizes, states) if amp_dtype is None else None
        if at_once is not None:
            return at_once
        num_dir = 2 if self.bidirectional else 1
        finals: List[List[Tensor]] = [[] for _ in states]
        for layer in range(self.num_layers):
            calls = []
            for d in range(num_dir):
                params = self._layer_params(layer, d)
                _check_params(params, self._layer_param_names(layer, d), rows)
                if amp_dtype is not None:
                    params = [None if p is None else p.to(amp_dtype) for p in params]
                k = layer * num_dir + d
                c0 = states[1][k] if self.mode == "LSTM" else None
                a = LayerArgs(self.mode, rows, batch_sizes, states[0][k], c0, *params, d == 1)
                calls.append((a, self._layer_ext(a, layer, d, amp_dtype)))
            outs = self._call_pair(*calls[0], *calls[1]) if num_dir == 2 else [self._call_layer(*calls[0])]
            for out in outs:
                for final, s in zip(finals, (out.h_n, out.c_n)):
                    final.append(s)
            rows = outs[0].y if num_dir == 1 else torch.cat([out.y for out in outs], 1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                rows = F.dropout(rows, self.dropout, True)
        return rows, tuple(torch.stack(f) for f in finals)

    def _layer_ext(self, a: LayerArgs, layer: int, direction: int, amp_dtype: Optional[torch.dtype]) -> CellExt:
        """This layer and direction's LayerNorm parameters and fresh masks."""
        ln = self._layer_norm_params(f"_l{layer}" + ("_reverse" if direction == 1 else ""))
        if amp_dtype is not None:
            ln = [None if p is None else p.to(amp_dtype) for p in ln]
        N, (B, Hout) = a.x.shape[0], a.h0.shape
        lstm = self.mode == "LSTM"
        zh = self._zoneout_mask(a.x, N, Hout)
        zc = self._zoneout_mask(a.x, N, self.hidden_size) if lstm and zh is not None else None
        return CellExt(*ln, zh, zc, self._recurrent_dropout_mask(a.x, B, Hout))

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
        out = self._run_at_once(input, hx)
        if out is not None:
            return out
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
    __doc__ = _doc("``torch.nn.LSTM`` (same constructor, including ``proj_size``)", "LSTM", cell=False)

    _modes = ("LSTM",)

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__("LSTM", *args, backend=backend, **kwargs)

    def forward(self, input, hx=None):
        return self._run(input, hx)


class GRU(_RNNBase):
    __doc__ = _doc("``torch.nn.GRU``", "GRU", cell=False)

    _modes = ("GRU",)

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, backend=backend, **kwargs)

    def forward(self, input, hx=None):
        return self._run(input, hx)


class RNN(_RNNBase):
    __doc__ = _doc("``torch.nn.RNN`` (``nonlinearity`` 'tanh' or 'relu')", "RNN", cell=False)

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
                 backend_options: Optional[Dict[str, dict]], layer_norm: bool = False, zoneout: float = 0.0,
                 recurrent_dropout: float = 0.0, **kw) -> None:
        self._init_ext(layer_norm, zoneout, recurrent_dropout)
        super().__init__(input_size, hidden_size, bias, num_chunks, **kw)
        self.backend = _backend._check_name(backend)
        self.backend_options = _check_backend_options(backend_options)
        self._dropout_mask: Optional[Tensor] = None
        if layer_norm:
            factory = {"device": self.weight_ih.device, "dtype": self.weight_ih.dtype}
            self._register_layer_norm("", num_chunks, hidden_size, num_chunks == 4, factory)

    def reset_dropout_mask(self) -> None:
        """Start a new sequence: the next training call draws a new recurrent-dropout mask. A call with
        ``hx=None`` or another batch size does this itself."""
        self._dropout_mask = None

    def _cell_ext(self, x: Tensor, new_sequence: bool) -> CellExt:
        if not (self.layer_norm or self.zoneout or self.recurrent_dropout):
            return _PLAIN_CELLS
        B, H = x.shape[0], self.hidden_size
        lstm = self._mode == "LSTM"
        zh = self._zoneout_mask(x, B, H)
        zc = self._zoneout_mask(x, B, H) if lstm and zh is not None else None
        mask = self._dropout_mask
        if new_sequence or mask is None or mask.shape[0] != B or mask.device != x.device or mask.dtype != x.dtype:
            mask = self._dropout_mask = self._recurrent_dropout_mask(x, B, H)
        return CellExt(*self._layer_norm_params(""), zh, zc, mask if self.training else None)

    def _step_at_once(self, input: Tensor, hx, n_states: int):
        """``_step`` in one C++ call (``fastrnn.ops.cpp.cell_forward``) where ``_cpp_at_once`` allows it and the
        cell is torch.nn's, else None (also where that call fails: the checked path below then raises torch.nn's
        error). The checked path's Python, ~13 µs a call, took longer than a step of an RNNCell of 64 units."""
        if (self.layer_norm or self.zoneout or self.recurrent_dropout or not isinstance(input, Tensor)
                or _interop.torch_nn_tool() is not None):
            return None
        states = _state_pair(hx, n_states == 2)
        w = _plain_parameters(self, _CELL_WEIGHTS)
        if states is None or w is None:
            return None
        h, c = states
        return self._cpp_at_once(input, (input, h, c, *w), lambda cpp: cpp.cell_forward(self._mode, input, h, c, *w))

    def _step(self, input: Tensor, hx, n_states: int):
        out = self._step_at_once(input, hx, n_states)
        if out is not None:
            return out
        tool = _interop.torch_nn_tool()
        if tool is not None:
            return _interop.run_as_torch_nn(self, tool, input, hx)
        if not isinstance(input, Tensor):
            raise TypeError(f"{self._get_name()}: input must be a Tensor, got {type(input).__name__}")
        dim = input.dim()
        if dim not in (1, 2):
            raise ValueError(f"{self._get_name()}: Expected input to be 1D or 2D, got {dim}D instead")
        x = input if dim == 2 else input.unsqueeze(0)
        w_ih, H = self.weight_ih, self.hidden_size
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"{self._get_name()}: input has inconsistent input_size: got {x.shape[1]} expected "
                               f"{self.input_size}")
        if x.dtype != w_ih.dtype:
            raise RuntimeError(f"{self._get_name()}: input dtype {x.dtype} does not match weight dtype {w_ih.dtype}")
        if x.device != w_ih.device:
            raise RuntimeError(f"{self._get_name()}: input is on {x.device} but the weights are on {w_ih.device}")
        if hx is None:
            states = tuple(x.new_zeros(x.shape[0], H) for _ in range(n_states))
        else:
            states = self._given_states(hx, n_states, x, dim == 2)
        a = LayerArgs(self._mode, x, None, states[0], states[1] if n_states == 2 else None, w_ih, self.weight_hh,
                      self.bias_ih, self.bias_hh, None, False)
        h, _, c = self._call_layer(a, self._cell_ext(x, hx is None))
        if dim == 1:
            h = h.squeeze(0)
            c = None if c is None else c.squeeze(0)
        return (h, c) if n_states == 2 else h

    def _given_states(self, hx, n_states: int, x: Tensor, is_batched: bool) -> Tuple[Tensor, ...]:
        """``hx`` checked as torch.nn's cells take it, batched like ``x``."""
        name = self._get_name()
        if n_states == 2 and not isinstance(hx, (tuple, list)):
            raise HiddenStateTypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        if n_states == 1 and not isinstance(hx, Tensor):
            raise HiddenStateTypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
        states = tuple(hx) if n_states == 2 else (hx,)
        names = ("hx[0]", "hx[1]") if n_states == 2 else ("hx",)
        for n, s in zip(names, states):
            if not isinstance(s, Tensor):
                raise HiddenStateTypeError(f"{name}: {n} must be a Tensor, got {type(s).__name__}")
            if s.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected {n} to be 1D or 2D, got {s.dim()}D instead")
        if not is_batched:
            states = tuple(s.unsqueeze(0) for s in states)
        for n, s in zip(names, states):
            _check_state(n, s, x, (x.shape[0], self.hidden_size))
        return states

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
    __doc__ = _doc("``torch.nn.LSTMCell``", "LSTM", cell=True)

    _mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto", backend_options: Optional[Dict[str, dict]] = None, layer_norm: bool = False,
                 zoneout: float = 0.0, recurrent_dropout: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, bias, 4, backend, backend_options, layer_norm, zoneout,
                         recurrent_dropout, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        return self._step(input, hx, 2)


class GRUCell(_CellBase):
    __doc__ = _doc("``torch.nn.GRUCell``", "GRU", cell=True)

    _mode = "GRU"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto", backend_options: Optional[Dict[str, dict]] = None, layer_norm: bool = False,
                 zoneout: float = 0.0, recurrent_dropout: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, bias, 3, backend, backend_options, layer_norm, zoneout,
                         recurrent_dropout, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)


class RNNCell(_CellBase):
    __doc__ = _doc("``torch.nn.RNNCell`` (``nonlinearity`` 'tanh' or 'relu')", "RNN", cell=True)

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
        layer_norm: bool = False,
        zoneout: float = 0.0,
        recurrent_dropout: float = 0.0,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, 1, backend, backend_options, layer_norm, zoneout,
                         recurrent_dropout, device=device, dtype=dtype)

    @property
    def _mode(self) -> str:  # type: ignore[override]
        return "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)
