"""fastrnn's own cells on Triton: LayerNorm, zoneout and recurrent dropout (``fastrnn.ops.CellExt``).

Kernel, launcher and host loop in one place, mirroring the cpp backend's driver (csrc/rnn_ext.cpp):

- forward: one GEMM ``x W_ih^T`` for all steps and :func:`_ln_rows_kernel` over its rows (LayerNorm); per step
  a torch GEMM ``(h_{t-1} * rec_mask) W_hh^T`` and one :func:`_fwd_kernel` launch, a program per block of rows:
  the recurrent rows' LayerNorm statistics, the cell, LSTM's LayerNorm of c, zoneout, the state, ``y`` and the
  next step's masked GEMM operand;
- backward: per step one :func:`_bwd_kernel` launch, a program per block of rows (zoneout, LayerNorm of c, the cell,
  the recurrent LayerNorm's backward and its parameters' per-row sums), then the GEMM ``dG W_hh``; after the
  loop :func:`_ln_rows_bwd_kernel` over the input side's rows and every weight gradient as one GEMM.

Both step loops take every tensor as an argument of one ``loop`` function and allocate what they write (but the
forward's ``stats``, whose input-side column it reads and whose other columns it fills and returns), so that
``host.run_loop`` can replay them from a CUDA graph (``cuda_graph``) as it does the plain cells' loops.

With the ``"seq"`` variant (no projection) each direction is one launch instead, :func:`_fwd_seq_kernel` and
:func:`_bwd_seq_kernel`: a program owns ``BR`` batch rows for the whole sequence and computes their recurrent
product itself before the row pass of each step (W_hh read from L2 every step), so no Python runs per step and
no program waits for another; the parallelism is ``B / BR`` programs. The ``"persist"`` variant runs the same
kernels over a grid of batch tiles x hidden slices, for parallelism where ``B / BR`` programs would leave the GPU
idle: each step a program computes its slice's columns of its tile's recurrent product, meets the tile's other
slices at a barrier in global memory (persist.py's, a cooperative launch), runs the row pass on its share of the
tile's rows (whole rows: LayerNorm's statistics span them) and meets them again; what other programs wrote is
loaded volatile (past L1, which is not coherent across SMs). Under the interpreter, which runs programs one after
another, several slices take a launch per pass of each step.

A program walks its ``BR`` rows in chunks of ``BC`` columns (``row_config``), so no width makes it spill; a
row's statistics come from the program's own loads (two passes: the deviations' squares, not
``E[v^2] - E[v]^2``, which cancels for rows whose mean is large against their spread). Values a later loop
of the same program reads at other columns than the ones a thread wrote are ordered by ``tl.debug_barrier``.

Everything is fp32 between the kernels (``fastrnn.ops.SavedExt``: xs, hs normalised, stats, c) and in the
state; 16-bit storage is computed in fp32 (the weights and initial state upcast once per call, the gains,
masks and ``dy`` on load) and only ``y``, ``h_n``, ``c_n`` and the gradients are rounded on the way out.

LayerNorm parameter gradients are deterministic: the input side's are column sums by torch after the loop,
the recurrent side's and LSTM's c's accumulate per batch row in ``part: [B, 2*G*H + 2*H]`` (one program owns its
rows for a whole step, the steps run in order), summed by torch at the end.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrnn.ops import GATES, LN_EPS, CellExt, LayerArgs, SavedExt
from fastrnn.ops.triton.cells import (FP_FUSION, _tanh, cell_backward, cell_forward, interpreting, lstm_gate_grads,
                                     release)
from fastrnn.ops.triton.host import (MODE_IDS, Rows, input_projection, nan_buffer, none_if_empty, placeholder,
                                     plan_rows, run_loop, step_tables)
from fastrnn.ops.triton.persist import (_barrier, barrier_counters, compiles_barrier, device_programs, first_clean,
                                        launch_spans)
from fastrnn.ops.triton.persist import enabled_by_default as persist_enabled

_EPS = tl.constexpr(LN_EPS)
# Columns of the per-row statistics (SavedExt.stats): rstd of xs and of hs, LSTM's mean and rstd of c.
RS_X, RS_H, MU_C, RS_C, N_STATS = 0, 1, 2, 3, 4
# The most values a program holds per tensor, and its warps: 256 values, one per thread of 8 warps, for every
# tile. 512 (2 per thread) spilled the LSTM forward and projected backward on sm_90 with Triton 3.6 at 8 and
# at 16 warps, and 256 over 4 warps spilled 8-16 B of the LSTM kernels on one version or the other
# (benchmarks/kernel_report.py on Triton 3.6 and 3.8).
MAX_CHUNK = 256
ROW_WARPS = 8


def row_config(width: int) -> dict:
    """Block of a row program over rows ``width`` wide (the hidden size for the step kernels): ``BC`` columns,
    the whole row up to ``MAX_CHUNK`` and a loop over chunks beyond, and ``BR`` rows, as many as fill
    ``MAX_CHUNK`` values, so that small hidden sizes still give each thread work (and the interpreter fewer
    programs)."""
    bc = max(16, min(triton.next_power_of_2(width), MAX_CHUNK))
    br = max(1, min(16, MAX_CHUNK // bc))
    return {"BR": br, "BC": bc, "num_warps": ROW_WARPS}


@triton.jit
def _rows(n_rows, BR: tl.constexpr):
    """This program's rows as a ``[BR, 1]`` index and mask."""
    o_b = tl.program_id(0) * BR + tl.arange(0, BR)
    return o_b[:, None], (o_b < n_rows)[:, None]


@triton.jit
def _cols(j0, n, m_b, BC: tl.constexpr):
    """Columns ``[j0, j0 + BC)`` as a ``[1, BC]`` index and the ``[BR, BC]`` mask of the block."""
    o_j = (j0 + tl.arange(0, BC))[None, :]
    return o_j, m_b & (o_j < n)


@triton.jit
def _row_stats(p_v, o_r, m_b, n, VOL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Mean and ``1/sqrt(var + eps)``, ``[BR, 1]``, of the fp32 rows ``o_r`` of ``v: [*, n]`` (``VOL``: loaded
    volatile, past L1: other programs of the launch wrote them)."""
    b_s = tl.zeros([BR, BC], dtype=tl.float32)
    for i0 in range(0, n, BC):
        o_i, m = _cols(i0, n, m_b, BC)
        b_s += tl.load(p_v + o_r * n + o_i, mask=m, other=0.0, volatile=VOL)
    mean = tl.sum(b_s, 1)[:, None] / n
    b_q = tl.zeros([BR, BC], dtype=tl.float32)
    for i0 in range(0, n, BC):
        o_i, m = _cols(i0, n, m_b, BC)
        b_d = tl.where(m, tl.load(p_v + o_r * n + o_i, mask=m, other=0.0, volatile=VOL) - mean, 0.0)
        b_q += b_d * b_d
    return mean, 1.0 / tl.sqrt_rn(tl.sum(b_q, 1)[:, None] / n + _EPS)


@triton.jit
def _accumulate(p, m, v):
    tl.store(p, tl.load(p, mask=m, other=0.0) + v, mask=m)


@triton.jit
def _ln_backward_rows(p_d, p_v, p_g, p_part, o_r, o_rp, m_b, rstd, n, PART: tl.constexpr, BR: tl.constexpr,
                      BC: tl.constexpr):
    """Rows ``o_r`` of ``d: [*, n]``, the gradient of a LayerNorm's output, become that of its input, in place;
    ``v: [*, n]`` the normalised rows, ``g: [n]`` the gain, ``rstd: [BR, 1]``. With ``PART`` the gain's and the
    shift's terms are added at ``part + o_rp`` and ``part + o_rp + n`` (``o_rp``: the rows' offsets)."""
    # the caller's loops wrote d with another column-to-thread map
    tl.debug_barrier()
    b_s0 = tl.zeros([BR, BC], dtype=tl.float32)
    b_s1 = tl.zeros([BR, BC], dtype=tl.float32)
    for i0 in range(0, n, BC):
        o_i, m = _cols(i0, n, m_b, BC)
        b_d = tl.load(p_d + o_r * n + o_i, mask=m, other=0.0)
        b_v = tl.load(p_v + o_r * n + o_i, mask=m, other=0.0)
        b_u = b_d * tl.load(p_g + o_i, mask=m, other=0.0).to(tl.float32)
        b_s0 += b_u
        b_s1 += b_u * b_v
        if PART:
            _accumulate(p_part + o_rp + o_i, m, b_d * b_v)
            _accumulate(p_part + o_rp + n + o_i, m, b_d)
    m0 = tl.sum(b_s0, 1)[:, None] / n
    m1 = tl.sum(b_s1, 1)[:, None] / n
    for i0 in range(0, n, BC):
        o_i, m = _cols(i0, n, m_b, BC)
        b_d = tl.load(p_d + o_r * n + o_i, mask=m, other=0.0)
        b_v = tl.load(p_v + o_r * n + o_i, mask=m, other=0.0)
        b_u = b_d * tl.load(p_g + o_i, mask=m, other=0.0).to(tl.float32)
        tl.store(p_d + o_r * n + o_i, rstd * (b_u - m0 - b_v * m1), mask=m)


# The row kernels' row counts never specialised, as step.py's.
@triton.jit(do_not_specialize=["n_rows"])
def _ln_rows_kernel(p_v, p_st, n_rows, n, BR: tl.constexpr, BC: tl.constexpr):
    """LayerNorm without gain and shift of the rows of ``v: [N, n]`` in place (a program per ``BR`` rows);
    their rstd goes to ``st: [N, N_STATS]`` column RS_X."""
    o_r, m_b = _rows(n_rows, BR)
    o_r = o_r.to(tl.int64)
    mean, rstd = _row_stats(p_v, o_r, m_b, n, False, BR, BC)
    for i0 in range(0, n, BC):
        o_i, m = _cols(i0, n, m_b, BC)
        p_b = p_v + o_r * n + o_i
        tl.store(p_b, (tl.load(p_b, mask=m, other=0.0) - mean) * rstd, mask=m)
    tl.store(p_st + o_r * 4, rstd, mask=m_b)


@triton.jit(do_not_specialize=["n_rows"])
def _ln_rows_bwd_kernel(p_d, p_v, p_g, p_st, n_rows, n, BR: tl.constexpr, BC: tl.constexpr):
    """Backward of :func:`_ln_rows_kernel` followed by the gain: ``d: [N, n]`` in: gradient of the gained rows,
    out: of the rows before LayerNorm; ``v: [N, n]`` the normalised rows, ``g: [n]``, ``st: [N, N_STATS]``."""
    o_r, m_b = _rows(n_rows, BR)
    o_r = o_r.to(tl.int64)
    _ln_backward_rows(p_d, p_v, p_g, p_d, o_r, o_r, m_b, tl.load(p_st + o_r * 4, mask=m_b, other=0.0), n, False, BR,
                      BC)


@triton.jit
def _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_rg, o_g, m, mean_h, rstd_h, LN: tl.constexpr,
          STORE: tl.constexpr, VOL: tl.constexpr):
    """Gate columns ``o_g`` of rows ``o_rg`` (offsets into the ``G*H`` wide rows): the input side's term with
    every bias folded in, and the recurrent side's (``hs`` normalised with ``mean_h``/``rstd_h``, and with STORE
    written to ``nh``; gains applied; VOL: ``hs`` loaded volatile, as :func:`_row_stats`)."""
    b_x = tl.load(p_xs + o_rg + o_g, mask=m, other=0.0)
    b_h = tl.load(p_hs + o_rg + o_g, mask=m, other=0.0, volatile=VOL)
    if LN:
        b_h = (b_h - mean_h) * rstd_h
        if STORE:
            tl.store(p_nh + o_rg + o_g, b_h, mask=m)
        b_x = b_x * tl.load(p_gx + o_g, mask=m, other=0.0).to(tl.float32)
        b_h = b_h * tl.load(p_gh + o_g, mask=m, other=0.0).to(tl.float32)
    return b_x + tl.load(p_bias + o_g, mask=m, other=0.0), b_h


@triton.jit
def _lstm_unit(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_gc, p_sc, p_cp, o_rg, o_rh, o_j, m, H, mean_h, rstd_h,
               mean_c, rstd_c, LN: tl.constexpr, STORE: tl.constexpr, VOL: tl.constexpr):
    """LSTM units ``o_j`` of the block's rows: ``(i, f, g, o, c_prev, c, normalised c, tanh(LayerNorm(c)))``, c
    before zoneout; forward and backward both compute them here, so backward recomputes forward's values
    exactly. ``o_rh``: the rows' offsets into ``H`` wide rows (``cp``, gc, sc)."""
    x0, a0 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_rg, o_j, m, mean_h, rstd_h, LN, STORE, VOL)
    x1, a1 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_rg, H + o_j, m, mean_h, rstd_h, LN, STORE, VOL)
    x2, a2 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_rg, 2 * H + o_j, m, mean_h, rstd_h, LN, STORE, VOL)
    x3, a3 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_rg, 3 * H + o_j, m, mean_h, rstd_h, LN, STORE, VOL)
    b_cp = tl.load(p_cp + o_rh + o_j, mask=m, other=0.0)
    _, b_c, b_i, b_f, b_g, b_o = cell_forward(0, x0, x1, x2, x3, a0, a1, a2, a3, b_cp, b_cp)
    b_nc = (b_c - mean_c) * rstd_c
    b_cl = b_c
    if LN:
        b_cl = b_nc * tl.load(p_gc + o_j, mask=m, other=0.0).to(tl.float32) + \
            tl.load(p_sc + o_j, mask=m, other=0.0).to(tl.float32)
    return b_i, b_f, b_g, b_o, b_cp, b_c, b_nc, _tanh(b_cl)


@triton.jit
def _gru_rnn_unit(MODE: tl.constexpr, p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_bhn, p_hp, o_rg, o_rh, o_j, m, H,
                  mean_h, rstd_h, LN: tl.constexpr, STORE: tl.constexpr, VOL: tl.constexpr):
    """GRU or Elman units ``o_j`` of the block's rows: ``cells.cell_forward``'s ``(h, s0, s1, s2, s3, h_prev)``,
    h before zoneout; GRU's recurrent n term carries its own biases (inside ``r * (...)``)."""
    x0, a0 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_rg, o_j, m, mean_h, rstd_h, LN, STORE, VOL)
    x1 = x0
    a1 = a0
    x2 = x0
    a2 = a0
    b_hp = a0
    if MODE == 1:
        x1, a1 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_rg, H + o_j, m, mean_h, rstd_h, LN, STORE, VOL)
        x2, a2 = _gate(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, o_rg, 2 * H + o_j, m, mean_h, rstd_h, LN, STORE, VOL)
        a2 += tl.load(p_bhn + o_j, mask=m, other=0.0)
        b_hp = tl.load(p_hp + o_rh + o_j, mask=m, other=0.0)
    b_h, _, s0, s1, s2, s3 = cell_forward(MODE, x0, x1, x2, x2, a0, a1, a2, a2, b_hp, b_hp)
    return b_h, s0, s1, s2, s3, b_hp


@triton.jit
def _put_h(p_h, p_y, p_zh, p_m, p_hm, o_rh, o_j, m, b_new, ZONE_H: tl.constexpr, MASK: tl.constexpr,
           WRITE_Y: tl.constexpr):
    """h_t from the cell's new value: zoneout against the state, the state, ``y`` and the next GEMM operand."""
    o = o_rh + o_j
    b_h = b_new
    if ZONE_H:
        b_z = tl.load(p_zh + o, mask=m, other=0.0).to(tl.float32)
        b_h = b_z * tl.load(p_h + o, mask=m, other=0.0) + (1.0 - b_z) * b_new
    tl.store(p_h + o, b_h, mask=m)
    if WRITE_Y:
        tl.store(p_y + o, b_h.to(p_y.dtype.element_ty), mask=m)
    if MASK:
        tl.store(p_hm + o, b_h * tl.load(p_m + o, mask=m, other=0.0).to(tl.float32), mask=m)


@triton.jit(do_not_specialize=["n_rows"])
def _fwd_kernel(
    p_xs, p_hs, p_nh, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc,
    p_h, p_y, p_zh, p_m, p_hm, p_c, p_cs, p_zc,
    n_rows, H,
    MODE: tl.constexpr, G: tl.constexpr, LN: tl.constexpr, SAVE: tl.constexpr, STORE: tl.constexpr,
    ZONE_H: tl.constexpr, ZONE_C: tl.constexpr, MASK: tl.constexpr, WRITE_Y: tl.constexpr, BR: tl.constexpr,
    BC: tl.constexpr,
):
    """One forward step over its ``n_rows`` rows, a program per ``BR`` rows (every pointer at the step's first
    row; ``n = n_rows``).

    xs: [n, G*H] x W_ih^T (normalised with LN); hs: [n, G*H] (h_{t-1} * rec_mask) W_hh^T, raw; nh: [n, G*H] out:
    hs normalised (STORE); st: [n, N_STATS] out: RS_H, MU_C, RS_C (LN); gx, gh: [G*H] LayerNorm gains;
    bias: [G*H] every additive term (LayerNorm shifts, b_ih, b_hh; GRU's recurrent n block apart); bhn: [H] GRU's
    recurrent n block's; gc, sc: [H] LSTM's LayerNorm gain and shift of c (LN).
    h: [n, H] fp32 state, in: h_{t-1}, out: h_t (with a projection the cell's h before it, out only); y: [n, H]
    out: h_t in the storage dtype (WRITE_Y); zh: [n, H] zoneout of h (ZONE_H); m: [n, H] recurrent-dropout
    mask, hm: [n, H] out: h_t * m (MASK); c: [n, H] LSTM fp32 state in/out; cs: [n, H] out: c_t (SAVE);
    zc: [n, H] zoneout of c (ZONE_C). ``G`` gates: LSTM 4, GRU 3, Elman 1.
    """
    o_r, m_b = _rows(n_rows, BR)
    _fwd_rows(p_xs, p_hs, p_nh, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc, p_h, p_y, p_zh, p_m, p_hm, p_c, p_cs,
              p_zc, o_r, m_b, H, MODE, G, LN, SAVE, STORE, ZONE_H, ZONE_C, MASK, WRITE_Y, False, BR, BC)


@triton.jit
def _fwd_rows(p_xs, p_hs, p_nh, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc, p_h, p_y, p_zh, p_m, p_hm, p_c, p_cs,
              p_zc, o_r, m_b, H, MODE: tl.constexpr, G: tl.constexpr, LN: tl.constexpr, SAVE: tl.constexpr,
              STORE: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr, MASK: tl.constexpr,
              WRITE_Y: tl.constexpr, VOL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """:func:`_fwd_kernel`'s step on the rows ``o_r`` (``[BR, 1]``, mask ``m_b``) of pointers at the step's first
    row; VOL: ``hs`` loaded volatile (other programs of the launch wrote it)."""
    GH = G * H
    o_rg = o_r * GH
    o_rh = o_r * H
    mean_h = 0.0
    rstd_h = 1.0
    if LN:
        mean_h, rstd_h = _row_stats(p_hs, o_r, m_b, GH, VOL, BR, BC)
        tl.store(p_st + o_r * 4 + 1, rstd_h, mask=m_b)
    if MODE == 0:
        mean_c = 0.0
        rstd_c = 1.0
        if LN:
            # LayerNorm of c needs its rows' statistics before any unit's h: two passes recomputing c
            b_s = tl.zeros([BR, BC], dtype=tl.float32)
            for j0 in range(0, H, BC):
                o_j, m = _cols(j0, H, m_b, BC)
                _, _, _, _, _, b_c, _, _ = _lstm_unit(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_gc, p_sc, p_c, o_rg,
                                                      o_rh, o_j, m, H, mean_h, rstd_h, mean_c, rstd_c, LN, False,
                                                      VOL)
                b_s += tl.where(m, b_c, 0.0)
            mean_c = tl.sum(b_s, 1)[:, None] / H
            b_q = tl.zeros([BR, BC], dtype=tl.float32)
            for j0 in range(0, H, BC):
                o_j, m = _cols(j0, H, m_b, BC)
                _, _, _, _, _, b_c, _, _ = _lstm_unit(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_gc, p_sc, p_c, o_rg,
                                                      o_rh, o_j, m, H, mean_h, rstd_h, mean_c, rstd_c, LN, False,
                                                      VOL)
                b_d = tl.where(m, b_c - mean_c, 0.0)
                b_q += b_d * b_d
            rstd_c = 1.0 / tl.sqrt_rn(tl.sum(b_q, 1)[:, None] / H + _EPS)
            tl.store(p_st + o_r * 4 + 2, mean_c, mask=m_b)
            tl.store(p_st + o_r * 4 + 3, rstd_c, mask=m_b)
        for j0 in range(0, H, BC):
            o_j, m = _cols(j0, H, m_b, BC)
            _, _, _, b_o, b_cp, b_c, _, b_tcl = _lstm_unit(p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_gc, p_sc, p_c,
                                                           o_rg, o_rh, o_j, m, H, mean_h, rstd_h, mean_c, rstd_c,
                                                           LN, STORE, VOL)
            if ZONE_C:
                b_z = tl.load(p_zc + o_rh + o_j, mask=m, other=0.0).to(tl.float32)
                b_c = b_z * b_cp + (1.0 - b_z) * b_c
            tl.store(p_c + o_rh + o_j, b_c, mask=m)
            if SAVE:
                tl.store(p_cs + o_rh + o_j, b_c, mask=m)
            _put_h(p_h, p_y, p_zh, p_m, p_hm, o_rh, o_j, m, b_o * b_tcl, ZONE_H, MASK, WRITE_Y)
    else:
        for j0 in range(0, H, BC):
            o_j, m = _cols(j0, H, m_b, BC)
            b_new, _, _, _, _, _ = _gru_rnn_unit(MODE, p_xs, p_hs, p_nh, p_gx, p_gh, p_bias, p_bhn, p_h, o_rg, o_rh,
                                                 o_j, m, H, mean_h, rstd_h, LN, STORE, VOL)
            _put_h(p_h, p_y, p_zh, p_m, p_hm, o_rh, o_j, m, b_new, ZONE_H, MASK, WRITE_Y)


@triton.jit
def _split_dh(p_dh, p_dy, p_zh, o, m, ZONE_H: tl.constexpr, HAS_DY: tl.constexpr, VOL: tl.constexpr):
    """The gradient reaching h_t, split into the cell's new value's share and h_{t-1}'s (zoneout); VOL: ``dh``
    loaded volatile (other programs of the launch wrote it)."""
    b_d = tl.load(p_dh + o, mask=m, other=0.0, volatile=VOL)
    if HAS_DY:
        b_d += tl.load(p_dy + o, mask=m, other=0.0).to(tl.float32)
    if ZONE_H:
        b_z = tl.load(p_zh + o, mask=m, other=0.0).to(tl.float32)
        return (1.0 - b_z) * b_d, b_z * b_d
    return b_d, tl.zeros_like(b_d)


@triton.jit
def _put_dgate(p_dgx, p_dgh, o, m, b_dx, b_dh, SPLIT: tl.constexpr):
    tl.store(p_dgx + o, b_dx, mask=m)
    if SPLIT:
        tl.store(p_dgh + o, b_dh, mask=m)


@triton.jit(do_not_specialize=["n_rows"])
def _bwd_kernel(
    p_xs, p_hs, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc,
    p_hp, p_cp, p_zh, p_zc, p_dh, p_dy, p_dc, p_hr, p_dgx, p_dgh, p_part,
    n_rows, H,
    MODE: tl.constexpr, G: tl.constexpr, LN: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr,
    HAS_DY: tl.constexpr, BYPASS: tl.constexpr, WRITE_HR: tl.constexpr, SPLIT: tl.constexpr, BR: tl.constexpr,
    BC: tl.constexpr,
):
    """One backward step over its ``n_rows`` rows, a program per ``BR`` rows (every pointer at the step's first
    row; ``n = n_rows``).

    xs, hs: [n, G*H], st: [n, N_STATS]: saved by forward; gx, gh, bias, bhn, gc, sc: as :func:`_fwd_kernel`;
    hp: [n, H] GRU h_{t-1}; cp: [n, H] LSTM c_{t-1}; zh, zc: [n, H] zoneout (ZONE_H, ZONE_C).
    dh: [n, H] in: the gradient reaching h_t from later steps, out (BYPASS): its part that bypasses W_hh
    (zoneout, GRU's z * dh); with a projection (no HAS_DY) in: the whole gradient of the cell's h, the host having
    done the projection's and h's zoneout's backward; dy: [n, H] gradient of y in the storage dtype (HAS_DY);
    dc: [n, H] LSTM fp32, in: dc_t, out: dc_{t-1}; hr: [n, H] out: the cell's h, the projection's input
    (WRITE_HR).
    dgx: [n, G*H] out: gradient of the input side's pre-activations (after its LayerNorm: the host runs that
    backward); dgh: [n, G*H] out: of (h_{t-1} * rec_mask) W_hh^T, before LayerNorm (SPLIT; else dgx is both);
    part: [n, 2*G*H + 2*H] LN: the hh gain's, hh shift's, c gain's and c shift's terms added.
    """
    o_r, m_b = _rows(n_rows, BR)
    _bwd_rows(p_xs, p_hs, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc, p_hp, p_cp, p_zh, p_zc, p_dh, p_dy, p_dc,
              p_hr, p_dgx, p_dgh, p_part, o_r, m_b, H, MODE, G, LN, ZONE_H, ZONE_C, HAS_DY, BYPASS, WRITE_HR, SPLIT,
              False, BR, BC)


@triton.jit
def _bwd_rows(p_xs, p_hs, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc, p_hp, p_cp, p_zh, p_zc, p_dh, p_dy, p_dc,
              p_hr, p_dgx, p_dgh, p_part, o_r, m_b, H, MODE: tl.constexpr, G: tl.constexpr, LN: tl.constexpr,
              ZONE_H: tl.constexpr, ZONE_C: tl.constexpr, HAS_DY: tl.constexpr, BYPASS: tl.constexpr,
              WRITE_HR: tl.constexpr, SPLIT: tl.constexpr, VOL: tl.constexpr, BR: tl.constexpr,
              BC: tl.constexpr):
    """:func:`_bwd_kernel`'s step on the rows ``o_r`` (``[BR, 1]``, mask ``m_b``) of pointers at the step's first
    row; VOL: ``dh`` loaded volatile (other programs of the launch wrote it)."""
    GH = G * H
    o_rg = o_r * GH
    o_rh = o_r * H
    o_rp = o_r * (2 * GH + 2 * H)
    if MODE == 0:
        mean_c = 0.0
        rstd_c = 1.0
        m0 = 0.0
        m1 = 0.0
        if LN:
            mean_c = tl.load(p_st + o_r * 4 + 2, mask=m_b, other=0.0)
            rstd_c = tl.load(p_st + o_r * 4 + 3, mask=m_b, other=0.0)
            # d LayerNorm(c) -> dc needs the row means of u = d(LN(c)) * gain_c and of u * normalised c first
            b_s0 = tl.zeros([BR, BC], dtype=tl.float32)
            b_s1 = tl.zeros([BR, BC], dtype=tl.float32)
            p_pc = p_part + o_rp + 2 * GH
            for j0 in range(0, H, BC):
                o_j, m = _cols(j0, H, m_b, BC)
                _, _, _, b_o, _, _, b_nc, b_tcl = _lstm_unit(p_xs, p_hs, p_xs, p_gx, p_gh, p_bias, p_gc, p_sc, p_cp,
                                                             o_rg, o_rh, o_j, m, H, 0.0, 1.0, mean_c, rstd_c, LN,
                                                             False, False)
                b_cell, _ = _split_dh(p_dh, p_dy, p_zh, o_rh + o_j, m, ZONE_H, HAS_DY, VOL)
                b_dcl = tl.where(m, b_cell * b_o * (1.0 - b_tcl * b_tcl), 0.0)
                b_u = b_dcl * tl.load(p_gc + o_j, mask=m, other=0.0).to(tl.float32)
                b_s0 += b_u
                b_s1 += b_u * b_nc
                _accumulate(p_pc + o_j, m, b_dcl * b_nc)
                _accumulate(p_pc + H + o_j, m, b_dcl)
            m0 = tl.sum(b_s0, 1)[:, None] / H
            m1 = tl.sum(b_s1, 1)[:, None] / H
        for j0 in range(0, H, BC):
            o_j, m = _cols(j0, H, m_b, BC)
            o = o_rh + o_j
            b_i, b_f, b_g, b_o, b_cp, _, b_nc, b_tcl = _lstm_unit(p_xs, p_hs, p_xs, p_gx, p_gh, p_bias, p_gc, p_sc,
                                                                  p_cp, o_rg, o_rh, o_j, m, H, 0.0, 1.0, mean_c,
                                                                  rstd_c, LN, False, False)
            b_cell, b_by = _split_dh(p_dh, p_dy, p_zh, o, m, ZONE_H, HAS_DY, VOL)
            b_dcn = b_cell * b_o * (1.0 - b_tcl * b_tcl)
            if LN:
                b_dcn = rstd_c * (b_dcn * tl.load(p_gc + o_j, mask=m, other=0.0).to(tl.float32) - m0 - b_nc * m1)
            b_dct = tl.load(p_dc + o, mask=m, other=0.0)
            b_zc = tl.zeros_like(b_dct)
            if ZONE_C:
                b_zc = tl.load(p_zc + o, mask=m, other=0.0).to(tl.float32)
            b_dcc = b_dcn + (1.0 - b_zc) * b_dct
            tl.store(p_dc + o, b_dcc * b_f + b_zc * b_dct, mask=m)
            b_di, b_df, b_dg, b_do = lstm_gate_grads(b_dcc, b_cell * b_tcl, b_i, b_f, b_g, b_o, b_cp)
            _put_dgate(p_dgx, p_dgh, o_rg + o_j, m, b_di, b_di, SPLIT)
            _put_dgate(p_dgx, p_dgh, o_rg + H + o_j, m, b_df, b_df, SPLIT)
            _put_dgate(p_dgx, p_dgh, o_rg + 2 * H + o_j, m, b_dg, b_dg, SPLIT)
            _put_dgate(p_dgx, p_dgh, o_rg + 3 * H + o_j, m, b_do, b_do, SPLIT)
            if BYPASS:
                tl.store(p_dh + o, b_by, mask=m)
            if WRITE_HR:
                tl.store(p_hr + o, b_o * b_tcl, mask=m)
    else:
        for j0 in range(0, H, BC):
            o_j, m = _cols(j0, H, m_b, BC)
            o = o_rh + o_j
            b_h, s0, s1, s2, s3, b_hp = _gru_rnn_unit(MODE, p_xs, p_hs, p_xs, p_gx, p_gh, p_bias, p_bhn, p_hp, o_rg,
                                                      o_rh, o_j, m, H, 0.0, 1.0, LN, False, False)
            b_cell, b_by = _split_dh(p_dh, p_dy, p_zh, o, m, ZONE_H, HAS_DY, VOL)
            g0, g1, g2, _, gx2, _, b_direct = cell_backward(MODE, b_cell, b_cell, s0, s1, s2, s3, b_h, b_h, b_hp,
                                                            b_hp)
            _put_dgate(p_dgx, p_dgh, o_rg + o_j, m, g0, g0, SPLIT)
            if MODE == 1:
                _put_dgate(p_dgx, p_dgh, o_rg + H + o_j, m, g1, g1, SPLIT)
                _put_dgate(p_dgx, p_dgh, o_rg + 2 * H + o_j, m, gx2, g2, SPLIT)
            if BYPASS:
                tl.store(p_dh + o, b_by + b_direct, mask=m)
    if LN:
        rstd_h = tl.load(p_st + o_r * 4 + 1, mask=m_b, other=0.0)
        _ln_backward_rows(p_dgh, p_hs, p_gh, p_part, o_r, o_rp, m_b, rstd_h, GH, True, BR, BC)


@triton.jit
def _matmul_rows(p_a, lda, p_w, w_sk, w_sn, o_r, m_b, K, NC, n0, VOL: tl.constexpr, BR: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    """Columns ``[n0, n0 + BN)`` of ``A[o_r, :K] . W``, ``[BR, BN]`` fp32: ``A`` fp32 with row stride ``lda``
    (VOL: loaded volatile, other programs of the launch wrote it), element ``(k, n)`` of ``W: [K, NC]`` at
    ``k * w_sk + n * w_sn``."""
    o_n = n0 + tl.arange(0, BN)
    acc = tl.zeros([BR, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        b_a = tl.load(p_a + o_r * lda + o_k[None, :], mask=m_b & (o_k[None, :] < K), other=0.0, volatile=VOL)
        b_w = tl.load(p_w + o_k[:, None] * w_sk + o_n[None, :] * w_sn,
                      mask=(o_k[:, None] < K) & (o_n[None, :] < NC), other=0.0)
        acc += tl.sum(b_a[:, :, None] * b_w[None, :, :], 1)
    return acc


@triton.jit
def _seq_rows(p_bs, p_off, T, k, REVERSE: tl.constexpr):
    """Step of processing position ``k``: its row count and first row."""
    t = T - 1 - k if REVERSE else k
    return tl.load(p_bs + t), tl.load(p_off + t)


# The whole-sequence kernels, "seq" and "persist" alike. A launch's grid is batch tiles x hidden slices; each
# program loops over steps, each step two passes: the product pass, where it computes its slice's columns (CW
# columns from program_id(1) * CW) of its tile's BR rows' recurrent product, and the row pass, where it runs the
# RB rows from tile_row0 + program_id(1) * RB: whole rows, since LayerNorm's statistics span a row (one row per
# slice, or all of them in the first where there are fewer slices than rows; masked, never branched around, as a
# run-time branch or loop around the row pass's barriers made ptxas spill). A barrier (persist._barrier, on the
# tile's counter) follows each pass; with one slice (the "seq" variant) it is only the program's own threads
# meeting, since no other program touches its rows. PASSES picks the passes a launch runs each step (PRODUCT | ROWS
# on a GPU; one of them per launch where the interpreter needs the launch boundary as the barrier): a compile-time
# choice, so that a GPU's loop body is the two passes in a row, as the seq kernels were tuned (a run-time branch
# between them made ptxas spill).
#
# ``zero`` is always 0 and must stay a run-time value, hence never specialised: ``k * zero`` added to the
# step-invariant addresses keeps the compiler from hoisting them out of the time loop, where they spilled 8-16 B
# at 64-80 registers (as in persist.py), and ``n0 * zero`` the rows' addresses out of the product's column loop.
PRODUCT, ROWS = tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _slice_cols(CW, NC, ONE_SLICE: tl.constexpr):
    """The product columns ``[c0, c1)`` of this program's slice; ONE_SLICE (the grid has one slice, RB = BR):
    all of them, as compile-time bounds where it can (ptxas spilled the run-time ones in seq configurations)."""
    if ONE_SLICE:
        return 0, NC
    c0 = tl.program_id(1) * CW
    return c0, tl.minimum(c0 + CW, NC)


# As persist.py's kernels: neither ``zero`` nor the step range and T specialised.
@triton.jit(do_not_specialize=["zero", "k_begin", "k_end", "T"])
def _fwd_seq_kernel(
    p_xs, p_hs, p_raw, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc,
    p_h, p_y, p_zh, p_m, p_hm, p_c, p_cs, p_zc, p_wt, p_bs, p_off, p_sync,
    k_begin, k_end, T, H, CW, zero,
    MODE: tl.constexpr, G: tl.constexpr, LN: tl.constexpr, SAVE: tl.constexpr, STORE: tl.constexpr,
    RAW: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr, MASK: tl.constexpr, REVERSE: tl.constexpr,
    PASSES: tl.constexpr, ONE_SLICE: tl.constexpr, SYNC: tl.constexpr, BR: tl.constexpr, RB: tl.constexpr,
    BC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """The forward of processing positions ``[k_begin, k_end)``: each step the rows' recurrent product
    ``(h_{t-1} * m) W_hh^T`` and then :func:`_fwd_rows` on them.

    Pointers at row 0 of ``[N, *]`` time-major tensors (the step's rows at ``off[t]``): xs, hs (SAVE; without RAW
    the product's destination, with LN its normalised copy), st, y, zh, cs, zc, as :func:`_fwd_kernel`; raw:
    [B, G*H] the products' scratch (RAW: LayerNorm, or nothing saved). Per batch row ``[B, *]``: h, m, hm, c.
    wt: [H, G*H] W_hh^T fp32; bs: [T] int32 rows per step; off: [T] int64 first row per step; sync: zeroed barrier
    counters, persist.barrier_counters (SYNC: other slices wrote what a pass reads, so it meets them and loads
    volatile).
    """
    GH = G * H
    n_slices = tl.num_programs(1)
    c0, c1 = _slice_cols(CW, GH, ONE_SLICE)
    for k in range(k_begin, k_end):
        n_t, o_t = _seq_rows(p_bs, p_off, T, k, REVERSE)
        z = k * zero
        if RAW:
            p_g = p_raw
        else:
            p_g = p_hs + o_t * GH
        if PRODUCT & PASSES:
            if MASK:
                p_a = p_hm
            else:
                p_a = p_h
            o_r, m_b = _rows(n_t, BR)
            o_r += z
            for n0 in range(c0, c1, BN):
                acc = _matmul_rows(p_a, H, p_wt + z, GH, 1, o_r + n0 * zero, m_b, H, c1, n0, SYNC, BR, BN, BK)
                o_n = (n0 + tl.arange(0, BN))[None, :]
                tl.store(p_g + o_r * GH + o_n, acc, mask=m_b & (o_n < c1))
        if (PRODUCT | ROWS) == PASSES:
            _barrier(p_sync, (2 * (k - k_begin) + 1) * n_slices, SYNC)
        if ROWS & PASSES:
            o_l = tl.program_id(1) * RB + tl.arange(0, RB)[:, None]
            o_q = tl.program_id(0) * BR + o_l + z
            _fwd_rows(p_xs + o_t * GH, p_g, p_hs + o_t * GH, p_st + o_t * 4, p_gx + z, p_gh + z, p_bias + z,
                      p_bhn + z, p_gc + z, p_sc + z, p_h, p_y + o_t * H, p_zh + o_t * H, p_m, p_hm, p_c,
                      p_cs + o_t * H, p_zc + o_t * H, o_q, (o_l < BR) & (o_q < n_t), H, MODE, G, LN, SAVE, STORE,
                      ZONE_H, ZONE_C, MASK, True, SYNC, RB, BC)
        if k + 1 < k_end:
            _barrier(p_sync, 2 * (k + 1 - k_begin) * n_slices, SYNC)


@triton.jit(do_not_specialize=["zero", "k_begin", "k_end", "T"])
def _bwd_seq_kernel(
    p_xs, p_hs, p_st, p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc,
    p_hp, p_cp, p_zh, p_zc, p_dh, p_dy, p_dc, p_dgx, p_dgh, p_part, p_m, p_w, p_bs, p_off, p_sync,
    k_begin, k_end, T, H, CW, zero,
    MODE: tl.constexpr, G: tl.constexpr, LN: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr,
    BYPASS: tl.constexpr, SPLIT: tl.constexpr, MASK: tl.constexpr, REVERSE: tl.constexpr, PASSES: tl.constexpr,
    ONE_SLICE: tl.constexpr, SYNC: tl.constexpr, BR: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    """The backward of backward steps ``[k_begin, k_end)`` (processing position ``T - 1 - k``): the row pass,
    :func:`_bwd_rows`, then the product pass, ``dh_{t-1} = (dG_h W_hh) * m`` added to the part that bypasses
    W_hh (BYPASS) or replacing ``dh``.

    Pointers at row 0 of ``[N, *]`` time-major tensors: xs, hs, st, hp, cp, zh, zc, dy, dgx, dgh as
    :func:`_bwd_kernel`; per batch row: dh, dc, part (LN), m [B, H]; w: [G*H, H] W_hh fp32; bs, off, sync, SYNC as
    :func:`_fwd_seq_kernel`.
    """
    GH = G * H
    n_slices = tl.num_programs(1)
    c0, c1 = _slice_cols(CW, H, ONE_SLICE)
    for k in range(k_begin, k_end):
        n_t, o_t = _seq_rows(p_bs, p_off, T, T - 1 - k, REVERSE)
        z = k * zero
        if ROWS & PASSES:
            o_l = tl.program_id(1) * RB + tl.arange(0, RB)[:, None]
            o_q = tl.program_id(0) * BR + o_l + z
            _bwd_rows(p_xs + o_t * GH, p_hs + o_t * GH, p_st + o_t * 4, p_gx + z, p_gh + z, p_bias + z,
                      p_bhn + z, p_gc + z, p_sc + z, p_hp + o_t * H, p_cp + o_t * H, p_zh + o_t * H,
                      p_zc + o_t * H, p_dh, p_dy + o_t * H, p_dc, p_dh, p_dgx + o_t * GH, p_dgh + o_t * GH, p_part,
                      o_q, (o_l < BR) & (o_q < n_t), H, MODE, G, LN, ZONE_H, ZONE_C, True, BYPASS, False, SPLIT,
                      SYNC, RB, BC)
        if (PRODUCT | ROWS) == PASSES:
            _barrier(p_sync, (2 * (k - k_begin) + 1) * n_slices, SYNC)
        if PRODUCT & PASSES:
            o_r, m_b = _rows(n_t, BR)
            o_r += z
            for n0 in range(c0, c1, BN):
                acc = _matmul_rows(p_dgh + o_t * GH, GH, p_w + z, H, 1, o_r + n0 * zero, m_b, GH, c1, n0, SYNC, BR, BN,
                                   BK)
                o_n = (n0 + tl.arange(0, BN))[None, :]
                m = m_b & (o_n < c1)
                if MASK:
                    acc *= tl.load(p_m + o_r * H + o_n, mask=m, other=0.0).to(tl.float32)
                if BYPASS:
                    acc += tl.load(p_dh + o_r * H + o_n, mask=m, other=0.0, volatile=SYNC)
                tl.store(p_dh + o_r * H + o_n, acc, mask=m)
        if k + 1 < k_end:
            _barrier(p_sync, 2 * (k + 1 - k_begin) * n_slices, SYNC)


# The seq variant's tile: (warps, product values, row values), i.e. a row tile of `row values` (one per thread at
# 4 warps) and a product block ([BR, BK, BN] before its sum over K) of `product values` (16 per thread at 4
# warps), at most GEMM_COLS columns wide. SEQ_TILE spills in none of the 480 configurations
# benchmarks/kernel_report.py compiles on Triton 3.8; 8 warps, or the row kernels' 256-value row tile, spilled
# 8-32 B in several (values live across the time loop's barriers, at 32-96 registers). On Triton 3.6 it spilled
# 4-16 B in 11 forward configurations (H tiles 16, 64, 128, 256), and no tile searched was clean for every H tile
# on both versions, so SEQ_TILE_OVERRIDES gives 3.6, per kernel and H tile, the first tile clean there of
# (8, 4096, 128), (8, 2048, 128), (4, 1024, 128), (8, 4096, 256), (4, 4096, 128).
SEQ_TILE = (4, 2048, 128)
GEMM_COLS = 64
SEQ_TILE_OVERRIDES = {
    "3.6": {("fwd", 16): (8, 4096, 128), ("fwd", 64): (4, 4096, 128), ("fwd", 128): (8, 2048, 128),
            ("fwd", 256): (8, 2048, 128)},
}
# The persist variant's tiles. PERSIST_ROWS batch rows per tile (one at B = 1): every tile streams its slices of
# W_hh from L2 each step, so taller tiles move less, and 16 rows x PERSIST_COLS columns keep SEQ_TILE's product
# block 8 deep. PERSIST_COLS: the narrowest product block, so that a layer's columns spread over the most programs
# (G*H / 16 at most). The row pass runs one row at a time (RB = 1), so a tile's rows spread over its slices.
# PERSIST_MIN_H: on a GPU the persist variant takes no smaller H: there a program's product per step (H x G*H) is
# too small to pay for the two barriers per step across programs that splitting it costs (unmeasured on a GPU), the
# "seq" variant serves it, and on Triton 3.6 13 of the kernels at H tiles 16 and 64 spilled with every candidate tile.
# INTERPRETED_SLICES: under the interpreter, where programs are not resident together and a launch runs per pass,
# a few slices exercise the split (uneven columns, idle row passes) at little cost.
# PERSIST_TILES: candidate (warps, product values, row values), tried in order. ptxas spills 4-36 B (at 32-96
# registers: address values held across the product loop) in 1 in 14 of the configurations benchmarks/kernel_report.py
# compiles with the first on Triton 3.8, and in others with the second, never the same ones; so a GPU launch takes the
# first candidate whose compiled kernel does not spill (``_spill_free``), as the report does. The last, two warps:
# on Triton 3.6, with the slice width known divisible by 16 as a launch compiles it, the GRU backward in 16-bit at
# H 256 (one row per slice) spilled 4 B on sm_90 at every 4- and 8-warp candidate, capped at 64 registers there;
# two warps compile it clean at 80.
PERSIST_TILES = ((4, 2048, 128), (8, 4096, 256), (4, 2048, 64), (8, 2048, 128), (4, 1024, 128), (8, 4096, 128),
                 (4, 4096, 128), (8, 1024, 128), (2, 1024, 128))
PERSIST_ROWS = 16
PERSIST_COLS = 16
PERSIST_MIN_H = 128
INTERPRETED_SLICES = 4


def _h_tile(H: int) -> int:
    """The hidden sizes sharing a row tile: powers of two from 16 to MAX_CHUNK."""
    return max(16, min(triton.next_power_of_2(H), MAX_CHUNK))


def _gemm_shape(H: int, G: int, backward: bool) -> tuple:
    """``(K, NC)`` of a step's recurrent product: forward ``h W_hh^T`` (K = H, NC = G*H), backward ``dG W_hh``."""
    return (G * H, H) if backward else (H, G * H)


def seq_tiles(H: int, G: int, backward: bool) -> dict:
    """Tiles of the "seq" variant of :func:`_bwd_seq_kernel` (``backward``) or :func:`_fwd_seq_kernel`: ``BR``
    rows of ``BC`` columns (the row pass takes all ``RB = BR`` at once), ``BN`` product columns and ``BK`` as
    deep as fills the product block, the warps, from ``SEQ_TILE`` or this Triton's override, and one slice of
    every column (``S``, ``CW``)."""
    key = ("bwd" if backward else "fwd", _h_tile(H))
    warps, values, row_values = SEQ_TILE_OVERRIDES.get(release(), {}).get(key, SEQ_TILE)
    K, NC = _gemm_shape(H, G, backward)
    bc = max(16, min(triton.next_power_of_2(H), row_values))
    br = max(1, min(16, row_values // bc))
    bn = min(GEMM_COLS, max(16, triton.next_power_of_2(NC)))
    bk = max(1, min(values // (br * bn), triton.next_power_of_2(K)))
    return dict(BR=br, RB=br, BC=bc, BN=bn, BK=bk, num_warps=warps, S=1, CW=NC)


def persist_tiles(B: int, H: int, G: int, backward: bool, max_programs: Optional[int],
                  tile: tuple = PERSIST_TILES[0]) -> Optional[dict]:
    """Tiles of the "persist" variant, as :func:`seq_tiles`, with ``S`` hidden slices of ``CW`` product columns
    each: as many as the device holds beside the batch tiles (``max_programs``, the SM count; ``None``: the
    interpreter's INTERPRETED_SLICES), at least PERSIST_COLS columns each; ``tile`` one of PERSIST_TILES. The row pass gives each slice one row
    (``RB = 1``) where there are as many slices as rows, else all of a tile's rows to its first slice (``RB =
    BR``), so that no slice loops over rows (a run-time loop around the row pass's barriers made ptxas spill).
    ``None`` on a GPU (``max_programs`` given) where the batch tiles alone exceed it or H < PERSIST_MIN_H; the
    interpreter takes any H, to test the logic on small cases."""
    br = 1 if B <= 1 else PERSIST_ROWS
    tiles = triton.cdiv(B, br)
    if max_programs is not None and (tiles > max_programs or H < PERSIST_MIN_H):
        return None
    K, NC = _gemm_shape(H, G, backward)
    budget = INTERPRETED_SLICES if max_programs is None else max_programs // tiles
    slices = max(1, min(triton.cdiv(NC, PERSIST_COLS), budget))
    cw = triton.cdiv(triton.cdiv(NC, slices), PERSIST_COLS) * PERSIST_COLS
    slices = triton.cdiv(NC, cw)
    rb = 1 if slices >= br else br
    warps, values, row_values = tile
    return dict(BR=br, RB=rb, BC=max(16, min(triton.next_power_of_2(H), row_values // rb)), BN=PERSIST_COLS,
                BK=max(1, min(values // (br * PERSIST_COLS), triton.next_power_of_2(K))), num_warps=warps, S=slices,
                CW=cw)


def tiles_for(variant: str, B: int, H: int, G: int, backward: bool, device: torch.device) -> Optional[dict]:
    """The tiles ``variant`` ("seq" or "persist") takes for this layer on ``device``; ``None``: persist does not fit."""
    if variant == "seq":
        return seq_tiles(H, G, backward)
    return persist_tiles(B, H, G, backward, device_programs(device))


def w_hh_addressable(G: int, H: int) -> bool:
    """Whether the whole-sequence kernels reach every element of W_hh: they address it (``_matmul_rows``) with
    int32 offsets, which G*H*H elements of 2^31 or more (the LSTM from H = 23,171) would overflow; int64 there
    would cost the inner loop registers for shapes whose weights alone take 8 GB. The step loop's product is
    torch's."""
    return G * H * H < 2**31


def pick_variant(B: int, H: int, G: int, has_proj: bool, device: torch.device) -> str:
    """fastrnn's cells unasked: ``"step"`` with a projection, on the CPU, without ``FASTRNN_PERSISTENT=1`` (the
    whole-sequence kernels wait for a GPU run, as the plain cells' persist does) or where they cannot address W_hh;
    else ``"persist"`` where the seq grid would leave half the SMs idle and persist applies (H >= PERSIST_MIN_H)
    with more than one slice; else ``"seq"``."""
    if has_proj or device.type != "cuda" or not persist_enabled() or not w_hh_addressable(G, H):
        return "step"
    sms = device_programs(device)
    split = persist_tiles(B, H, G, False, sms)
    seq_programs = triton.cdiv(B, seq_tiles(H, G, False)["BR"])
    if split is not None and split["S"] > 1 and 2 * seq_programs <= sms:
        return "persist"
    return "seq"


def _launch_seq(kernel, variant: str, rows: Rows, B: int, H: int, *args, **constexprs) -> None:
    """``args`` up to the weight; the step tables, barrier counters, steps, ``T``, ``H``, ``CW`` and ``zero``
    follow from ``rows`` and the variant's tiles. Under the interpreter, which runs a launch's programs one after
    another, several slices take a launch per pass of each step (the launch boundary is the barrier, compiled out);
    one slice runs everything in one launch with the barrier compiled in (it then waits only for itself), as
    persist.py's."""
    device, backward = args[0].device, kernel is _bwd_seq_kernel
    cfg = tiles_for(variant, B, H, constexprs["G"], backward, device)
    bs, off = step_tables(rows, device)
    T, slices = len(rows.order), cfg["S"]
    grid = (triton.cdiv(B, cfg["BR"]), slices)
    per_phase = interpreting() and slices > 1
    sync = compiles_barrier(slices)
    counters = barrier_counters(grid[0], device)
    order = (ROWS.value, PRODUCT.value) if backward else (PRODUCT.value, ROWS.value)
    # two barriers a step: after the product and after the rows
    spans = ([(k, k + 1, p) for k in range(T) for p in order] if per_phase
             else [(begin, end, sum(order)) for begin, end in launch_spans(T, 2 * slices)])

    def options(cfg: dict, passes: int) -> dict:
        # as persist.py: the driver guarantees every program resident together, or refuses the launch
        launch = {"launch_cooperative_grid": True} if slices > 1 and not interpreting() else {}
        return dict(PASSES=passes, ONE_SLICE=slices == 1, SYNC=sync and not per_phase, BR=cfg["BR"], RB=cfg["RB"],
                    BC=cfg["BC"], BN=cfg["BN"], BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=1,
                    enable_fp_fusion=FP_FUSION, **launch, **constexprs)

    if variant == "persist" and not interpreting():
        def tiles(tile: tuple) -> dict:
            return persist_tiles(B, H, constexprs["G"], backward, device_programs(device), tile)

        # what the candidates' options follow from: the problem, the device's programs and the call's flags
        given = (B, H, device_programs(device), tuple(sorted(constexprs.items())))
        cfg = tiles(_spill_free(kernel, grid, (*args, bs, off, counters, 0, T, T, H, cfg["CW"], 0),
                                lambda tile: options(tiles(tile), sum(order)), given))
    for begin, end, passes in spans:
        if begin and not per_phase:
            counters.zero_()  # as persist.py's: each launch counts from zero
        kernel[grid](*args, bs, off, counters, begin, end, T, H, cfg["CW"], 0, **options(cfg, passes))


def _spill_free(kernel, grid, args, options_of, given: tuple) -> tuple:
    """The first of PERSIST_TILES whose compiled kernel does not spill on this device and fits its resources, the
    first where none does (persist.first_clean, which says what it compiles and remembers)."""
    return first_clean(kernel, grid, args, PERSIST_TILES, options_of, given) or PERSIST_TILES[0]


def _launch(kernel, n_rows: int, width: int, *args, **constexprs) -> None:
    cfg = row_config(width)
    kernel[(triton.cdiv(n_rows, cfg["BR"]),)](*args, BR=cfg["BR"], BC=cfg["BC"], num_warps=cfg["num_warps"],
                                              num_stages=1, enable_fp_fusion=FP_FUSION, **constexprs)


def ln_rows(v: Tensor, stats: Tensor) -> None:
    """Normalise the rows of fp32 ``v: [N, n]`` in place, their rstd into ``stats[:, RS_X]``."""
    _launch(_ln_rows_kernel, v.shape[0], v.shape[1], v, stats, v.shape[0], v.shape[1])


def ln_rows_bwd(d: Tensor, v: Tensor, gain: Tensor, stats: Tensor) -> None:
    """Backward of :func:`ln_rows` and a gain, in place on ``d: [N, n]``."""
    _launch(_ln_rows_bwd_kernel, v.shape[0], v.shape[1], d, v, gain, stats, v.shape[0], v.shape[1])


def fwd_step(mode: str, n: int, H: int, xs, hs, nh, stats, gains, bias, b_hn, h, y, zh, mask, hm, c, cs, zc,
             save: bool, write_y: bool) -> None:
    """Launch :func:`_fwd_kernel` over ``n`` rows; ``gains``: ``(gx, gh, gc, sc)``, ``None`` without LayerNorm;
    an absent optional tensor is ``None``."""
    ln = gains is not None
    ph = placeholder(xs)
    _launch(_fwd_kernel, n, H,
            xs, hs, nh if nh is not None else ph, stats if ln else ph, *_cell_params(gains, bias, b_hn, ph), h,
            _or(y, ph), _or(zh, ph), _or(mask, ph), _or(hm, ph), _or(c, ph), _or(cs, ph),
            _or(zc, ph), n, H,
            MODE=MODE_IDS[mode], G=GATES[mode], LN=ln, SAVE=save, STORE=save and ln, ZONE_H=zh is not None,
            ZONE_C=zc is not None, MASK=mask is not None, WRITE_Y=write_y)


def bwd_step(mode: str, n: int, H: int, xs, hs, stats, gains, bias, b_hn, h_prev, c_prev, zh, zc, dh, dy, dc, hr,
             dgx, dgh, part) -> None:
    """Launch :func:`_bwd_kernel` over ``n`` rows; ``dy`` ``None`` means the projection's backward (``dh`` is
    the whole gradient of the cell's h, ``hr`` receives the cell's h)."""
    ln = gains is not None
    ph = placeholder(xs)
    _launch(_bwd_kernel, n, H,
            xs, hs, stats if ln else ph, *_cell_params(gains, bias, b_hn, ph), _or(h_prev, ph),
            _or(c_prev, ph), _or(zh, ph), _or(zc, ph), dh, _or(dy, ph), _or(dc, ph), _or(hr, ph), dgx, dgh,
            _or(part, ph), n, H,
            MODE=MODE_IDS[mode], G=GATES[mode], LN=ln, ZONE_H=zh is not None, ZONE_C=zc is not None,
            HAS_DY=dy is not None, BYPASS=dy is not None and (zh is not None or mode == "GRU"), WRITE_HR=dy is None,
            SPLIT=ln or mode == "GRU")


def _or(t: Optional[Tensor], ph: Tensor) -> Tensor:
    return ph if t is None else t


def _cell_params(gains, bias: Tensor, b_hn: Optional[Tensor], ph: Tensor) -> tuple:
    """Every kernel's ``p_gx, p_gh, p_bias, p_bhn, p_gc, p_sc``; ``gains``: ``(gx, gh, gc, sc)`` or ``None``
    without LayerNorm (then never read)."""
    gx, gh, gc, sc = gains if gains is not None else (bias,) * 4
    return gx, gh, bias, _or(b_hn, ph), _or(gc, ph), _or(sc, ph)


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


def forward(a: LayerArgs, e: CellExt, save: bool, variant: str = "step", graph: bool = False):
    """``(y, h_n, c_n, SavedExt)``; ``c_n`` is empty unless LSTM, the saved entries empty unless ``save``.
    ``variant`` "seq" or "persist": one :func:`_fwd_seq_kernel` launch instead of the step loop (no projection);
    ``graph``: the step loop replayed from a CUDA graph (``host.run_loop``)."""
    mode, x, dt = a.mode, a.x, a.x.dtype
    lstm, proj, ln = mode == "LSTM", a.w_hr is not None, e.layer_norm
    N, B, H, HO, GH = x.shape[0], a.h0.shape[0], a.H, a.h0.shape[1], a.w_hh.shape[0]
    nothing = SavedExt(*(x.new_empty(0, dtype=torch.float32) for _ in SavedExt._fields))
    if N == 0:
        def state(t: Tensor) -> Tensor:
            return t.to(dt, memory_format=torch.contiguous_format, copy=True)

        return x.new_empty(0, HO), state(a.h0), (state(a.c0) if lstm else x.new_empty(0)), nothing
    seq = variant in ("seq", "persist")
    if seq and proj:
        raise ValueError(f"the {variant!r} kernels of fastrnn's cells take no projection (w_hr)")
    rows = plan_rows(a.batch_sizes, B, N, a.reverse, x.device)
    xs = input_projection(x, a.w_ih, None)
    stats = nan_buffer(N, N_STATS, x) if ln else None
    if ln:
        ln_rows(xs, stats)

    def loop(xs, stats, h0, c0, w_hh, w_hr, bias, b_hn, gx, gh, gc, sc, zh, zc, mask):
        """Everything after the input side: ``(y, h_n, c_n, hs, stats, cs)``; absent tensors come and go empty."""
        stats, c0, w_hr, b_hn, gc, sc, zh, zc, mask = map(
            none_if_empty, (stats, c0, w_hr, b_hn, gc, sc, zh, zc, mask))
        gains = (gx, gh, gc, sc) if ln else None
        h = h0.float().clone(memory_format=torch.contiguous_format)
        c = c0.float().clone(memory_format=torch.contiguous_format) if lstm else None
        w_hh, w_hr = w_hh.float(), (w_hr.float() if proj else None)
        # the GEMM's raw rows: saved as they are without LayerNorm, else a scratch the kernel normalises from
        hs = nan_buffer(N, GH, xs) if save else None
        raw = nan_buffer(B, GH, xs) if ln or not save else None
        cs = nan_buffer(N, H, xs) if save and lstm else None
        hm = h * mask if mask is not None else None
        operand = h if hm is None else hm
        y = nan_buffer(N, HO, xs, dt)
        hr = nan_buffer(B, H, xs) if proj else None
        projected = nan_buffer(B, HO, xs) if proj and zh is not None else None
        if seq:
            ph = placeholder(xs)
            _launch_seq(_fwd_seq_kernel, variant, rows, B, H,
                        xs, _or(hs, ph), _or(raw, ph), stats if ln else ph, *_cell_params(gains, bias, b_hn, ph), h,
                        y, _or(zh, ph), _or(mask, ph), _or(hm, ph), _or(c, ph), _or(cs, ph), _or(zc, ph),
                        w_hh.t().contiguous(),
                        MODE=MODE_IDS[mode], G=GATES[mode], LN=ln, SAVE=save, STORE=save and ln,
                        RAW=raw is not None, ZONE_H=zh is not None, ZONE_C=zc is not None, MASK=mask is not None,
                        REVERSE=a.reverse)
        else:
            for t in rows.order:
                r, n = rows.rows(t), rows.sizes[t]
                g_rows = raw[:n] if raw is not None else hs[r]
                torch.mm(operand[:n], w_hh.t(), out=g_rows)
                fwd_step(mode, n, H, xs[r], g_rows, hs[r] if save and ln else None, stats[r] if ln else None, gains,
                         bias, b_hn, hr if proj else h, None if proj else y[r], None if proj else _at(zh, r),
                         None if proj else mask, None if proj else hm, c, _at(cs, r), _at(zc, r), save, not proj)
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
        return tuple(_or(t, xs.new_empty(0)) for t in (y, h, c, hs, stats, cs))

    key = ("ext_fwd", mode, tuple(rows.sizes), a.reverse, save, dt, x.device) if graph and not seq else None
    gains = _gains(e) or (None,) * 4
    y, h, c, hs, stats, cs = run_loop(key, loop, _present(
        xs, stats, a.h0, a.c0, a.w_hh, a.w_hr, *_fold_bias(a, e), *gains, e.zoneout_h, e.zoneout_c, e.rec_mask))
    c_out = c.to(dt) if lstm else x.new_empty(0)
    if not save:
        return y, h.to(dt), c_out, nothing
    empty = x.new_empty(0, dtype=torch.float32)
    return y, h.to(dt), c_out, SavedExt(xs, hs, stats if ln else empty, cs if lstm else empty.clone())


def _present(like: Tensor, *ts: Optional[Tensor]) -> list:
    """``like`` and ``ts`` as :func:`host.run_loop`'s inputs: ``ts`` contiguous, an absent one empty
    (``none_if_empty`` undoes it)."""
    return [like] + [like.new_empty(0) if t is None else t.contiguous() for t in ts]


def _at(t: Optional[Tensor], r: slice) -> Optional[Tensor]:
    return None if t is None else t[r]


def backward(a: LayerArgs, e: CellExt, y: Tensor, saved: SavedExt, dy: Tensor, dh_n: Tensor,
             dc_n: Optional[Tensor], need_dx: bool, variant: str = "step", graph: bool = False):
    """Gradients in ``GRAD_NAMES`` order, then the LayerNorm parameters' (``EXT_GRAD_NAMES``); absent: empty.
    ``variant`` "seq" or "persist": one :func:`_bwd_seq_kernel` launch instead of the step loop (no projection);
    ``graph``: the step loop replayed from a CUDA graph (``host.run_loop``)."""
    mode, x, dt = a.mode, a.x, a.x.dtype
    lstm, gru, proj, ln = mode == "LSTM", mode == "GRU", a.w_hr is not None, e.layer_norm
    N, B, H, HO, GH = x.shape[0], a.h0.shape[0], a.H, a.h0.shape[1], a.w_hh.shape[0]
    seq = variant in ("seq", "persist")
    if seq and proj:
        raise ValueError(f"the {variant!r} kernels of fastrnn's cells take no projection (w_hr)")
    rows = plan_rows(a.batch_sizes, B, N, a.reverse, x.device) if N else None
    f32 = dict(device=x.device, dtype=torch.float32)
    h_prev = torch.cat([y.float(), a.h0.float()])[rows.prev_index] if N else torch.empty(0, HO, **f32)
    c_prev = torch.cat([saved.c, a.c0.float()])[rows.prev_index] if N and lstm else None

    def loop(xs, hs, stats, h_prev, c_prev, dy, dh_n, dc_n, w_hh, w_hr, bias, b_hn, gx, gh, gc, sc, zh, zc, mask):
        """The recurrence's gradients: ``(dgx, dgh, dh0, dc0, part, dts, hrs)``; absent tensors come and go
        empty."""
        # dc_n stays as it is: an LSTM's is [0, H] at B = 0, and other cells' is never read
        stats, c_prev, w_hr, b_hn, gc, sc, zh, zc, mask = map(
            none_if_empty, (stats, c_prev, w_hr, b_hn, gc, sc, zh, zc, mask))
        gains = (gx, gh, gc, sc) if ln else None
        w_hh, w_hr = w_hh.float(), (w_hr.float() if proj else None)
        dh = dh_n.float().clone(memory_format=torch.contiguous_format)
        dc = dc_n.float().clone(memory_format=torch.contiguous_format) if lstm else None
        dgx = nan_buffer(N, GH, xs)
        dgh = nan_buffer(N, GH, xs) if ln or gru else dgx
        part = xs.new_zeros(B, 2 * GH + 2 * H) if ln else None
        dts = nan_buffer(N, HO, xs) if proj else None
        hrs = nan_buffer(N, H, xs) if proj else None
        bypass = zh is not None or gru
        if seq and N:
            ph = placeholder(xs)
            _launch_seq(_bwd_seq_kernel, variant, rows, B, H,
                        xs, hs, stats if ln else ph, *_cell_params(gains, bias, b_hn, ph), h_prev, _or(c_prev, ph),
                        _or(zh, ph), _or(zc, ph), dh, dy, _or(dc, ph), dgx, dgh, _or(part, ph), _or(mask, ph), w_hh,
                        MODE=MODE_IDS[mode], G=GATES[mode], LN=ln, ZONE_H=zh is not None, ZONE_C=zc is not None,
                        BYPASS=bypass, SPLIT=ln or gru, MASK=mask is not None, REVERSE=a.reverse)
        elif N:
            for t in reversed(rows.order):
                r, n = rows.rows(t), rows.sizes[t]
                if proj:
                    # the projection mixes all units: its backward and h's zoneout are torch ops beside the kernel
                    d_tot = dts[r]
                    torch.add(dh[:n], dy[r], out=d_tot)
                    if zh is not None:
                        torch.mul(d_tot, zh[r], out=dh[:n])
                        d_tot.sub_(dh[:n])
                    bwd_step(mode, n, H, xs[r], hs[r], _at(stats, r), gains, bias, b_hn, None, c_prev[r], None,
                             _at(zc, r), d_tot @ w_hr, None, dc, hrs[r], dgx[r], dgh[r], part)
                else:
                    bwd_step(mode, n, H, xs[r], hs[r], _at(stats, r), gains, bias, b_hn, h_prev[r],
                             _at(c_prev, r), _at(zh, r), _at(zc, r), dh, dy[r], dc, None, dgx[r], dgh[r], part)
                d_prev = dgh[r] @ w_hh
                if mask is not None:
                    d_prev.mul_(mask[:n])
                if bypass:
                    dh[:n] += d_prev
                else:
                    dh[:n] = d_prev
        return tuple(_or(t, xs.new_empty(0)) for t in (dgx, dgh, dh, dc, part, dts, hrs))

    key = ("ext_bwd", mode, tuple(rows.sizes), a.reverse, x.device) if graph and N and not seq else None
    gains = _gains(e) or (None,) * 4
    dgx, dgh, dh, dc, part, dts, hrs = run_loop(key, loop, _present(
        saved.xs, saved.hs, saved.stats if ln else None, h_prev,
        c_prev, dy, dh_n, dc_n if lstm else None, a.w_hh, a.w_hr, *_fold_bias(a, e), *gains, e.zoneout_h,
        e.zoneout_c, e.rec_mask))
    mask = e.rec_mask
    if N and mask is not None:
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
