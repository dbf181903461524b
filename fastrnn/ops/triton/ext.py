"""fastrnn's own cells on Triton: LayerNorm, zoneout and recurrent dropout (``fastrnn.ops.CellExt``).

Kernel, launcher and host loop in one place, mirroring the cpp backend's driver (csrc/rnn_ext.cpp):

- forward: one GEMM ``x W_ih^T`` for all steps and :func:`_ln_rows_kernel` over its rows (LayerNorm); per step
  a torch GEMM ``(h_{t-1} * rec_mask) W_hh^T`` and one :func:`_fwd_kernel` launch, a program per row: the
  recurrent row's LayerNorm statistics, the cell, LSTM's LayerNorm of c, zoneout, the state, ``y`` and the
  next step's masked GEMM operand;
- backward: per step one :func:`_bwd_kernel` launch, a program per row (zoneout, LayerNorm of c, the cell,
  the recurrent LayerNorm's backward and its parameters' per-row sums), then the GEMM ``dG W_hh``; after the
  loop :func:`_ln_rows_bwd_kernel` over the input side's rows and every weight gradient as one GEMM.

A row program walks its row in chunks of ``BC`` columns, so no width makes it spill; the row's statistics
come from its own loads (two passes: the deviations' squares, not ``E[v^2] - E[v]^2``, which cancels for rows
whose mean is large against their spread). Values a later loop of the same program reads at other columns
than the ones a thread wrote are ordered by ``tl.debug_barrier``.

Everything is fp32 between the kernels (``fastrnn.ops.SavedExt``: xs, hs normalised, stats, c) and in the
state; 16-bit storage is computed in fp32 (the weights upcast once per call, the gains, masks, initial state
and ``dy`` on load) and only ``y``, ``h_n``, ``c_n`` and the gradients are rounded on the way out.

LayerNorm parameter gradients are deterministic: the input side's are column sums by torch after the loop,
the recurrent side's and LSTM's c's accumulate per batch row in ``part: [B, 2*G*H + 2*H]`` (one program owns a
row for a whole step, the steps run in order), summed by torch at the end.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrnn.ops import GATES, LN_EPS, CellExt, LayerArgs, SavedExt
from fastrnn.ops.triton.cells import FP_FUSION, _sigmoid, _tanh, cell_backward, cell_forward, lstm_gate_grads
from fastrnn.ops.triton.host import MODE_IDS, input_projection, nan_buffer, placeholder, plan_rows

_EPS = tl.constexpr(LN_EPS)
# Columns of the per-row statistics (SavedExt.stats): rstd of xs and of hs, LSTM's mean and rstd of c.
RS_X, RS_H, MU_C, RS_C, N_STATS = 0, 1, 2, 3, 4
# The widest chunk a row program holds: 1024 fp32 columns over 8 warps are 4 registers per value per thread.
MAX_CHUNK = 1024


def row_config(width: int) -> dict:
    """Chunk and warps of a row program over rows ``width`` wide (the hidden size for the step kernels):
    the whole row up to ``MAX_CHUNK`` columns, then a loop over chunks."""
    bc = max(16, min(triton.next_power_of_2(width), MAX_CHUNK))
    return {"BC": bc, "num_warps": 4 if bc <= 256 else 8}


@triton.jit
def _row_stats(p_v, n, BC: tl.constexpr):
    """Mean and ``1/sqrt(var + eps)`` of the fp32 row ``v: [n]``."""
    b_s = tl.zeros([BC], dtype=tl.float32)
    for i0 in range(0, n, BC):
        o_i = i0 + tl.arange(0, BC)
        b_s += tl.load(p_v + o_i, mask=o_i < n, other=0.0)
    mean = tl.sum(b_s, 0) / n
    b_q = tl.zeros([BC], dtype=tl.float32)
    for i0 in range(0, n, BC):
        o_i = i0 + tl.arange(0, BC)
        m_i = o_i < n
        b_d = tl.where(m_i, tl.load(p_v + o_i, mask=m_i, other=0.0) - mean, 0.0)
        b_q += b_d * b_d
    return mean, 1.0 / tl.sqrt_rn(tl.sum(b_q, 0) / n + _EPS)


@triton.jit
def _accumulate(p, o, m, v):
    tl.store(p + o, tl.load(p + o, mask=m, other=0.0) + v, mask=m)


@triton.jit
def _ln_backward_row(p_d, p_v, p_g, p_part, rstd, n, BC: tl.constexpr, PART: tl.constexpr):
    """Row ``d: [n]``, the gradient of a LayerNorm's output, becomes that of its input, in place; ``v: [n]`` the
    normalised row, ``g: [n]`` the gain. With ``PART`` the gain's and shift's terms are added to ``part: [2*n]``."""
    # the caller's loops wrote d at other columns per thread
    tl.debug_barrier()
    b_s0 = tl.zeros([BC], dtype=tl.float32)
    b_s1 = tl.zeros([BC], dtype=tl.float32)
    for i0 in range(0, n, BC):
        o_i = i0 + tl.arange(0, BC)
        m_i = o_i < n
        b_d = tl.load(p_d + o_i, mask=m_i, other=0.0)
        b_v = tl.load(p_v + o_i, mask=m_i, other=0.0)
        b_u = b_d * tl.load(p_g + o_i, mask=m_i, other=0.0).to(tl.float32)
        b_s0 += b_u
        b_s1 += b_u * b_v
        if PART:
            _accumulate(p_part, o_i, m_i, b_d * b_v)
            _accumulate(p_part + n, o_i, m_i, b_d)
    m0 = tl.sum(b_s0, 0) / n
    m1 = tl.sum(b_s1, 0) / n
    for i0 in range(0, n, BC):
        o_i = i0 + tl.arange(0, BC)
        m_i = o_i < n
        b_d = tl.load(p_d + o_i, mask=m_i, other=0.0)
        b_v = tl.load(p_v + o_i, mask=m_i, other=0.0)
        b_u = b_d * tl.load(p_g + o_i, mask=m_i, other=0.0).to(tl.float32)
        tl.store(p_d + o_i, rstd * (b_u - m0 - b_v * m1), mask=m_i)


@triton.jit
def _ln_rows_kernel(p_v, p_st, n, BC: tl.constexpr):
    """LayerNorm without gain and shift of every row of ``v: [N, n]`` in place (a program per row); its rstd
    goes to ``st: [N, N_STATS]`` column RS_X."""
    i_r = tl.program_id(0).to(tl.int64)
    p_row = p_v + i_r * n
    mean, rstd = _row_stats(p_row, n, BC)
    for i0 in range(0, n, BC):
        o_i = i0 + tl.arange(0, BC)
        m_i = o_i < n
        tl.store(p_row + o_i, (tl.load(p_row + o_i, mask=m_i, other=0.0) - mean) * rstd, mask=m_i)
    tl.store(p_st + i_r * 4, rstd)


@triton.jit
def _ln_rows_bwd_kernel(p_d, p_v, p_g, p_st, n, BC: tl.constexpr):
    """Backward of :func:`_ln_rows_kernel` followed by the gain: ``d: [N, n]`` in: gradient of the gained rows,
    out: of the rows before LayerNorm; ``v: [N, n]`` the normalised rows, ``g: [n]``, ``st: [N, N_STATS]``."""
    i_r = tl.program_id(0).to(tl.int64)
    _ln_backward_row(p_d + i_r * n, p_v + i_r * n, p_g, p_d, tl.load(p_st + i_r * 4), n, BC, False)


@triton.jit
def _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_g, m, mean_h, rstd_h, LN: tl.constexpr, STORE: tl.constexpr):
    """Gate columns ``o_g`` of a row: the input side's term with every bias folded in, and the recurrent side's
    (``hs`` normalised with ``mean_h``/``rstd_h``, and with STORE written to ``nh``; gains applied)."""
    b_x = tl.load(p_xs + o_g, mask=m, other=0.0)
    b_h = tl.load(p_hs + o_g, mask=m, other=0.0)
    if LN:
        b_h = (b_h - mean_h) * rstd_h
        if STORE:
            tl.store(p_nh + o_g, b_h, mask=m)
        b_x = b_x * tl.load(p_gx + o_g, mask=m, other=0.0).to(tl.float32)
        b_h = b_h * tl.load(p_gh + o_g, mask=m, other=0.0).to(tl.float32)
    return b_x + tl.load(p_bias + o_g, mask=m, other=0.0), b_h


@triton.jit
def _lstm_unit(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_gc, p_sc, p_cp, o_j, m_j, H, mean_h, rstd_h, mean_c,
               rstd_c, LN: tl.constexpr, STORE: tl.constexpr):
    """LSTM units ``o_j`` of a row: ``(i, f, g, o, c_prev, c, normalised c, tanh(LayerNorm(c)))``, c before
    zoneout; forward and backward both compute them here, so backward recomputes forward's values exactly."""
    x0, a0 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_j, m_j, mean_h, rstd_h, LN, STORE)
    x1, a1 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, H + o_j, m_j, mean_h, rstd_h, LN, STORE)
    x2, a2 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, 2 * H + o_j, m_j, mean_h, rstd_h, LN, STORE)
    x3, a3 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, 3 * H + o_j, m_j, mean_h, rstd_h, LN, STORE)
    b_cp = tl.load(p_cp + o_j, mask=m_j, other=0.0)
    _, b_c, b_i, b_f, b_g, b_o = cell_forward(0, x0, x1, x2, x3, a0, a1, a2, a3, b_cp, b_cp)
    b_nc = (b_c - mean_c) * rstd_c
    b_cl = b_c
    if LN:
        b_cl = b_nc * tl.load(p_gc + o_j, mask=m_j, other=0.0).to(tl.float32) + \
            tl.load(p_sc + o_j, mask=m_j, other=0.0).to(tl.float32)
    return b_i, b_f, b_g, b_o, b_cp, b_c, b_nc, _tanh(b_cl)


@triton.jit
def _gru_rnn_unit(MODE: tl.constexpr, p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_bhn, p_hp, o_j, m_j, H, mean_h,
                  rstd_h, LN: tl.constexpr, STORE: tl.constexpr):
    """GRU or Elman units ``o_j`` of a row: ``cells.cell_forward``'s ``(h, s0, s1, s2, s3, h_prev)``, h before
    zoneout; GRU's recurrent n term carries its own biases (inside ``r * (...)``)."""
    x0, a0 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_j, m_j, mean_h, rstd_h, LN, STORE)
    x1 = x0
    a1 = a0
    x2 = x0
    a2 = a0
    b_hp = a0
    if MODE == 1:
        x1, a1 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, H + o_j, m_j, mean_h, rstd_h, LN, STORE)
        x2, a2 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, 2 * H + o_j, m_j, mean_h, rstd_h, LN, STORE)
        a2 += tl.load(p_bhn + o_j, mask=m_j, other=0.0)
        b_hp = tl.load(p_hp + o_j, mask=m_j, other=0.0)
    b_h, _, s0, s1, s2, s3 = cell_forward(MODE, x0, x1, x2, x2, a0, a1, a2, a2, b_hp, b_hp)
    return b_h, s0, s1, s2, s3, b_hp


@triton.jit
def _put_h(p_h, p_y, p_zh, p_m, p_hm, o_j, m_j, b_new, ZONE_H: tl.constexpr, MASK: tl.constexpr,
           WRITE_Y: tl.constexpr):
    """h_t from the cell's new value: zoneout against the state, the state, ``y`` and the next GEMM operand."""
    b_h = b_new
    if ZONE_H:
        b_z = tl.load(p_zh + o_j, mask=m_j, other=0.0).to(tl.float32)
        b_h = b_z * tl.load(p_h + o_j, mask=m_j, other=0.0) + (1.0 - b_z) * b_new
    tl.store(p_h + o_j, b_h, mask=m_j)
    if WRITE_Y:
        tl.store(p_y + o_j, b_h.to(p_y.dtype.element_ty), mask=m_j)
    if MASK:
        tl.store(p_hm + o_j, b_h * tl.load(p_m + o_j, mask=m_j, other=0.0).to(tl.float32), mask=m_j)


@triton.jit
def _zone_c(p_zc, o_j, m_j, b_cp, b_c, ZONE_C: tl.constexpr):
    if ZONE_C:
        b_z = tl.load(p_zc + o_j, mask=m_j, other=0.0).to(tl.float32)
        return b_z * b_cp + (1.0 - b_z) * b_c
    return b_c


@triton.jit
def _fwd_kernel(
    p_xs, p_hs, p_nh, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc,
    p_h, p_y, p_zh, p_m, p_hm, p_c, p_cs, p_zc,
    H,
    MODE: tl.constexpr, G: tl.constexpr, LN: tl.constexpr, SAVE: tl.constexpr, STORE: tl.constexpr,
    ZONE_H: tl.constexpr, ZONE_C: tl.constexpr, MASK: tl.constexpr, WRITE_Y: tl.constexpr, BC: tl.constexpr,
):
    """One forward step, a program per row of the step's ``n`` rows (every pointer at the step's first row).

    xs: [n, G*H] x W_ih^T (normalised with LN); hs: [n, G*H] (h_{t-1} * rec_mask) W_hh^T, raw; nh: [n, G*H] out:
    hs normalised (LN and SAVE); st: [n, N_STATS] out: RS_H, MU_C, RS_C (LN); gx, gh: [G*H] LayerNorm gains;
    bias: [G*H] every additive term (LayerNorm shifts, b_ih, b_hh; GRU's recurrent n block apart); bhn: [H] GRU's
    recurrent n block's; gc, sc: [H] LSTM's LayerNorm gain and shift of c (LN).
    h: [n, H] fp32 state, in: h_{t-1}, out: h_t (with a projection the cell's h before it, out only); y: [n, H]
    out: h_t in the storage dtype (WRITE_Y); zh: [n, H] zoneout of h (ZONE_H); m: [n, H] recurrent-dropout
    mask, hm: [n, H] out: h_t * m (MASK); c: [n, H] LSTM fp32 state in/out; cs: [n, H] out: c_t (SAVE);
    zc: [n, H] zoneout of c (ZONE_C). ``G*H`` wide rows: LSTM 4, GRU 3, Elman 1 gates.
    """
    i_r = tl.program_id(0)
    GH = G * H
    p_xs += i_r * GH
    p_hs += i_r * GH
    p_nh += i_r * GH
    o_r = i_r * H
    mean_h = 0.0
    rstd_h = 1.0
    if LN:
        mean_h, rstd_h = _row_stats(p_hs, GH, BC)
        tl.store(p_st + i_r * 4 + 1, rstd_h)
    if MODE == 0:
        mean_c = 0.0
        rstd_c = 1.0
        if LN:
            # LayerNorm of c needs its row's statistics before any unit's h: two passes recomputing c
            b_s = tl.zeros([BC], dtype=tl.float32)
            for j0 in range(0, H, BC):
                o_j = j0 + tl.arange(0, BC)
                m_j = o_j < H
                _, _, _, _, _, b_c, _, _ = _lstm_unit(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_gc, p_sc, p_c + o_r, o_j,
                                                      m_j, H, mean_h, rstd_h, mean_c, rstd_c, LN, False)
                b_s += tl.where(m_j, b_c, 0.0)
            mean_c = tl.sum(b_s, 0) / H
            b_q = tl.zeros([BC], dtype=tl.float32)
            for j0 in range(0, H, BC):
                o_j = j0 + tl.arange(0, BC)
                m_j = o_j < H
                _, _, _, _, _, b_c, _, _ = _lstm_unit(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_gc, p_sc, p_c + o_r, o_j,
                                                      m_j, H, mean_h, rstd_h, mean_c, rstd_c, LN, False)
                b_d = tl.where(m_j, b_c - mean_c, 0.0)
                b_q += b_d * b_d
            rstd_c = 1.0 / tl.sqrt_rn(tl.sum(b_q, 0) / H + _EPS)
            tl.store(p_st + i_r * 4 + 2, mean_c)
            tl.store(p_st + i_r * 4 + 3, rstd_c)
        for j0 in range(0, H, BC):
            o_j = j0 + tl.arange(0, BC)
            m_j = o_j < H
            _, _, _, b_o, b_cp, b_c, _, b_tcl = _lstm_unit(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_gc, p_sc,
                                                           p_c + o_r, o_j, m_j, H, mean_h, rstd_h, mean_c, rstd_c,
                                                           LN, STORE)
            b_c = _zone_c(p_zc + o_r, o_j, m_j, b_cp, b_c, ZONE_C)
            tl.store(p_c + o_r + o_j, b_c, mask=m_j)
            if SAVE:
                tl.store(p_cs + o_r + o_j, b_c, mask=m_j)
            _put_h(p_h + o_r, p_y + o_r, p_zh + o_r, p_m + o_r, p_hm + o_r, o_j, m_j, b_o * b_tcl, ZONE_H, MASK,
                   WRITE_Y)
    else:
        for j0 in range(0, H, BC):
            o_j = j0 + tl.arange(0, BC)
            m_j = o_j < H
            b_new, _, _, _, _, _ = _gru_rnn_unit(MODE, p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_bhn, p_h + o_r, o_j,
                                                 m_j, H, mean_h, rstd_h, LN, STORE)
            _put_h(p_h + o_r, p_y + o_r, p_zh + o_r, p_m + o_r, p_hm + o_r, o_j, m_j, b_new, ZONE_H, MASK, WRITE_Y)


@triton.jit
def _split_dh(p_dh, p_dy, p_zh, o_j, m_j, ZONE_H: tl.constexpr, HAS_DY: tl.constexpr):
    """The gradient reaching h_t, split into the cell's new value's share and h_{t-1}'s (zoneout)."""
    b_d = tl.load(p_dh + o_j, mask=m_j, other=0.0)
    if HAS_DY:
        b_d += tl.load(p_dy + o_j, mask=m_j, other=0.0).to(tl.float32)
    if ZONE_H:
        b_z = tl.load(p_zh + o_j, mask=m_j, other=0.0).to(tl.float32)
        return (1.0 - b_z) * b_d, b_z * b_d
    return b_d, tl.zeros_like(b_d)


@triton.jit
def _put_dgate(p_dgx, p_dgh, o_g, m, b_dx, b_dh, SPLIT: tl.constexpr):
    tl.store(p_dgx + o_g, b_dx, mask=m)
    if SPLIT:
        tl.store(p_dgh + o_g, b_dh, mask=m)


@triton.jit
def _bwd_kernel(
    p_xs, p_hs, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc,
    p_hp, p_cp, p_zh, p_zc, p_dh, p_dy, p_dc, p_hr, p_dgx, p_dgh, p_part,
    H,
    MODE: tl.constexpr, G: tl.constexpr, LN: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr,
    HAS_DY: tl.constexpr, BYPASS: tl.constexpr, WRITE_HR: tl.constexpr, SPLIT: tl.constexpr, BC: tl.constexpr,
):
    """One backward step, a program per row of the step's ``n`` rows (every pointer at the step's first row).

    xs, hs: [n, G*H], st: [n, N_STATS]: saved by forward; gx, gh, bias, bhn, gc, sc: as :func:`_fwd_kernel`;
    hp: [n, H] GRU h_{t-1}; cp: [n, H] LSTM c_{t-1}; zh, zc: [n, H] zoneout (ZONE_H, ZONE_C).
    dh: [n, H] in: the gradient reaching h_t from later steps, out (BYPASS): its part that bypasses W_hh
    (zoneout, GRU's z * dh); with a projection (no HAS_DY) in: the whole gradient of the cell's h, the host having
    done the projection's and h's zoneout's backward; dy: [n, H] gradient of y in the storage dtype (HAS_DY);
    dc: [n, H] LSTM fp32, in: dc_t, out: dc_{t-1}; hr: [n, H] out: the cell's h, the projection's input
    (WRITE_HR).
    dgx: [n, G*H] out: gradient of the input side's pre-activations (after its LayerNorm: the host runs that
    backward); dgh: [n, G*H] out: of (h_{t-1} * rec_mask) W_hh^T, before LayerNorm (dgx itself unless LN or
    GRU: SPLIT); part: [n, 2*G*H + 2*H] LN: the hh gain's, hh shift's, c gain's and c shift's terms added.
    """
    i_r = tl.program_id(0)
    GH = G * H
    p_xs += i_r * GH
    p_hs += i_r * GH
    p_dgx += i_r * GH
    p_dgh += i_r * GH
    p_part += i_r * (2 * GH + 2 * H)
    o_r = i_r * H
    p_dh += o_r
    if MODE == 0:
        mean_c = 0.0
        rstd_c = 1.0
        m0 = 0.0
        m1 = 0.0
        if LN:
            mean_c = tl.load(p_st + i_r * 4 + 2)
            rstd_c = tl.load(p_st + i_r * 4 + 3)
            # d LayerNorm(c) -> dc needs the row means of u = d(LN(c)) * gain_c and of u * normalised c first
            b_s0 = tl.zeros([BC], dtype=tl.float32)
            b_s1 = tl.zeros([BC], dtype=tl.float32)
            for j0 in range(0, H, BC):
                o_j = j0 + tl.arange(0, BC)
                m_j = o_j < H
                _, _, _, b_o, _, _, b_nc, b_tcl = _lstm_unit(p_xs, p_hs, p_xs, p_gx, p_gh, p_bias, p_gc, p_sc,
                                                             p_cp + o_r, o_j, m_j, H, 0.0, 1.0, mean_c, rstd_c, LN,
                                                             False)
                b_cell, _ = _split_dh(p_dh, p_dy + o_r, p_zh + o_r, o_j, m_j, ZONE_H, HAS_DY)
                b_dcl = tl.where(m_j, b_cell * b_o * (1.0 - b_tcl * b_tcl), 0.0)
                b_u = b_dcl * tl.load(p_gc + o_j, mask=m_j, other=0.0).to(tl.float32)
                b_s0 += b_u
                b_s1 += b_u * b_nc
                _accumulate(p_part + 2 * GH, o_j, m_j, b_dcl * b_nc)
                _accumulate(p_part + 2 * GH + H, o_j, m_j, b_dcl)
            m0 = tl.sum(b_s0, 0) / H
            m1 = tl.sum(b_s1, 0) / H
        for j0 in range(0, H, BC):
            o_j = j0 + tl.arange(0, BC)
            m_j = o_j < H
            b_i, b_f, b_g, b_o, b_cp, _, b_nc, b_tcl = _lstm_unit(p_xs, p_hs, p_xs, p_gx, p_gh, p_bias, p_gc, p_sc,
                                                                  p_cp + o_r, o_j, m_j, H, 0.0, 1.0, mean_c, rstd_c,
                                                                  LN, False)
            b_cell, b_by = _split_dh(p_dh, p_dy + o_r, p_zh + o_r, o_j, m_j, ZONE_H, HAS_DY)
            b_dcn = b_cell * b_o * (1.0 - b_tcl * b_tcl)
            if LN:
                b_dcn = rstd_c * (b_dcn * tl.load(p_gc + o_j, mask=m_j, other=0.0).to(tl.float32) - m0 - b_nc * m1)
            b_dct = tl.load(p_dc + o_r + o_j, mask=m_j, other=0.0)
            b_zc = tl.zeros_like(b_dct)
            if ZONE_C:
                b_zc = tl.load(p_zc + o_r + o_j, mask=m_j, other=0.0).to(tl.float32)
            b_dcc = b_dcn + (1.0 - b_zc) * b_dct
            tl.store(p_dc + o_r + o_j, b_dcc * b_f + b_zc * b_dct, mask=m_j)
            b_di, b_df, b_dg, b_do = lstm_gate_grads(b_dcc, b_cell * b_tcl, b_i, b_f, b_g, b_o, b_cp)
            _put_dgate(p_dgx, p_dgh, o_j, m_j, b_di, b_di, SPLIT)
            _put_dgate(p_dgx, p_dgh, H + o_j, m_j, b_df, b_df, SPLIT)
            _put_dgate(p_dgx, p_dgh, 2 * H + o_j, m_j, b_dg, b_dg, SPLIT)
            _put_dgate(p_dgx, p_dgh, 3 * H + o_j, m_j, b_do, b_do, SPLIT)
            if BYPASS:
                tl.store(p_dh + o_j, b_by, mask=m_j)
            if WRITE_HR:
                tl.store(p_hr + o_r + o_j, b_o * b_tcl, mask=m_j)
    else:
        for j0 in range(0, H, BC):
            o_j = j0 + tl.arange(0, BC)
            m_j = o_j < H
            b_h, s0, s1, s2, s3, b_hp = _gru_rnn_unit(MODE, p_xs, p_hs, p_xs, p_gx, p_gh, p_bias, p_bhn, p_hp + o_r,
                                                      o_j, m_j, H, 0.0, 1.0, LN, False)
            b_cell, b_by = _split_dh(p_dh, p_dy + o_r, p_zh + o_r, o_j, m_j, ZONE_H, HAS_DY)
            g0, g1, g2, _, gx2, _, b_direct = cell_backward(MODE, b_cell, b_cell, s0, s1, s2, s3, b_h, b_h, b_hp,
                                                            b_hp)
            _put_dgate(p_dgx, p_dgh, o_j, m_j, g0, g0, SPLIT)
            if MODE == 1:
                _put_dgate(p_dgx, p_dgh, H + o_j, m_j, g1, g1, SPLIT)
                _put_dgate(p_dgx, p_dgh, 2 * H + o_j, m_j, gx2, g2, SPLIT)
            if BYPASS:
                tl.store(p_dh + o_j, b_by + b_direct, mask=m_j)
    if LN:
        _ln_backward_row(p_dgh, p_hs, p_gh, p_part, tl.load(p_st + i_r * 4 + 1), GH, BC, True)


def ln_rows(v: Tensor, stats: Tensor) -> None:
    """Normalise the rows of fp32 ``v: [N, n]`` in place, their rstd into ``stats[:, RS_X]``."""
    cfg = row_config(v.shape[1])
    _ln_rows_kernel[(v.shape[0],)](v, stats, v.shape[1], BC=cfg["BC"], num_warps=cfg["num_warps"], num_stages=1,
                                   enable_fp_fusion=FP_FUSION)


def ln_rows_bwd(d: Tensor, v: Tensor, gain: Tensor, stats: Tensor) -> None:
    """Backward of :func:`ln_rows` and a gain, in place on ``d: [N, n]``."""
    cfg = row_config(v.shape[1])
    _ln_rows_bwd_kernel[(v.shape[0],)](d, v, gain, stats, v.shape[1], BC=cfg["BC"], num_warps=cfg["num_warps"],
                                       num_stages=1, enable_fp_fusion=FP_FUSION)


def fwd_step(mode: str, n: int, H: int, xs, hs, nh, stats, gains, bias, b_hn, h, y, zh, mask, hm, c, cs, zc,
             save: bool, write_y: bool) -> None:
    """Launch :func:`_fwd_kernel` over ``n`` rows; ``gains``: ``(gx, gh, gc, sc)``, ``None`` without LayerNorm;
    an absent optional tensor is ``None``."""
    ln = gains is not None
    gx, gh, gc, sc = gains if ln else (bias,) * 4
    ph = placeholder(xs)
    cfg = row_config(H)
    _fwd_kernel[(n,)](
        xs, hs, nh if nh is not None else ph, stats if ln else ph, gx, gh, bias, _or(b_hn, ph), _or(gc, ph),
        _or(sc, ph), h, _or(y, ph), _or(zh, ph), _or(mask, ph), _or(hm, ph), _or(c, ph), _or(cs, ph), _or(zc, ph),
        H,
        MODE=MODE_IDS[mode], G=GATES[mode], LN=ln, SAVE=save, STORE=save and ln, ZONE_H=zh is not None,
        ZONE_C=zc is not None, MASK=mask is not None, WRITE_Y=write_y, BC=cfg["BC"], num_warps=cfg["num_warps"], num_stages=1, enable_fp_fusion=FP_FUSION,
    )


def bwd_step(mode: str, n: int, H: int, xs, hs, stats, gains, bias, b_hn, h_prev, c_prev, zh, zc, dh, dy, dc, hr,
             dgx, dgh, part) -> None:
    """Launch :func:`_bwd_kernel` over ``n`` rows; ``dy`` ``None`` means the projection's backward (``dh`` is
    the whole gradient of the cell's h, ``hr`` receives the cell's h)."""
    ln = gains is not None
    gx, gh, gc, sc = gains if ln else (bias,) * 4
    ph = placeholder(xs)
    cfg = row_config(H)
    _bwd_kernel[(n,)](
        xs, hs, stats if ln else ph, gx, gh, bias, _or(b_hn, ph), _or(gc, ph), _or(sc, ph), _or(h_prev, ph),
        _or(c_prev, ph), _or(zh, ph), _or(zc, ph), dh, _or(dy, ph), _or(dc, ph), _or(hr, ph), dgx, dgh,
        _or(part, ph),
        H,
        MODE=MODE_IDS[mode], G=GATES[mode], LN=ln, ZONE_H=zh is not None, ZONE_C=zc is not None,
        HAS_DY=dy is not None, BYPASS=dy is not None and (zh is not None or mode == "GRU"), WRITE_HR=dy is None,
        SPLIT=ln or mode == "GRU", BC=cfg["BC"], num_warps=cfg["num_warps"], num_stages=1, enable_fp_fusion=FP_FUSION,
    )


def _or(t: Optional[Tensor], ph: Tensor) -> Tensor:
    return ph if t is None else t


def _fold_bias(a: LayerArgs, e: CellExt):
    """fp32 ``(bias: [G*H], b_hn: [H] or None)``: every additive term of each pre-activation (LayerNorm shifts,
    b_ih, b_hh) and GRU's recurrent n block's apart (inside ``r * (...)``)."""
    H, GH, gru = a.H, a.w_hh.shape[0], a.mode == "GRU"
    shared = 2 * H if gru else GH
    bias = a.x.new_zeros(GH, dtype=torch.float32)
    b_hn = a.x.new_zeros(H, dtype=torch.float32) if gru else None
    for t in (a.b_ih, e.ln_ih_bias):
        if t is not None:
            bias += t.float()
    for t in (a.b_hh, e.ln_hh_bias):
        if t is not None:
            bias[:shared] += t[:shared].float()
            if gru:
                b_hn += t[2 * H:].float()
    return bias, b_hn


def _gains(e: CellExt):
    if not e.layer_norm:
        return None
    return tuple(None if t is None else t.contiguous()
                 for t in (e.ln_ih_weight, e.ln_hh_weight, e.ln_c_weight, e.ln_c_bias))


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def forward(a: LayerArgs, e: CellExt, save: bool):
    """``(y, h_n, c_n, SavedExt)``; ``c_n`` is empty unless LSTM, the saved entries empty unless ``save``."""
    mode, x, dt = a.mode, a.x, a.x.dtype
    lstm, proj, ln = mode == "LSTM", a.w_hr is not None, e.layer_norm
    N, B, H, HO, GH = x.shape[0], a.h0.shape[0], a.H, a.h0.shape[1], a.w_hh.shape[0]
    nothing = SavedExt(*(x.new_empty(0, dtype=torch.float32) for _ in SavedExt._fields))
    h = a.h0.float().clone(memory_format=torch.contiguous_format)
    c = a.c0.float().clone(memory_format=torch.contiguous_format) if lstm else None
    if N == 0:
        return x.new_empty(0, HO), h.to(dt), (c.to(dt) if lstm else x.new_empty(0)), nothing
    rows = plan_rows(a.batch_sizes, B, N, a.reverse, x.device)
    zh, zc, mask = _contig(e.zoneout_h), _contig(e.zoneout_c), _contig(e.rec_mask)
    w_hh, w_hr = a.w_hh.float(), (a.w_hr.float() if proj else None)
    gains, (bias, b_hn) = _gains(e), _fold_bias(a, e)
    xs = input_projection(x, a.w_ih, None)
    stats = nan_buffer(N, N_STATS, x) if ln else None
    if ln:
        ln_rows(xs, stats)
    # the GEMM's raw rows: saved as they are without LayerNorm, else a scratch the kernel normalises from
    hs = nan_buffer(N, GH, x) if save else None
    raw = nan_buffer(B, GH, x) if ln or not save else None
    cs = nan_buffer(N, H, x) if save and lstm else None
    hm = h * mask if mask is not None else None
    operand = h if hm is None else hm
    y = nan_buffer(N, HO, x, dt)
    hr = nan_buffer(B, H, x) if proj else None
    projected = nan_buffer(B, HO, x) if proj and zh is not None else None
    for t in rows.order:
        r, n = rows.rows(t), rows.sizes[t]
        g_rows = raw[:n] if raw is not None else hs[r]
        torch.mm(operand[:n], w_hh.t(), out=g_rows)
        fwd_step(mode, n, H, xs[r], g_rows, hs[r] if save and ln else None, stats[r] if ln else None, gains, bias,
                 b_hn, hr if proj else h, None if proj else y[r], None if proj else _rows(zh, r),
                 None if proj else mask, None if proj else hm, c, _rows(cs, r), _rows(zc, r), save, not proj)
        if proj:
            # zoneout and the mask act on the projected h, which mixes all units: torch ops beside the kernel
            if zh is not None:
                torch.mm(hr[:n], w_hr.t(), out=projected[:n])
                torch.lerp(projected[:n], h[:n], zh[r].float(), out=h[:n])
            else:
                torch.mm(hr[:n], w_hr.t(), out=h[:n])
            y[r] = h[:n]
            if mask is not None:
                torch.mul(h[:n], mask[:n], out=hm[:n])
    c_out = c.to(dt) if lstm else x.new_empty(0)
    if not save:
        return y, h.to(dt), c_out, nothing
    empty = x.new_empty(0, dtype=torch.float32)
    return y, h.to(dt), c_out, SavedExt(xs, hs, stats if ln else empty, cs if lstm else empty.clone())


def _rows(t: Optional[Tensor], r: slice) -> Optional[Tensor]:
    return None if t is None else t[r]


def backward(a: LayerArgs, e: CellExt, y: Tensor, saved: SavedExt, dy: Tensor, dh_n: Tensor,
             dc_n: Optional[Tensor], need_dx: bool):
    """Gradients in ``GRAD_NAMES`` order, then the LayerNorm parameters' (``EXT_GRAD_NAMES``); absent: empty."""
    mode, x, dt = a.mode, a.x, a.x.dtype
    lstm, gru, proj, ln = mode == "LSTM", mode == "GRU", a.w_hr is not None, e.layer_norm
    N, B, H, HO, GH = x.shape[0], a.h0.shape[0], a.H, a.h0.shape[1], a.w_hh.shape[0]
    dh = dh_n.float().clone(memory_format=torch.contiguous_format)
    dc = dc_n.float().clone(memory_format=torch.contiguous_format) if lstm else None
    zh, zc, mask = _contig(e.zoneout_h), _contig(e.zoneout_c), _contig(e.rec_mask)
    dy = dy.contiguous()
    dgx = nan_buffer(N, GH, x)
    dgh = nan_buffer(N, GH, x) if ln or gru else dgx
    h_prev = dts = hrs = None
    part = x.new_zeros(B, 2 * GH + 2 * H, dtype=torch.float32) if ln else None
    if N:
        rows = plan_rows(a.batch_sizes, B, N, a.reverse, x.device)
        w_hh, w_hr = a.w_hh.float(), (a.w_hr.float() if proj else None)
        gains, (bias, b_hn) = _gains(e), _fold_bias(a, e)
        xs, hs, stats = saved.xs, saved.hs, (saved.stats if ln else None)
        h_prev = torch.cat([y.float(), a.h0.float()])[rows.prev_index]
        c_prev = torch.cat([saved.c, a.c0.float()])[rows.prev_index] if lstm else None
        dts = nan_buffer(N, HO, x) if proj else None
        hrs = nan_buffer(N, H, x) if proj else None
        bypass = zh is not None or gru
        for t in reversed(rows.order):
            r, n = rows.rows(t), rows.sizes[t]
            if proj:
                # the projection mixes all units: its backward and h's zoneout are torch ops beside the kernel
                d_tot = dts[r]
                torch.add(dh[:n], dy[r], out=d_tot)
                if zh is not None:
                    torch.mul(d_tot, zh[r], out=dh[:n])
                    d_tot.sub_(dh[:n])
                bwd_step(mode, n, H, xs[r], hs[r], _rows(stats, r), gains, bias, b_hn, None, c_prev[r], None,
                         _rows(zc, r), d_tot @ w_hr, None, dc, hrs[r], dgx[r], dgh[r], part)
            else:
                bwd_step(mode, n, H, xs[r], hs[r], _rows(stats, r), gains, bias, b_hn, h_prev[r],
                         _rows(c_prev, r), _rows(zh, r), _rows(zc, r), dh, dy[r], dc, None, dgx[r], dgh[r], part)
            d_prev = dgh[r] @ w_hh
            if mask is not None:
                d_prev.mul_(mask[:n])
            if bypass:
                dh[:n] += d_prev
            else:
                dh[:n] = d_prev
        if mask is not None:
            h_prev.mul_(torch.cat([mask[:n] for n in rows.sizes]))

    def absent() -> Tensor:
        return x.new_empty(0)  # custom-op outputs must not alias each other

    ln_grads = [absent() for _ in range(6)]
    if ln:
        # gain and shift of the input side: column sums of dgx before its LayerNorm backward
        ln_grads[0], ln_grads[1] = ((dgx * saved.xs).sum(0) if N else dgx.sum(0)), dgx.sum(0)
        if N:
            ln_rows_bwd(dgx, saved.xs, e.ln_ih_weight.contiguous(), saved.stats)
        total = part.sum(0)
        ln_grads[2], ln_grads[3] = total[:GH], total[GH:2 * GH]
        if lstm:
            ln_grads[4], ln_grads[5] = total[2 * GH:2 * GH + H], total[2 * GH + H:]
        ln_grads = [g.to(dt, copy=True) for g in ln_grads]
    x32 = x.float()
    dx = (dgx @ a.w_ih.float()).to(dt) if need_dx else absent()
    dw_ih = (dgx.t() @ x32).to(dt)
    dw_hh = (dgh.t() @ h_prev).to(dt) if N else torch.zeros_like(a.w_hh)
    # with LayerNorm the biases are added beside the shifts, so their gradients are the shifts'
    db_ih = (ln_grads[1].clone() if ln else dgx.sum(0).to(dt)) if a.b_ih is not None else absent()
    db_hh = (ln_grads[3].clone() if ln else dgh.sum(0).to(dt)) if a.b_hh is not None else absent()
    dw_hr = ((dts.t() @ hrs).to(dt) if N else torch.zeros_like(a.w_hr)) if proj else absent()
    grads = (dx, dh.to(dt), dc.to(dt) if lstm else absent(), dw_ih, dw_hh, db_ih, db_hh, dw_hr)
    return grads + tuple(ln_grads)
