"""Cell arithmetic shared by the step and whole-sequence Triton kernels.

Every function works on fp32 register blocks of one batch tile x one hidden slice. Keeping the cell math
here means the two kernel variants differ only in how they move state and weights, never in the cell.

``MODE`` is the integer code of ``fastrnn.ops.MODES``: 0 LSTM, 1 GRU, 2 RNN_TANH, 3 RNN_RELU.
Saved per row for backward (``save``, ``[N, SAVE_GATES*H]`` fp32): LSTM i, f, g, o after their
activation; GRU r, z, n and ``W_hn h + b_hn``; the Elman RNN saves nothing because its derivative is a
function of ``h_t`` alone.
"""

import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2*sigmoid(2x)-1 saturates cleanly at both ends, unlike (e^2x-1)/(e^2x+1) which overflows to inf/inf.
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr):
    # The 3.8 interpreter multiplies bf16 dot operands as raw uint16 bits (triton-lang/triton#11584);
    # UPCAST is set only there. bf16 -> fp32 is exact and "ieee" keeps fp32 products exact, which is
    # what the bf16 tensor-core path computes (exact products, fp32 accumulation).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


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
        gi = dc * s2 * s0 * (1.0 - s0)
        gf = dc * c_prev * s1 * (1.0 - s1)
        gg = dc * s0 * (1.0 - s2 * s2)
        go = dh * tc * s3 * (1.0 - s3)
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
