"""Cell arithmetic and gate-block memory helpers shared by the step and whole-sequence Triton kernels.

Every function works on fp32 register blocks of one batch tile x one hidden slice. Keeping the cell math
here means the two kernel variants differ only in how they move state and weights, never in the cell.
Gate blocks are up to four ``[BB, BH]`` tensors at column offsets ``g*H`` of a row-major buffer; unused
gates of a mode are aliases of gate 0 and compile away.

``MODE`` is the integer code of ``fastrnn.ops.MODES``: 0 LSTM, 1 GRU, 2 RNN_TANH, 3 RNN_RELU.
Saved per row for backward, fp32 in the ``fastrnn.ops.Saved`` layout: ``gates [N, G*H]`` (LSTM i, f, g, o,
GRU r, z, n after their activation) and GRU's ``hn [N, H]`` (``W_hn h + b_hn``); the Elman RNN saves
nothing because its derivative is a function of ``h_t`` alone.
"""

import re
import warnings
from typing import Optional

import numpy
import triton
import triton.language as tl

# Every launch and ahead-of-time compile passes this as ``enable_fp_fusion``, so fastrnn never depends on
# Triton's default (fusion on until 3.9, off from 3.10, with a warning when TRITON_DEFAULT_FP_FUSION is
# unset). Off: the interpreter, where the tests run these kernels on CPU, rounds every multiply and add
# separately, and only unfused code rounds the same way there and compiled (csrc/cell/cell.h, built without
# contraction too, fuses explicitly: see fastrnn/_buildcfg.py). The cell math is a small part of a step next
# to the recurrent product, whose tl.dot is unaffected.
FP_FUSION = False


def interpreting() -> bool:
    """Whether the kernels run in the Triton interpreter.

    Triton decides per function when it is decorated, so both ours and triton.language's own jit helpers
    (``tl.zeros``) must have been created with ``TRITON_INTERPRET=1``: setting it after importing triton
    but before fastrnn would mix the two and fail inside the kernels.
    """
    return all(type(fn).__name__ == "InterpretedFunction" for fn in (_sigmoid, tl.zeros))


def release() -> str:
    """This Triton's release, "3.8": the key of the per-release tile tables (step, seq, persist, ext)."""
    return ".".join(triton.__version__.split(".")[:2])


def for_release(tiles: tuple, overrides: dict, key, version: str) -> tuple:
    """``tiles`` (dicts) as Triton release ``version`` ("3.9") compiles them: each updated with what
    ``overrides[version]`` holds for ``key(tile)``; a release without an entry keeps them."""
    changes = overrides.get(version, {})
    return tuple(dict(tile, **changes.get(key(tile), {})) for tile in tiles)


def interpreter_problem() -> Optional[str]:
    """Why this Triton's interpreter cannot run the kernels, or ``None``.

    Before 3.7 the interpreter turns a kernel's run-time scalar into a Python int with ``int()`` of a
    one-element array (each ``range(0, n, ...)`` over an argument does), which NumPy 2.4 refuses; the
    error surfaces deep inside the first kernel, so it is found here and named instead.
    """
    if tuple(int(p) for p in re.findall(r"\d+", release())) >= (3, 7):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            int(numpy.ones(1))
        except TypeError:
            return (f"Triton {triton.__version__}'s interpreter cannot run under NumPy {numpy.__version__} (it "
                    "converts scalar arguments with int() of a one-element array, which this NumPy refuses): "
                    "install triton>=3.7 or numpy<2.4 to run the Triton kernels on CPU")
    return None


# Found once, at import: availability() runs inside torch.compile's traces, which cannot enter catch_warnings.
INTERPRETER_PROBLEM = interpreter_problem()


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2*sigmoid(2x)-1 saturates cleanly at both ends, unlike (e^2x-1)/(e^2x+1) which overflows to inf/inf.
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def mma(acc, a, b, UPCAST: tl.constexpr):
    # The 3.8 interpreter multiplies bf16 dot operands as raw uint16 bits (triton-lang/triton#11584);
    # UPCAST is set only there. bf16 -> fp32 is exact and "ieee" keeps fp32 products exact, which is
    # what the bf16 tensor-core path computes (exact products, fp32 accumulation).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def load_gates(p_0, o_rows, o_h, stride, m, H, G: tl.constexpr):
    """Up to four ``[BB, BH]`` fp32 blocks at column offsets ``g*H`` of rows ``o_rows``."""
    p_r = p_0 + o_rows[:, None] * stride + o_h[None, :]
    b_0 = tl.load(p_r, mask=m, other=0.0).to(tl.float32)
    b_1 = b_0
    b_2 = b_0
    b_3 = b_0
    if G > 1:
        b_1 = tl.load(p_r + H, mask=m, other=0.0).to(tl.float32)
        b_2 = tl.load(p_r + 2 * H, mask=m, other=0.0).to(tl.float32)
    if G > 3:
        b_3 = tl.load(p_r + 3 * H, mask=m, other=0.0).to(tl.float32)
    return b_0, b_1, b_2, b_3


@triton.jit
def store_gates(p_0, o_rows, o_h, stride, m, H, b_0, b_1, b_2, b_3, G: tl.constexpr):
    p_r = p_0 + o_rows[:, None] * stride + o_h[None, :]
    tl.store(p_r, b_0, mask=m)
    if G > 1:
        tl.store(p_r + H, b_1, mask=m)
        tl.store(p_r + 2 * H, b_2, mask=m)
    if G > 3:
        tl.store(p_r + 3 * H, b_3, mask=m)


@triton.jit
def cell_forward(MODE: tl.constexpr, x0, x1, x2, x3, a0, a1, a2, a3, h_prev, c_prev):
    """Gate inputs ``x*`` (input projection + b_ih) and ``a*`` (W_hh h + b_hh) -> (h, c, s0, s1, s2, s3).

    ``h`` is the new hidden state before any projection, ``c`` the LSTM cell (else ``c_prev``), ``s*`` the
    values saved for backward.
    """
    if MODE == 0:
        i = _sigmoid(x0 + a0)
        f = _sigmoid(x1 + a1)
        g = _tanh(x2 + a2)
        o = _sigmoid(x3 + a3)
        c = f * c_prev + i * g
        h = o * _tanh(c)
        return h, c, i, f, g, o
    elif MODE == 1:
        r = _sigmoid(x0 + a0)
        z = _sigmoid(x1 + a1)
        n = _tanh(x2 + r * a2)
        h = (1.0 - z) * n + z * h_prev
        return h, c_prev, r, z, n, a2
    elif MODE == 2:
        h = _tanh(x0 + a0)
        return h, c_prev, h, h, h, h
    else:
        h = tl.maximum(x0 + a0, 0.0)
        return h, c_prev, h, h, h, h


@triton.jit
def lstm_gate_grads(dc, dtc, i, f, g, o, c_prev):
    """LSTM gate pre-activation gradients from the whole gradient ``dc`` of the new cell and ``dtc``, that of
    ``o``'s product partner (``dh * tanh(c)``; fastrnn's cells put a LayerNorm of c inside the tanh)."""
    gi = dc * g * i * (1.0 - i)
    gf = dc * c_prev * f * (1.0 - f)
    gg = dc * i * (1.0 - g * g)
    go = dtc * o * (1.0 - o)
    return gi, gf, gg, go


@triton.jit
def cell_backward(MODE: tl.constexpr, dh, dc, s0, s1, s2, s3, h, c, h_prev, c_prev):
    """Gradient of one step for a tile: ``dh``/``dc`` w.r.t. the step's outputs (h before projection).

    Returns ``(gh0, gh1, gh2, gh3, gx2, dc_prev, dh_direct)``: ``gh*`` are the gradients of the recurrent
    pre-activations (rows of W_hh), ``gx2`` the GRU input-side n gradient (which differs from the recurrent
    side by the factor r), ``dc_prev`` the LSTM cell gradient carried back and ``dh_direct`` the part of
    ``dh_{t-1}`` that does not go through W_hh (GRU's ``z * dh``; zero otherwise).
    """
    zero = tl.zeros_like(dh)
    if MODE == 0:
        tc = _tanh(c)
        dc = dc + dh * s3 * (1.0 - tc * tc)
        gi, gf, gg, go = lstm_gate_grads(dc, dh * tc, s0, s1, s2, s3, c_prev)
        return gi, gf, gg, go, gg, dc * s1, zero
    elif MODE == 1:
        dn = dh * (1.0 - s1) * (1.0 - s2 * s2)
        gz = dh * (h_prev - s2) * s1 * (1.0 - s1)
        gr = dn * s3 * s0 * (1.0 - s0)
        return gr, gz, dn * s0, zero, dn, dc, dh * s1
    elif MODE == 2:
        g = dh * (1.0 - h * h)
        return g, zero, zero, zero, g, dc, zero
    else:
        g = tl.where(h > 0.0, dh, 0.0)
        return g, zero, zero, zero, g, dc, zero


@triton.jit
def forward_tile(MODE: tl.constexpr, G: tl.constexpr, SAVE: tl.constexpr, p_x, p_h, p_c, p_s, p_hn, o_rows, o_h,
                 m, H, a0, a1, a2, a3, h_prev, c_prev):
    """The pointwise half of a forward step for one tile: adds the input projection rows ``o_rows`` to the
    recurrent pre-activations ``a*``, runs the cell and stores h (before projection), c and, with
    ``SAVE``, the saved gates and GRU's hn. Returns ``(h, c)``."""
    x0, x1, x2, x3 = load_gates(p_x, o_rows, o_h, G * H, m, H, G)
    h, c, s0, s1, s2, s3 = cell_forward(MODE, x0, x1, x2, x3, a0, a1, a2, a3, h_prev, c_prev)
    o_r = o_rows[:, None] * H + o_h[None, :]
    tl.store(p_h + o_r, h, mask=m)
    if MODE == 0:
        tl.store(p_c + o_r, c, mask=m)
    if SAVE:
        if MODE <= 1:
            store_gates(p_s, o_rows, o_h, G * H, m, H, s0, s1, s2, s3, G)
        if MODE == 1:
            tl.store(p_hn + o_r, s3, mask=m)
    return h, c


@triton.jit
def backward_tile(MODE: tl.constexpr, G: tl.constexpr, p_s, p_hn, p_h, p_c, p_hp, p_cp, p_gh, p_gx, o_rows, o_h,
                  m, H, dh, dc):
    """The pointwise half of a backward step for one tile: loads what forward saved for rows ``o_rows``,
    runs :func:`cell_backward` and stores the recurrent-side gate gradients (and GRU's input-side n).
    Returns ``(g0, g1, g2, g3, dc_prev, dh_direct)``."""
    o_r = o_rows[:, None] * H + o_h[None, :]
    h = tl.load(p_h + o_r, mask=m, other=0.0)
    c = h
    c_prev = h
    h_prev = h
    if MODE == 0:
        c = tl.load(p_c + o_r, mask=m, other=0.0)
        c_prev = tl.load(p_cp + o_r, mask=m, other=0.0)
    if MODE == 1:
        h_prev = tl.load(p_hp + o_r, mask=m, other=0.0)
    s0 = h
    s1 = h
    s2 = h
    s3 = h
    if MODE <= 1:
        s0, s1, s2, s3 = load_gates(p_s, o_rows, o_h, G * H, m, H, G)
    if MODE == 1:
        s3 = tl.load(p_hn + o_r, mask=m, other=0.0)
    g0, g1, g2, g3, gx, dc_prev, dh_direct = cell_backward(MODE, dh, dc, s0, s1, s2, s3, h, c, h_prev, c_prev)
    store_gates(p_gh, o_rows, o_h, G * H, m, H, g0, g1, g2, g3, G)
    if MODE == 1:
        tl.store(p_gx + o_r, gx, mask=m)
    return g0, g1, g2, g3, dc_prev, dh_direct
