"""The backend contract of fastrnn, declared once: every backend module and the modules use these names.

A backend module exposes ``availability(device, dtype) -> str | None`` (``None`` when it can run ``dtype``
storage on ``device``, else a one-line reason) and ``layer(args: LayerArgs, **options) -> LayerOut``: one
layer in one direction over a whole sequence, differentiable with respect to every tensor in ``args``.
``layer`` also takes the eleven fields flat, positionally or by name (``layer(mode, x, ..., reverse)``).

Shapes, with ``G`` gates (4 LSTM i,f,g,o; 3 GRU r,z,n; 1 Elman) and ``Hout = proj_size or H``:

- ``x: [N, I]``: time-major rows. Dense input has ``batch_sizes=None`` and ``N = T*B`` with
  ``B = h0.shape[0]``; packed input has ``batch_sizes: int64 CPU [T]``, non-increasing, and the rows
  of step ``t`` are ``x[off_t : off_t + batch_sizes[t]]`` with ``off_t = sum(batch_sizes[:t])``.
- ``h0: [B, Hout]``; ``c0: [B, H]`` for LSTM, else ``None``.
- ``w_ih: [G*H, I]``, ``w_hh: [G*H, Hout]``, ``b_ih, b_hh: [G*H]`` or ``None``, ``w_hr: [Hout, H]`` or
  ``None`` (LSTM projection).
- ``reverse``: process steps from ``T-1`` down to ``0`` (the backward direction of a bidirectional layer).
- ``LayerOut``: ``y: [N, Hout]`` (the row layout of ``x``), ``h_n: [B, Hout]``, ``c_n: [B, H]`` (LSTM, else
  ``None``): each sequence's state after its own last step.

A row that is inactive at a step keeps its state untouched, so packed sequences need no padding: in the
forward direction a sequence stops updating after its last step, in reverse it starts from ``h0``.

The fused backends keep the activations their backward reads in the ``Saved`` layout (``fastrnn.ops.glue``
registers them as custom ops around it).

A backend that also runs fastrnn's own cells (LayerNorm, zoneout, recurrent dropout: ``CellExt``) says so in
``EXT_FEATURES`` and takes ``layer(args, ext=CellExt(...), **options)``.
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}

# The torch.library schema of the LayerArgs fields, for the backends' custom ops.
LAYER_SCHEMA = ("str mode, Tensor x, Tensor? batch_sizes, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
                "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse")


class LayerArgs(NamedTuple):
    """The arguments of one layer in one direction (shapes in the module docstring)."""

    mode: str
    x: Tensor
    batch_sizes: Optional[Tensor]
    h0: Tensor
    c0: Optional[Tensor]
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Optional[Tensor]
    b_hh: Optional[Tensor]
    w_hr: Optional[Tensor]
    reverse: bool

    @property
    def H(self) -> int:
        return self.w_hh.shape[0] // GATES[self.mode]

    def tensors(self) -> Tuple[Optional[Tensor], ...]:
        """The differentiable inputs, in ``GRAD_NAMES`` order."""
        return self.x, self.h0, self.c0, self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr


GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


class LayerOut(NamedTuple):
    y: Tensor
    h_n: Tensor
    c_n: Optional[Tensor]


class Saved(NamedTuple):
    """What a fused forward keeps for its backward, per row of ``x``; an absent entry is an empty ``[0]``.

    - ``gates: [N, G*H]``: LSTM i, f, g, o and GRU r, z, n after their activation (csrc/cell/cell.h's layout);
      the Elman RNN saves none, its derivative is a function of ``y`` alone.
    - ``c: [N, H]``: LSTM cell after each step.
    - ``hn: [N, H]``: GRU ``W_hn h_prev + b_hn`` (the n gate's recurrent term, inside ``r * (...)``).
    - ``h: [N, Hout]``: h in the compute dtype where ``y`` was rounded to a narrower storage dtype.
    - ``hr: [N, H]``: LSTM with projection, h before ``w_hr``.

    Backends that recompute a value (the cpp backend recomputes ``hr``) leave it empty.
    """

    gates: Tensor
    c: Tensor
    hn: Tensor
    h: Tensor
    hr: Tensor

    @staticmethod
    def empty_like(a: LayerArgs, save: bool, dtype: torch.dtype, h: bool = False, hr: bool = False) -> "Saved":
        """Uninitialised buffers of this layout (also the custom ops' fake outputs)."""
        N, H, Hout = a.x.shape[0], a.H, a.h0.shape[1]
        lstm, gru = a.mode == "LSTM", a.mode == "GRU"

        def buf(present: bool, width: int) -> Tensor:
            return a.x.new_empty((N, width) if save and present else (0,), dtype=dtype)

        return Saved(buf(lstm or gru, GATES[a.mode] * H), buf(lstm, H), buf(gru, H), buf(h, Hout),
                     buf(hr and a.w_hr is not None, H))


LN_EPS = 1e-5
EXT_FEATURES = ("layer_norm", "zoneout", "recurrent_dropout")


class CellExt(NamedTuple):
    """The cells torch.nn lacks, for one layer and direction (the equations are in ``fastrnn.modules``).

    - ``ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias: [G*H]``: LayerNorm (eps ``LN_EPS``) of ``W_ih x`` and
      ``W_hh h`` over all ``G*H`` gates, before ``b_ih``/``b_hh``; ``ln_c_weight, ln_c_bias: [H]`` (LSTM): of
      ``c`` inside ``tanh``. All present or all absent.
    - ``zoneout_h: [N, Hout]``, ``zoneout_c: [N, H]`` (LSTM): per row, the weight of the previous state in the
      new one, ``h_t = z*h_{t-1} + (1-z)*cell(...)``; 0/1 draws in training, ``p`` in eval.
    - ``rec_mask: [B, Hout]``: multiplies ``h_{t-1}`` where it enters ``W_hh`` (recurrent dropout, already
      scaled by ``1/(1-p)``); the state itself is not masked.

    Masks have ``x``'s dtype and device and take no gradient.
    """

    ln_ih_weight: Optional[Tensor] = None
    ln_ih_bias: Optional[Tensor] = None
    ln_hh_weight: Optional[Tensor] = None
    ln_hh_bias: Optional[Tensor] = None
    ln_c_weight: Optional[Tensor] = None
    ln_c_bias: Optional[Tensor] = None
    zoneout_h: Optional[Tensor] = None
    zoneout_c: Optional[Tensor] = None
    rec_mask: Optional[Tensor] = None

    @property
    def layer_norm(self) -> bool:
        return self.ln_ih_weight is not None

    def features(self) -> Tuple[str, ...]:
        """The ``EXT_FEATURES`` this call uses (empty: a plain torch.nn layer)."""
        used = (self.layer_norm, self.zoneout_h is not None, self.rec_mask is not None)
        return tuple(f for f, on in zip(EXT_FEATURES, used) if on)


# The torch.library schema of the CellExt fields, for the ops of backends that run them.
EXT_SCHEMA = ", ".join(f"Tensor? {name}" for name in CellExt._fields)
# The differentiable CellExt fields (the LayerNorm parameters; masks take no gradient), first in CellExt order.
EXT_GRAD_NAMES = CellExt._fields[:6]


class SavedExt(NamedTuple):
    """What a fused forward of fastrnn's cells keeps for its backward, per row of ``x``; an absent entry is an
    empty ``[0]``. The gates, ``c`` before zoneout and the LSTM projection's input are recomputed from these.

    - ``xs: [N, G*H]``: ``x W_ih^T``, normalised (before gain and shift) with LayerNorm, else as is.
    - ``hs: [N, G*H]``: ``(h_{t-1} * rec_mask) W_hh^T`` likewise.
    - ``stats: [N, 4]``: with LayerNorm, the rstd of ``xs`` and of ``hs``, LSTM's mean and rstd of ``c``.
    - ``c: [N, H]``: LSTM cell after each step (after zoneout).
    """

    xs: Tensor
    hs: Tensor
    stats: Tensor
    c: Tensor

    @staticmethod
    def empty_like(a: LayerArgs, e: CellExt, save: bool, dtype: torch.dtype) -> "SavedExt":
        """Uninitialised buffers of this layout (also the custom ops' fake outputs)."""
        N, H, GH = a.x.shape[0], a.H, a.w_hh.shape[0]

        def buf(present: bool, width: int) -> Tensor:
            return a.x.new_empty((N, width) if save and present else (0,), dtype=dtype)

        return SavedExt(buf(True, GH), buf(True, GH), buf(e.layer_norm, 4), buf(a.mode == "LSTM", H))


def check_ext(a: LayerArgs, e: CellExt) -> None:
    """Like ``check`` for the ``CellExt`` of a checked ``a``."""
    N, H, Hout, GH = a.x.shape[0], a.H, a.h0.shape[1], a.w_hh.shape[0]
    lstm = a.mode == "LSTM"
    ln = {"ln_ih_weight": GH, "ln_ih_bias": GH, "ln_hh_weight": GH, "ln_hh_bias": GH}
    if lstm:
        ln.update(ln_c_weight=H, ln_c_bias=H)
    present = [getattr(e, n) is not None for n in ln]
    if any(present) and not all(present):
        _fail(f"LayerNorm needs all of {', '.join(ln)} or none, got {[n for n, p in zip(ln, present) if p]}")
    if not lstm:
        for n in ("ln_c_weight", "ln_c_bias", "zoneout_c"):
            if getattr(e, n) is not None:
                _fail(f"{n} is only for LSTM, got it for mode {a.mode}")
    shapes = dict(ln if all(present) else {}, zoneout_h=(N, Hout), rec_mask=(a.h0.shape[0], Hout))
    if lstm:
        shapes["zoneout_c"] = (N, H)
    if lstm and (e.zoneout_h is None) != (e.zoneout_c is None):
        _fail("LSTM zoneout needs both zoneout_h and zoneout_c")
    for name, shape in shapes.items():
        t = getattr(e, name)
        if t is not None:
            _check_like(t, name, a.x, shape if isinstance(shape, tuple) else (shape,))


def parse_layer_args(args: tuple, kwargs: dict) -> Tuple[LayerArgs, dict]:
    """``(LayerArgs, backend options)`` from ``layer(args)`` or the fields flat, positional or by name."""
    if len(args) == 1 and isinstance(args[0], LayerArgs):
        return args[0], kwargs
    fields = {k: kwargs.pop(k) for k in LayerArgs._fields if k in kwargs}
    return LayerArgs(*args, **fields), kwargs


def _fail(message: str) -> None:
    raise RuntimeError(f"fastrnn: {message}")


def _check_like(t: Tensor, name: str, x: Tensor, shape: Tuple[int, ...]) -> None:
    if t.device != x.device:
        _fail(f"{name} must be on {x.device} like x, got {t.device}")
    if t.dtype != x.dtype:
        _fail(f"{name} must have dtype {x.dtype} like x, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _check_batch_sizes(bs: Tensor, B: int, N: int) -> None:
    if bs.dim() != 1 or bs.dtype != torch.int64 or bs.device.type != "cpu":
        _fail(f"batch_sizes must be a 1-D int64 CPU tensor, got {bs.dtype} on {bs.device} with shape "
              f"{list(bs.shape)}")
    if torch.compiler.is_compiling():
        return  # a fake tensor while tracing has no values; the eager call checked them
    sizes = bs.tolist()
    for t, b in enumerate(sizes):
        if not (1 <= b <= B and (t == 0 or b <= sizes[t - 1])):
            _fail(f"batch_sizes must be non-increasing and within [1, B = {B}], got batch_sizes[{t}] = {b}")
    if sum(sizes) != N:
        _fail(f"batch_sizes sum to {sum(sizes)} but x has {N} rows")


def check(a: LayerArgs) -> None:
    """Raise a RuntimeError naming the argument, expected and actual, for input that breaks the contract."""
    if a.mode not in MODES:
        _fail(f"mode must be one of {', '.join(MODES)}, got {a.mode!r}")
    x, G = a.x, GATES[a.mode]
    if x.dim() != 2:
        _fail(f"x must be 2-D [N, I], got shape {list(x.shape)}")
    if not x.is_floating_point():
        _fail(f"x must be a floating-point tensor, got {x.dtype}")
    if a.h0.dim() != 2:
        _fail(f"h0 must be 2-D [B, Hout], got shape {list(a.h0.shape)}")
    if a.w_hh.dim() != 2 or a.w_hh.shape[0] == 0 or a.w_hh.shape[0] % G:
        _fail(f"w_hh must be 2-D [{G}*H, Hout] for mode {a.mode}, got shape {list(a.w_hh.shape)}")
    (N, I), B, H = x.shape, a.h0.shape[0], a.H
    Hout = H
    if a.w_hr is not None:
        if a.mode != "LSTM":
            _fail("w_hr (proj_size) is only supported for LSTM")
        if a.w_hr.dim() != 2 or a.w_hr.shape[1] != H:
            _fail(f"w_hr must have shape [Hout, H] with H = {H}, got {list(a.w_hr.shape)}")
        Hout = a.w_hr.shape[0]
        _check_like(a.w_hr, "w_hr", x, (Hout, H))
    _check_like(a.w_hh, "w_hh", x, (G * H, Hout))
    _check_like(a.w_ih, "w_ih", x, (G * H, I))
    _check_like(a.h0, "h0", x, (B, Hout))
    if a.mode == "LSTM":
        if a.c0 is None:
            _fail("c0 is required for LSTM")
        _check_like(a.c0, "c0", x, (B, H))
    elif a.c0 is not None:
        _fail("c0 must be None for GRU/RNN")
    for name, b in (("b_ih", a.b_ih), ("b_hh", a.b_hh)):
        if b is not None:
            _check_like(b, name, x, (G * H,))
    if a.batch_sizes is not None:
        _check_batch_sizes(a.batch_sizes, B, N)
    elif (N % B if B else N) != 0:
        _fail(f"dense x must have T*B rows with B = h0.shape[0] = {B}, got {N} rows")
