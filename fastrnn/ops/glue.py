"""Autograd glue shared by the fused backends: one layer as a pair of ``torch.library`` custom ops.

A backend supplies a forward and a backward over ``LayerArgs`` plus its options; :class:`LayerOp`
registers ``fastrnn::<name>_fwd`` and ``fastrnn::<name>_bwd`` with fake implementations, so
``torch.compile``/``torch.export`` trace a layer as two opaque ops, and one autograd formula:

- the ``Saved`` activations go through ``ctx.save_for_backward``, so ``saved_tensors_hooks``
  (offloading, checkpointing) see every tensor backward reads;
- they are outputs marked non-differentiable, with gradient materialisation off: autograd allocates no
  zero gradients for them, and a missing ``dy``/``dh_n``/``dc_n`` is filled here only when needed;
- nothing is saved, or even written, when no gradient is wanted (``save=False``);
- a call that nothing traces or records (no compiler, tracer, dispatch or function mode, profiler; plain
  tensors) skips the ops' dispatch: without gradients it runs the op's implementation directly, with them a
  ``torch.autograd.Function`` over the same implementations and the same formula (``_Ops.forward``,
  ``_Ops.backward``); the modules skip even that on the cpp backend for torch.nn's cells (``unwatched``): C++
  autograd nodes (csrc/rnn.cpp ``LayerNode``, ``PairNode``) whose backward hands their saved tensors back to
  this formula (``_grad``) where it must decide;
- the contract is checked once per call, in Python, before the forward op (backward reuses checked input);
- autocast is off inside the ops: they compute in their inputs' dtype.

Where the ops cannot serve, a layer runs on the reference backend's differentiable ops instead (they are
the contract's ground truth, so results agree to rounding):

- under a torch.func transform (``vmap``, ``grad``, ``jacrev``, ``jvp``, ...) or forward-mode AD: custom ops
  have no batching rule and their autograd formula is not a functorch one;
- in a backward with ``create_graph=True`` (double backward, gradient penalties): the gradients are those of
  the layer recomputed on the saved inputs, so they carry a graph; the fused backward has none.

A backend that runs fastrnn's cells (``CellExt``) adds an :class:`ExtImpl`: a second pair of ops whose inputs
include the ``CellExt`` fields and whose backward also returns the LayerNorm parameters' gradients.

A backend that can run both directions of a bidirectional layer in one call (the cpp backend: one persistent
launch where the device has the SMs for both) adds a :class:`PairImpl`: ops ``fastrnn::<name>_pair_fwd``/``_bwd``
whose inputs are the forward direction's ``LayerArgs`` and the reverse direction's own tensors
(``REVERSE_SCHEMA``), with the same autograd formula per direction and the two directions' ``dx`` summed.
"""

import contextlib
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastrnn.ops import (EXT_GRAD_NAMES, EXT_SCHEMA, GRAD_NAMES, LAYER_SCHEMA, CellExt, LayerArgs, LayerOut, Saved,
                         SavedExt, check, check_ext, parse_layer_args, reference)

N_ARGS = len(LayerArgs._fields)
# where each differentiable input (GRAD_NAMES order) sits among the forward op's inputs
_GRAD_POSITIONS = tuple(LayerArgs._fields.index(name) for name in GRAD_NAMES)
Grads = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
# forward(args, options, save) -> (y, h_n, c_n as an empty [0] unless LSTM, Saved)
Forward = Callable[[LayerArgs, tuple, bool], Tuple[Tensor, Tensor, Tensor, Saved]]
# backward(args, options, y, saved, dy, dh_n, dc_n, need_dx) -> gradients in GRAD_NAMES order, an empty [0]
# for an absent input (and for x unless need_dx): custom-op outputs may be neither None nor aliases
Backward = Callable[[LayerArgs, tuple, Tensor, Saved, Tensor, Tensor, Optional[Tensor], bool], Grads]
# fake_saved(args, options, save) -> Saved of the shapes and dtypes forward returns
FakeSaved = Callable[[LayerArgs, tuple, bool], Saved]


# The reverse direction's own fields in a pair (LayerArgs order); it shares mode, x and batch_sizes.
REVERSE_FIELDS = LayerArgs._fields[3:10]
REVERSE_SCHEMA = ("Tensor h0_r, Tensor? c0_r, Tensor w_ih_r, Tensor w_hh_r, Tensor? b_ih_r, Tensor? b_hh_r, "
                  "Tensor? w_hr_r")
N_REVERSE = len(REVERSE_FIELDS)


class PairImpl(NamedTuple):
    """A backend's two directions of a bidirectional layer in one call: ``forward(a, r, options, save)`` returns
    ``LayerOp``'s forward results for ``a`` (the forward direction) and then for ``r`` (the reverse one), eight
    values; ``backward(a, r, options, y, saved, y_r, saved_r, dy, dh_n, dc_n, dy_r, dh_n_r, dc_n_r, need_dx)``
    the ``GRAD_NAMES`` gradients of ``a`` and then of ``r`` (each direction's own dx), sixteen."""

    forward: Callable
    backward: Callable


class ExtImpl(NamedTuple):
    """A backend's fastrnn cells (``CellExt``): the callbacks of ``LayerOp`` with the ``CellExt`` after the
    ``LayerArgs`` (``forward(args, ext, options, save)`` and so on) and ``SavedExt`` for ``Saved``; backward
    returns the ``GRAD_NAMES`` gradients and then those of ``EXT_GRAD_NAMES``, an empty [0] where absent."""

    forward: Callable
    backward: Callable
    fake_saved: Callable


def _empty_or_like(a: LayerArgs, t: Optional[Tensor]) -> Tensor:
    return a.x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


class _Ops:
    """What ``_OpPair`` and ``_PairOps`` share: how a call reaches their implementations. The ops' dispatch
    serves a compiler, a tracer or a mode that watches the call; without one it only costs: in eager mode
    ``torch.library``'s Python autograd wrapper took ~170 µs a layer call (Zen 4: a one-layer RNN of 8 units,
    one step, forward 224 µs against torch.nn's 37), and a call without gradients 30-40 µs a layer (a two-layer
    GRU at H = 512, one step: 536 against 619 µs). So an unwatched call runs the implementations directly,
    through ``_eager`` (a ``torch.autograd.Function`` with the ops' own ``_setup_context`` and ``_grad``) where
    it saves for a backward."""

    fwd: Callable
    bwd: Callable
    _eager: type

    def forward(self, inputs: tuple, save: bool) -> tuple:
        """The forward on the op's ``inputs`` (``save``: its last one)."""
        if not _untraced(inputs):
            return self.fwd(*inputs)
        return self._eager.apply(*inputs) if save else self._fwd_impl(*inputs)

    def backward(self, *inputs) -> tuple:
        """The backward op on ``inputs``, without gradients of its own (``_grad``'s first-order branch). Batched
        gradients (``autograd.grad(..., is_grads_batched=True)``, ``torch.func.vmap`` over a backward) have no
        storage for the implementation: the op's dispatch runs them sample by sample."""
        direct = _untraced(inputs) and not any(_batched(t) for t in inputs if isinstance(t, Tensor))
        return self._bwd_impl(*inputs) if direct else self.bwd(*inputs)


class _OpPair(_Ops):
    """A forward and a backward custom op with the shared autograd formula. ``ext``: the ``CellExt`` fields are
    inputs after the ``LayerArgs`` ones, the callbacks take the ``CellExt`` after the ``LayerArgs`` and the
    LayerNorm parameters get gradients."""

    def __init__(self, name: str, opts_schema: str, n_opts: int, forward, backward, fake_saved, saved: type,
                 ext: bool) -> None:
        self.ext, self.saved = ext, saved
        self._n_ext = len(CellExt._fields) if ext else 0
        self._n_in = N_ARGS + self._n_ext + n_opts
        self._forward, self._backward, self._fake_saved = forward, backward, fake_saved
        ins = LAYER_SCHEMA + (f", {EXT_SCHEMA}" if ext else "") + opts_schema
        n_grads = 8 + (len(EXT_GRAD_NAMES) if ext else 0)
        saved_schema = ", ".join(f"Tensor {n}" for n in saved._fields)
        _register(self, name, f"({ins}, bool save) -> (Tensor, Tensor, Tensor, "
                              f"{', '.join('Tensor' for _ in saved._fields)})",
                  f"({ins}, Tensor y, {saved_schema}, Tensor dy, Tensor dh_n, Tensor? dc_n, bool need_dx) -> "
                  f"({', '.join('Tensor' for _ in range(n_grads))})")

    def _split(self, inputs: tuple) -> Tuple[tuple, tuple, tuple]:
        """``(head, options, rest)``: head is ``(LayerArgs,)``, with ext ``(LayerArgs, CellExt)``."""
        a = LayerArgs(*inputs[:N_ARGS])
        head = (a, CellExt(*inputs[N_ARGS:N_ARGS + self._n_ext])) if self.ext else (a,)
        return head, tuple(inputs[N_ARGS + self._n_ext:self._n_in]), tuple(inputs[self._n_in:])

    def _fwd_impl(self, *inputs):
        head, opts, (save,) = self._split(inputs)
        # a backend's torch ops (GEMMs beside the kernels) compute in the inputs' dtype, as the kernels do:
        # the caller casts for autocast (the modules do, as torch.nn)
        with _on_device_of(head[0].x):
            y, h_n, c_n, saved = self._forward(*head, opts, save)
        return (y, h_n, c_n, *saved)

    def _fwd_fake(self, *inputs):
        head, opts, (save,) = self._split(inputs)
        return _fake_outputs(head[0], self._fake_saved(*head, opts, save))

    def _bwd_impl(self, *inputs):
        head, opts, rest = self._split(inputs)
        n = len(self.saved._fields)
        y, saved, (dy, dh_n, dc_n, need_dx) = rest[0], self.saved(*rest[1:1 + n]), rest[1 + n:]
        with _on_device_of(head[0].x):
            return tuple(self._backward(*head, opts, y, saved, dy, dh_n, dc_n, need_dx))

    def _bwd_fake(self, *inputs):
        head, _, rest = self._split(inputs)
        a, need_dx = head[0], rest[-1]
        ext = head[1][:len(EXT_GRAD_NAMES)] if self.ext else ()
        return tuple(_empty_or_like(a, t) for t in (a.x if need_dx else None,) + a.tensors()[1:] + tuple(ext))

    def _setup_context(self, ctx, inputs, output) -> None:
        head, opts, _ = self._split(inputs)
        a = head[0]
        y, _h_n, _c_n, *saved = output
        ctx.mode, ctx.reverse, ctx.opts = a.mode, a.reverse, opts
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a.x, a.batch_sizes, *a.tensors()[1:], *(head[1] if self.ext else ()), y, *saved)

    def _grad(self, ctx, dy, dh_n, dc_n, *_saved_grads):
        x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *rest = ctx.saved_tensors
        a = LayerArgs(ctx.mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ctx.reverse)
        e = tuple(rest[:self._n_ext])
        y, saved = rest[self._n_ext], rest[self._n_ext + 1:]
        dy, dh_n, dc_n = _filled(a, y, dy, dh_n, dc_n)
        if torch.is_grad_enabled():
            needed = [ctx.needs_input_grad[i] for i in _GRAD_POSITIONS]
            needed += [ctx.needs_input_grad[N_ARGS + i] for i in range(len(EXT_GRAD_NAMES))] if self.ext else []
            present = _differentiable_grads(a, CellExt(*e) if self.ext else None, needed, (dy, dh_n, dc_n))
        else:
            need_dx = ctx.needs_input_grad[1]
            grads = self.backward(*a, *e, *ctx.opts, y, *saved, dy, dh_n, dc_n, need_dx)
            present = [g if t is not None else None for g, t in zip(grads, a.tensors() + e[:len(EXT_GRAD_NAMES)])]
            if not need_dx:
                present[0] = None
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = present[:8]
        ext_grads = tuple(present[8:]) + (None,) * (self._n_ext - len(EXT_GRAD_NAMES)) if self.ext else ()
        return ((None, dx, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, None) + ext_grads
                + (None,) * (len(ctx.opts) + 1))


class _PairOps(_Ops):
    """Both directions of a bidirectional layer as a forward and a backward custom op (see the module docstring):
    ``_OpPair``'s autograd formula for each direction, their ``dx`` summed. Plain cells only."""

    def __init__(self, name: str, opts_schema: str, n_opts: int, impl: PairImpl, fake_saved) -> None:
        self._impl, self._fake_saved = impl, fake_saved
        self._n_in = N_ARGS + N_REVERSE + n_opts
        ins = f"{LAYER_SCHEMA}, {REVERSE_SCHEMA}{opts_schema}"
        n_out = 2 * (3 + len(Saved._fields))
        saved = ", ".join(f"Tensor {n}" for n in Saved._fields)
        saved_r = ", ".join(f"Tensor {n}_r" for n in Saved._fields)
        _register(self, f"{name}_pair", f"({ins}, bool save) -> ({', '.join(['Tensor'] * n_out)})",
                  f"({ins}, Tensor y, {saved}, Tensor y_r, {saved_r}, Tensor dy, Tensor dh_n, Tensor? dc_n, "
                  f"Tensor dy_r, Tensor dh_n_r, Tensor? dc_n_r, bool need_dx) -> ({', '.join(['Tensor'] * 16)})")

    def _split(self, inputs: tuple) -> Tuple[LayerArgs, LayerArgs, tuple, tuple]:
        """``(a, r, options, rest)``: the forward and the reverse direction's ``LayerArgs``."""
        a = LayerArgs(*inputs[:N_ARGS])
        return (a, reverse_of(a, inputs[N_ARGS:N_ARGS + N_REVERSE]), tuple(inputs[N_ARGS + N_REVERSE:self._n_in]),
                tuple(inputs[self._n_in:]))

    def _fwd_impl(self, *inputs):
        a, r, opts, (save,) = self._split(inputs)
        with _on_device_of(a.x):
            y, h_n, c_n, saved, y_r, h_n_r, c_n_r, saved_r = self._impl.forward(a, r, opts, save)
        return (y, h_n, c_n, *saved, y_r, h_n_r, c_n_r, *saved_r)

    def _fwd_fake(self, *inputs):
        a, r, opts, (save,) = self._split(inputs)
        return _fake_outputs(a, self._fake_saved(a, opts, save)) + _fake_outputs(r, self._fake_saved(r, opts, save))

    def _bwd_impl(self, *inputs):
        a, r, opts, rest = self._split(inputs)
        n = len(Saved._fields)
        y, saved, y_r, saved_r = rest[0], Saved(*rest[1:1 + n]), rest[1 + n], Saved(*rest[2 + n:2 + 2 * n])
        with _on_device_of(a.x):
            return tuple(self._impl.backward(a, r, opts, y, saved, y_r, saved_r, *rest[2 + 2 * n:]))

    def _bwd_fake(self, *inputs):
        a, r, _, rest = self._split(inputs)
        dx = a.x if rest[-1] else None
        return tuple(_empty_or_like(a, t) for d in (a, r) for t in (dx,) + d.tensors()[1:])

    def _setup_context(self, ctx, inputs, output) -> None:
        a, r, opts, _ = self._split(inputs)
        n = 3 + len(Saved._fields)
        ctx.mode, ctx.opts = a.mode, opts
        ctx.mark_non_differentiable(*output[3:n], *output[n + 3:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a.x, a.batch_sizes, *a.tensors()[1:], *r.tensors()[1:], output[0], *output[3:n],
                              output[n], *output[n + 3:])

    def _grad(self, ctx, *grads):
        n, k = 3 + len(Saved._fields), len(Saved._fields)
        x, batch_sizes, *t = ctx.saved_tensors
        a = LayerArgs(ctx.mode, x, batch_sizes, *t[:N_REVERSE], False)
        r = reverse_of(a, t[N_REVERSE:2 * N_REVERSE])
        y, saved = t[2 * N_REVERSE], t[2 * N_REVERSE + 1:2 * N_REVERSE + 1 + k]
        y_r, saved_r = t[2 * N_REVERSE + 1 + k], t[2 * N_REVERSE + 2 + k:]
        outs = _filled(a, y, *grads[:3]) + _filled(r, y_r, *grads[n:n + 3])
        need_dx = ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            needed = [ctx.needs_input_grad[i] for i in _GRAD_POSITIONS]
            needed_r = [need_dx] + [ctx.needs_input_grad[N_ARGS + i] for i in range(N_REVERSE)]
            g, g_r = _differentiable_grads(a, None, needed, outs[:3]), _differentiable_grads(r, None, needed_r, outs[3:])
        else:
            both = self.backward(*a, *r.tensors()[1:], *ctx.opts, y, *saved, y_r, *saved_r, *outs, need_dx)
            g = [gr if tt is not None else None for gr, tt in zip(both[:8], a.tensors())]
            g_r = [gr if tt is not None else None for gr, tt in zip(both[8:], r.tensors())]
        dx = g[0] + g_r[0] if need_dx else None
        return (None, dx, None, *g[1:], None, *g_r[1:]) + (None,) * (len(ctx.opts) + 1)


def _register(owner, name: str, fwd_schema: str, bwd_schema: str) -> None:
    """``owner.fwd``, ``owner.bwd``: custom ops ``fastrnn::<name>_fwd``/``_bwd`` of its implementations, with its
    fakes and its autograd formula; ``owner._eager``: that formula over the implementations, for ``_Ops``."""
    owner.fwd = torch.library.custom_op(f"fastrnn::{name}_fwd", owner._fwd_impl, mutates_args=(), schema=fwd_schema)
    owner.bwd = torch.library.custom_op(f"fastrnn::{name}_bwd", owner._bwd_impl, mutates_args=(), schema=bwd_schema)
    owner.fwd.register_fake(owner._fwd_fake)
    owner.bwd.register_fake(owner._bwd_fake)
    owner.fwd.register_autograd(owner._grad, setup_context=owner._setup_context)
    owner._eager = type(f"{name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(lambda ctx, *inputs: _eager_forward(owner, ctx, inputs)),
        "backward": staticmethod(owner._grad)})


def _eager_forward(owner: _Ops, ctx, inputs: tuple) -> tuple:
    """The forward of ``owner._eager``: the implementation, then the op's autograd context on its outputs."""
    output = owner._fwd_impl(*inputs)
    owner._setup_context(ctx, inputs, output)
    return output


def _on_device_of(x: Tensor):
    """Autocast off for ``x``'s device where it is on (entering torch.autocast costs ~3 µs a call even where
    there is nothing to turn off), and on CUDA ``x``'s device the current one where it is not (Triton launches,
    CUDA graphs and side streams go to the current device, not to their tensors')."""
    device = x.device
    autocast = torch.is_autocast_enabled(device.type)
    elsewhere = device.type == "cuda" and device.index != torch.cuda.current_device()
    if not (autocast or elsewhere):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if autocast:
        stack.enter_context(torch.autocast(device.type, enabled=False))
    if elsewhere:
        stack.enter_context(torch.cuda.device(device))
    return stack


def reverse_of(a: LayerArgs, fields: Sequence[Optional[Tensor]]) -> LayerArgs:
    """The reverse direction of a pair: ``a``'s mode, x and batch_sizes with its own ``REVERSE_FIELDS``."""
    return a._replace(**dict(zip(REVERSE_FIELDS, fields)), reverse=True)


def _fake_outputs(a: LayerArgs, saved: Saved) -> tuple:
    """A forward op's outputs for ``a`` as fake tensors: y, h_n, c_n (an empty [0] unless LSTM), the Saved."""
    x, (B, Hout) = a.x, a.h0.shape
    c_n = x.new_empty(B, a.H) if a.mode == "LSTM" else x.new_empty(0)
    return (x.new_empty(x.shape[0], Hout), x.new_empty(B, Hout), c_n, *saved)


class LayerOp:
    """A backend's layer as custom ops with the shared autograd formula; call it as the contract's ``layer``.

    ``backend`` names it in errors, ``name`` its ops (``fastrnn::<name>_fwd``/``_bwd``, attributes ``fwd`` and
    ``bwd``). ``options``: ``(name, schema type, default)`` of the backend's options, passed to ``layer`` by
    keyword and to ``forward``/``backward`` as a tuple in this order, after ``resolve_options(args, options,
    cells)`` has checked them and filled in input-dependent defaults (``cells``: the call runs fastrnn's cells). ``ext``: the backend also runs fastrnn's cells,
    as a second pair of ops ``fastrnn::<name>_ext_fwd``/``_ext_bwd`` (attributes ``ext_fwd``, ``ext_bwd``) that
    ``layer(args, ext=CellExt(...))`` calls when the ``CellExt`` uses any feature.
    """

    def __init__(self, backend: str, name: str, availability: Callable[[torch.device, torch.dtype], Optional[str]],
                 forward: Forward, backward: Backward, fake_saved: FakeSaved,
                 options: Sequence[Tuple[str, str, object]] = (),
                 resolve_options: Optional[Callable[[LayerArgs, tuple, bool], tuple]] = None,
                 ext: Optional[ExtImpl] = None, pair: Optional[PairImpl] = None) -> None:
        self.backend, self.availability = backend, availability
        self.options, self._resolve_options = tuple(options), resolve_options
        opts = "".join(f", {kind} {opt}" for opt, kind, _ in self.options)
        self._plain = _OpPair(name, opts, len(self.options), forward, backward, fake_saved, Saved, False)
        self.fwd, self.bwd = self._plain.fwd, self._plain.bwd
        self._cells = self._pair = self.ext_fwd = self.ext_bwd = self.pair_fwd = self.pair_bwd = None
        if ext is not None:
            self._cells = _OpPair(f"{name}_ext", opts, len(self.options), *ext, SavedExt, True)
            self.ext_fwd, self.ext_bwd = self._cells.fwd, self._cells.bwd
        if pair is not None:
            self._pair = _PairOps(name, opts, len(self.options), pair, fake_saved)
            self.pair_fwd, self.pair_bwd = self._pair.fwd, self._pair.bwd

    def __call__(self, *args, ext: Optional[CellExt] = None, **kwargs) -> LayerOut:
        """The contract's ``layer(args, **options)`` (or the fields flat), with fastrnn's cells through ``ext``:
        checked once, then the forward op."""
        a, kwargs = parse_layer_args(args, kwargs)
        cells = ext is not None and bool(ext.features())
        if cells and self._cells is None:
            raise RuntimeError(f"fastrnn {self.backend} backend does not run {', '.join(ext.features())}")
        opts = self._checked(a, kwargs, ext if cells else None)
        if _transformed():
            return reference.layer(a, ext=ext if cells else None)
        differentiable = a.tensors() + (tuple(ext)[:len(EXT_GRAD_NAMES)] if cells else ())
        save = saving(differentiable)
        inputs = (*a, *ext, *opts, save) if cells else (*a, *opts, save)
        y, h_n, c_n = (self._cells if cells else self._plain).forward(inputs, save)[:3]
        return LayerOut(y, h_n, c_n if a.mode == "LSTM" else None)

    def pair(self, a: LayerArgs, r: LayerArgs, **kwargs) -> Tuple[LayerOut, LayerOut]:
        """Both directions of a bidirectional layer of plain cells: ``(layer(a), layer(r))`` with ``a`` the forward
        direction and ``r`` the reverse one (the same mode, x and batch_sizes), in one call of the pair ops where
        the backend has them."""
        if a.reverse or not r.reverse:
            raise ValueError(f"a pair is a forward direction (reverse=False) and a reverse one (reverse=True), got "
                             f"reverse={a.reverse} and reverse={r.reverse}")
        if r.mode != a.mode or r.x is not a.x or r.batch_sizes is not a.batch_sizes:
            raise ValueError("the two directions of a pair take the same mode, x and batch_sizes")
        # a direction that takes no gradient (x does not, and its own tensors are frozen) runs on its own: in the
        # pair its activations would be saved and its backward computed for nothing
        if self._pair is None or saving(a.tensors()) != saving(r.tensors()):
            return self(a, **kwargs), self(r, **kwargs)
        opts = self._checked(a, dict(kwargs), None)
        check(r)
        if (r.H, r.h0.shape, r.w_hr is None) != (a.H, a.h0.shape, a.w_hr is None):
            raise RuntimeError(f"fastrnn: the reverse direction must have the forward one's sizes: H {a.H}, h0 "
                               f"{list(a.h0.shape)}, w_hr {'absent' if a.w_hr is None else 'present'}; got H {r.H}, "
                               f"h0 {list(r.h0.shape)}, w_hr {'absent' if r.w_hr is None else 'present'}")
        if _transformed():
            return reference.layer(a), reference.layer(r)
        save = saving(a.tensors())
        out = self._pair.forward((*a, *r.tensors()[1:], *opts, save), save)
        n = 3 + len(Saved._fields)
        lstm = a.mode == "LSTM"
        return (LayerOut(out[0], out[1], out[2] if lstm else None),
                LayerOut(out[n], out[n + 1], out[n + 2] if lstm else None))

    def _checked(self, a: LayerArgs, kwargs: dict, ext: Optional[CellExt]) -> tuple:
        """The options of a call on ``a`` (with fastrnn's cells ``ext``) after the contract's checks and the
        backend's availability."""
        unknown = set(kwargs) - {opt for opt, _, _ in self.options}
        if unknown:
            raise TypeError(f"unexpected backend option(s) {sorted(unknown)}; this backend takes "
                            f"{[opt for opt, _, _ in self.options]}")
        check(a)
        if ext is not None:
            check_ext(a, ext)
        reason = self.availability(a.x.device, a.x.dtype)
        if reason is not None:
            raise RuntimeError(f"fastrnn {self.backend} backend unavailable: {reason}")
        opts = tuple(kwargs.get(opt, default) for opt, _, default in self.options)
        return self._resolve_options(a, opts, ext is not None) if self._resolve_options is not None else opts


# What a direct call's inputs may be: plain tensors (a subclass, FakeTensor, FunctionalTensor, DTensor, ..., has
# its own dispatch) and the Python scalars of modes and options.
_DIRECT_TYPES = frozenset({Tensor, torch.nn.Parameter, type(None), bool, int, float, str})


def _untraced(inputs: tuple) -> bool:
    """Whether no compiler, tracer, mode or profiler watches the ops of this call, and its tensors are plain."""
    watched = (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._is_torch_function_mode_enabled()
               or _get_current_dispatch_mode() is not None or torch._C._autograd._profiler_enabled())
    return not watched and _DIRECT_TYPES.issuperset(map(type, inputs))


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is a vmap's batched view (functorch's, or the older one behind ``is_grads_batched``): a plain
    ``Tensor`` by type, without storage."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


def unwatched(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether a call on ``tensors`` may skip the ops altogether (the cpp backend's C++ entry points,
    ``fastrnn.ops.cpp.layer_forward``, ``pair_forward`` and ``stack_forward``): no torch.func transform or
    forward-mode AD, and nothing tracing or watching the call (``_untraced``)."""
    return not _transformed() and _untraced(tuple(tensors))


def saving(differentiable: Sequence[Optional[Tensor]]) -> bool:
    """Whether the forward keeps activations for a backward: inference skips them (less memory and traffic)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)


def _filled(a: LayerArgs, y: Tensor, dy: Optional[Tensor], dh_n: Optional[Tensor], dc_n: Optional[Tensor]) -> tuple:
    """The gradients of a layer's outputs with zeros where autograd has none (``dc_n`` stays ``None`` unless
    LSTM)."""
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(a.h0) if dh_n is None else dh_n
    if a.c0 is None:
        return dy, dh_n, None
    return dy, dh_n, torch.zeros_like(a.c0) if dc_n is None else dc_n


def _transformed() -> bool:
    """Whether a torch.func transform or forward-mode AD is active (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False  # torch.compile and torch.export trace the custom ops (dynamo folds this branch)
    return torch._C._functorch.peek_interpreter_stack() is not None or torch.autograd.forward_ad._current_level >= 0


def _differentiable_grads(a: LayerArgs, e: Optional[CellExt], needed: Sequence[bool], grad_outputs: tuple) -> list:
    """Gradients w.r.t. ``a.tensors()`` and the LayerNorm parameters of ``e`` (``None`` where not needed) of the
    layer recomputed on the reference backend, with their graph (``create_graph=True``)."""
    inputs = a.tensors() + (tuple(e)[:len(EXT_GRAD_NAMES)] if e is not None else ())
    wanted = [t for t, need in zip(inputs, needed) if need and t is not None]
    if not wanted:  # a C++ node asks per backward: this one may want nothing of one direction of a pair
        return [None] * len(inputs)
    out = reference.layer(a, ext=e)
    pairs = [(o, g) for o, g in zip(out, grad_outputs) if o is not None]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True, materialize_grads=True))
    return [next(grads) if need and t is not None else None for t, need in zip(inputs, needed)]
