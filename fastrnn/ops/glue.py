"""Autograd glue shared by the fused backends: one layer as a pair of ``torch.library`` custom ops.

A backend supplies a forward and a backward over ``LayerArgs`` plus its options; :class:`LayerOp`
registers ``fastrnn::<name>_fwd`` and ``fastrnn::<name>_bwd`` with fake implementations, so
``torch.compile``/``torch.export`` trace a layer as two opaque ops, and one autograd formula:

- the ``Saved`` activations go through ``ctx.save_for_backward``, so ``saved_tensors_hooks``
  (offloading, checkpointing) see every tensor backward reads;
- they are outputs marked non-differentiable, with gradient materialisation off: autograd allocates no
  zero gradients for them, and a missing ``dy``/``dh_n``/``dc_n`` is filled here only when needed;
- nothing is saved, or even written, when no gradient is wanted (``save=False``);
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
"""

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

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


class ExtImpl(NamedTuple):
    """A backend's fastrnn cells (``CellExt``): the callbacks of ``LayerOp`` with the ``CellExt`` after the
    ``LayerArgs`` (``forward(args, ext, options, save)`` and so on) and ``SavedExt`` for ``Saved``; backward
    returns the ``GRAD_NAMES`` gradients and then those of ``EXT_GRAD_NAMES``, an empty [0] where absent."""

    forward: Callable
    backward: Callable
    fake_saved: Callable


def _empty_or_like(a: LayerArgs, t: Optional[Tensor]) -> Tensor:
    return a.x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


class _OpPair:
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
        self.fwd = torch.library.custom_op(
            f"fastrnn::{name}_fwd", self._fwd_impl, mutates_args=(),
            schema=f"({ins}, bool save) -> (Tensor, Tensor, Tensor, {', '.join('Tensor' for _ in saved._fields)})",
        )
        self.bwd = torch.library.custom_op(
            f"fastrnn::{name}_bwd", self._bwd_impl, mutates_args=(),
            schema=f"({ins}, Tensor y, {saved_schema}, Tensor dy, Tensor dh_n, Tensor? dc_n, bool need_dx) -> "
                   f"({', '.join('Tensor' for _ in range(n_grads))})",
        )
        self.fwd.register_fake(self._fwd_fake)
        self.bwd.register_fake(self._bwd_fake)
        self.fwd.register_autograd(self._grad, setup_context=self._setup_context)

    def _split(self, inputs: tuple) -> Tuple[tuple, tuple, tuple]:
        """``(head, options, rest)``: head is ``(LayerArgs,)``, with ext ``(LayerArgs, CellExt)``."""
        a = LayerArgs(*inputs[:N_ARGS])
        head = (a, CellExt(*inputs[N_ARGS:N_ARGS + self._n_ext])) if self.ext else (a,)
        return head, tuple(inputs[N_ARGS + self._n_ext:self._n_in]), tuple(inputs[self._n_in:])

    def _fwd_impl(self, *inputs):
        head, opts, (save,) = self._split(inputs)
        # a backend's torch ops (GEMMs beside the kernels) compute in the inputs' dtype, as the kernels do:
        # the caller casts for autocast (the modules do, as torch.nn)
        with torch.autocast(head[0].x.device.type, enabled=False):
            y, h_n, c_n, saved = self._forward(*head, opts, save)
        return (y, h_n, c_n, *saved)

    def _fwd_fake(self, *inputs):
        head, opts, (save,) = self._split(inputs)
        a = head[0]
        x, (B, Hout) = a.x, a.h0.shape
        c_n = x.new_empty(B, a.H) if a.mode == "LSTM" else x.new_empty(0)
        return (x.new_empty(x.shape[0], Hout), x.new_empty(B, Hout), c_n, *self._fake_saved(*head, opts, save))

    def _bwd_impl(self, *inputs):
        head, opts, rest = self._split(inputs)
        n = len(self.saved._fields)
        y, saved, (dy, dh_n, dc_n, need_dx) = rest[0], self.saved(*rest[1:1 + n]), rest[1 + n:]
        with torch.autocast(head[0].x.device.type, enabled=False):
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
        dy = torch.zeros_like(y) if dy is None else dy
        dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
        if c0 is None:
            dc_n = None
        elif dc_n is None:
            dc_n = torch.zeros_like(c0)
        if torch.is_grad_enabled():
            needed = [ctx.needs_input_grad[i] for i in _GRAD_POSITIONS]
            needed += [ctx.needs_input_grad[N_ARGS + i] for i in range(len(EXT_GRAD_NAMES))] if self.ext else []
            present = _differentiable_grads(a, CellExt(*e) if self.ext else None, needed, (dy, dh_n, dc_n))
        else:
            need_dx = ctx.needs_input_grad[1]
            grads = self.bwd(*a, *e, *ctx.opts, y, *saved, dy, dh_n, dc_n, need_dx)
            present = [g if t is not None else None for g, t in zip(grads, a.tensors() + e[:len(EXT_GRAD_NAMES)])]
            if not need_dx:
                present[0] = None
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = present[:8]
        ext_grads = tuple(present[8:]) + (None,) * (self._n_ext - len(EXT_GRAD_NAMES)) if self.ext else ()
        return ((None, dx, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, None) + ext_grads
                + (None,) * (len(ctx.opts) + 1))


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
                 ext: Optional[ExtImpl] = None) -> None:
        self.backend, self.availability = backend, availability
        self.options, self._resolve_options = tuple(options), resolve_options
        opts = "".join(f", {kind} {opt}" for opt, kind, _ in self.options)
        plain = _OpPair(name, opts, len(self.options), forward, backward, fake_saved, Saved, False)
        self.fwd, self.bwd = plain.fwd, plain.bwd
        self.ext_fwd = self.ext_bwd = None
        if ext is not None:
            cells = _OpPair(f"{name}_ext", opts, len(self.options), *ext, SavedExt, True)
            self.ext_fwd, self.ext_bwd = cells.fwd, cells.bwd

    def __call__(self, *args, ext: Optional[CellExt] = None, **kwargs) -> LayerOut:
        """The contract's ``layer(args, **options)`` (or the fields flat), with fastrnn's cells through ``ext``:
        checked once, then the forward op."""
        a, kwargs = parse_layer_args(args, kwargs)
        unknown = set(kwargs) - {opt for opt, _, _ in self.options}
        if unknown:
            raise TypeError(f"unexpected backend option(s) {sorted(unknown)}; this backend takes "
                            f"{[opt for opt, _, _ in self.options]}")
        check(a)
        cells = ext is not None and bool(ext.features())
        if cells:
            if self.ext_fwd is None:
                raise RuntimeError(f"fastrnn {self.backend} backend does not run {', '.join(ext.features())}")
            check_ext(a, ext)
        reason = self.availability(a.x.device, a.x.dtype)
        if reason is not None:
            raise RuntimeError(f"fastrnn {self.backend} backend unavailable: {reason}")
        opts = tuple(kwargs.get(opt, default) for opt, _, default in self.options)
        if self._resolve_options is not None:
            opts = self._resolve_options(a, opts, cells)
        if _transformed():
            return reference.layer(a, ext=ext if cells else None)
        differentiable = a.tensors() + (tuple(ext)[:len(EXT_GRAD_NAMES)] if cells else ())
        # inference skips the saved activations: less memory and traffic
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
        if cells:
            y, h_n, c_n = self.ext_fwd(*a, *ext, *opts, save)[:3]
        else:
            y, h_n, c_n = self.fwd(*a, *opts, save)[:3]
        return LayerOut(y, h_n, c_n if a.mode == "LSTM" else None)


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
    out = reference.layer(a, ext=e)
    pairs = [(o, g) for o, g in zip(out, grad_outputs) if o is not None]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True, materialize_grads=True))
    return [next(grads) if need and t is not None else None for t, need in zip(inputs, needed)]
