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
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastrnn.ops import GRAD_NAMES, LAYER_SCHEMA, LayerArgs, LayerOut, Saved, check, parse_layer_args, reference

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

_SAVED_SCHEMA = ", ".join(f"Tensor {name}" for name in Saved._fields)
_SAVED_TYPES = ", ".join("Tensor" for _ in Saved._fields)


class LayerOp:
    """A backend's layer as custom ops with the shared autograd formula; call it as the contract's ``layer``.

    ``backend`` names it in errors, ``name`` its ops. ``options``: ``(name, schema type, default)`` of the
    backend's options, passed to ``layer`` by keyword and to ``forward``/``backward`` as a tuple in this
    order, after ``resolve_options(args, options)`` has checked them and filled in input-dependent defaults.
    """

    def __init__(self, backend: str, name: str, availability: Callable[[torch.device, torch.dtype], Optional[str]],
                 forward: Forward, backward: Backward, fake_saved: FakeSaved,
                 options: Sequence[Tuple[str, str, object]] = (),
                 resolve_options: Optional[Callable[[LayerArgs, tuple], tuple]] = None) -> None:
        self.backend, self.availability = backend, availability
        self.options, self._resolve_options = tuple(options), resolve_options
        opts = "".join(f", {kind} {opt}" for opt, kind, _ in self.options)
        self._n_in = N_ARGS + len(self.options)
        self._forward, self._backward, self._fake_saved = forward, backward, fake_saved
        self.fwd = torch.library.custom_op(
            f"fastrnn::{name}_fwd", self._fwd_impl, mutates_args=(),
            schema=f"({LAYER_SCHEMA}{opts}, bool save) -> (Tensor, Tensor, Tensor, {_SAVED_TYPES})",
        )
        self.bwd = torch.library.custom_op(
            f"fastrnn::{name}_bwd", self._bwd_impl, mutates_args=(),
            schema=f"({LAYER_SCHEMA}{opts}, Tensor y, {_SAVED_SCHEMA}, Tensor dy, Tensor dh_n, Tensor? dc_n, "
                   f"bool need_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        )
        self.fwd.register_fake(self._fwd_fake)
        self.bwd.register_fake(self._bwd_fake)
        self.fwd.register_autograd(self._grad, setup_context=self._setup_context)

    def _split(self, inputs: tuple) -> Tuple[LayerArgs, tuple, tuple]:
        return LayerArgs(*inputs[:N_ARGS]), tuple(inputs[N_ARGS:self._n_in]), tuple(inputs[self._n_in:])

    def _fwd_impl(self, *inputs):
        a, opts, (save,) = self._split(inputs)
        # a backend's torch ops (GEMMs beside the kernels) compute in the inputs' dtype, as the kernels do:
        # the caller casts for autocast (the modules do, as torch.nn)
        with torch.autocast(a.x.device.type, enabled=False):
            y, h_n, c_n, saved = self._forward(a, opts, save)
        return (y, h_n, c_n, *saved)

    def _fwd_fake(self, *inputs):
        a, opts, (save,) = self._split(inputs)
        x, (B, Hout) = a.x, a.h0.shape
        c_n = x.new_empty(B, a.H) if a.mode == "LSTM" else x.new_empty(0)
        return (x.new_empty(x.shape[0], Hout), x.new_empty(B, Hout), c_n, *self._fake_saved(a, opts, save))

    def _bwd_impl(self, *inputs):
        a, opts, rest = self._split(inputs)
        y, saved, (dy, dh_n, dc_n, need_dx) = rest[0], Saved(*rest[1:6]), rest[6:]
        with torch.autocast(a.x.device.type, enabled=False):
            return tuple(self._backward(a, opts, y, saved, dy, dh_n, dc_n, need_dx))

    def _bwd_fake(self, *inputs):
        a, _, rest = self._split(inputs)
        need_dx = rest[-1]

        def like(t: Optional[Tensor]) -> Tensor:
            return a.x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

        return tuple(like(t) for t in (a.x if need_dx else None,) + a.tensors()[1:])

    def _setup_context(self, ctx, inputs, output) -> None:
        a, opts, _ = self._split(inputs)
        y, _h_n, _c_n, *saved = output
        ctx.mode, ctx.reverse, ctx.opts = a.mode, a.reverse, opts
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a.x, a.batch_sizes, *a.tensors()[1:], y, *saved)

    def _grad(self, ctx, dy, dh_n, dc_n, *_saved_grads):
        x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, *saved = ctx.saved_tensors
        a = LayerArgs(ctx.mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ctx.reverse)
        dy = torch.zeros_like(y) if dy is None else dy
        dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
        if c0 is None:
            dc_n = None
        elif dc_n is None:
            dc_n = torch.zeros_like(c0)
        if torch.is_grad_enabled():
            present = _differentiable_grads(a, [ctx.needs_input_grad[i] for i in _GRAD_POSITIONS], (dy, dh_n, dc_n))
        else:
            need_dx = ctx.needs_input_grad[1]
            grads = self.bwd(*a, *ctx.opts, y, *saved, dy, dh_n, dc_n, need_dx)
            present = [g if t is not None else None for g, t in zip(grads, a.tensors())]
            if not need_dx:
                present[0] = None
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = present
        return (None, dx, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, None) + (None,) * (len(ctx.opts) + 1)

    def __call__(self, *args, **kwargs) -> LayerOut:
        """The contract's ``layer(args, **options)`` (or the fields flat): checked once, then the forward op."""
        a, kwargs = parse_layer_args(args, kwargs)
        unknown = set(kwargs) - {opt for opt, _, _ in self.options}
        if unknown:
            raise TypeError(f"unexpected backend option(s) {sorted(unknown)}; this backend takes "
                            f"{[opt for opt, _, _ in self.options]}")
        check(a)
        reason = self.availability(a.x.device, a.x.dtype)
        if reason is not None:
            raise RuntimeError(f"fastrnn {self.backend} backend unavailable: {reason}")
        opts = tuple(kwargs.get(opt, default) for opt, _, default in self.options)
        if self._resolve_options is not None:
            opts = self._resolve_options(a, opts)
        if _transformed():
            return reference.layer(a)
        # inference skips the saved activations: less memory and traffic
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in a.tensors())
        y, h_n, c_n = self.fwd(*a, *opts, save)[:3]
        return LayerOut(y, h_n, c_n if a.mode == "LSTM" else None)


def _transformed() -> bool:
    """Whether a torch.func transform or forward-mode AD is active (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False  # torch.compile and torch.export trace the custom ops (dynamo folds this branch)
    return torch._C._functorch.peek_interpreter_stack() is not None or torch.autograd.forward_ad._current_level >= 0


def _differentiable_grads(a: LayerArgs, needed: Sequence[bool], grad_outputs: tuple) -> list:
    """Gradients w.r.t. ``a.tensors()`` (``None`` where not needed) of the layer recomputed on the reference
    backend, with their graph (``create_graph=True``)."""
    wanted = [t for t, need in zip(a.tensors(), needed) if need and t is not None]
    out = reference.layer(a)
    pairs = [(o, g) for o, g in zip(out, grad_outputs) if o is not None]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True, materialize_grads=True))
    return [next(grads) if need and t is not None else None for t, need in zip(a.tensors(), needed)]
