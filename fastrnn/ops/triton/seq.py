"""Whole-sequence kernels for small H: one launch per layer and direction, forward and backward.

One program owns ``BB`` batch rows and the whole hidden state, keeps W_hh (one ``[H, H]`` block per gate)
and the state in registers and loops over the time steps itself, so there is no per-step launch and no
grid-wide synchronisation: batch tiles never exchange data. That only pays while the weights fit on chip,
hence :func:`seq_config` returning ``None`` above a size that compiles without spills.

Packed input: step ``t`` is active for rows below ``batch_sizes[t]`` (read from the device), inactive rows
keep their state in registers via ``tl.where``; the LSTM projection is not supported here (the step
kernels handle it).
"""

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from fastrnn.ops import MODES
from fastrnn.ops.triton.cells import FP_FUSION, backward_tile, for_release, forward_tile, load_gates, mma, release

# fp32 stops at 16: at H = 32 Triton 3.9's LLVM aborts the whole process ("Instruction does not dominate all
# uses", a broken shuffle vectorisation) compiling the LSTM backward for sm_90 with 16-aligned arguments, so
# fp32 H in 17..32 takes the step kernels (benchmarks/kernel_report.py compiles every config to catch this).
SEQ_MAX_H = {torch.float32: 16, torch.float16: 64, torch.bfloat16: 64}
# GRU keeps hn apart from its gates (csrc/cell/cell.h's layout); the one more pointer live through the backward's
# time loop spilled 16 B at bf16 H = 64 on sm_90 (128 registers, 16-aligned), so 16-bit GRU stops at 32.
SEQ_MAX_H_GRU = {torch.float32: 16, torch.float16: 32, torch.bfloat16: 32}
# What a Triton release changes in seq_config's tile, by its BH. Triton 3.9 (torch 2.15's) spilled 12 B in the
# 16-bit LSTM forward at H 64 on sm_90 (unaligned, 4 warps at 255 registers); with 8 warps every H-64 kernel
# compiles clean there, both directions, archs and alignments (88-140 registers).
SEQ_OVERRIDES = {"3.9": {64: {"num_warps": 8}}}


def seq_max_h(dtype: torch.dtype, mode: str) -> int:
    """The largest H the whole-sequence kernels take for ``mode`` and ``dtype`` storage (0: none)."""
    return (SEQ_MAX_H_GRU if mode == "GRU" else SEQ_MAX_H).get(dtype, 0)


def seq_config(H: int, dtype: torch.dtype, mode: str) -> Optional[Dict[str, int]]:
    """Tile for the whole-sequence kernels, or ``None`` when W_hh would not stay in registers.

    The limits (``SEQ_MAX_H``, ``SEQ_MAX_H_GRU``) are the largest power-of-two H whose forward and backward
    kernels compile for sm_80 and sm_90 without spills (checked by tests/test_triton.py). Four warps (a release may
    change that: ``SEQ_OVERRIDES``): with eight, ptxas caps registers at 128 and the bf16 H=64 kernels spilled
    before Triton 3.9; one stage: the time loop is a serial chain and prefetching the next step's inputs spilled
    the small-H bf16 backward on sm_90.
    """
    if H > seq_max_h(dtype, mode):
        return None
    tile = {"BB": 16, "BH": max(16, triton.next_power_of_2(H)), "num_warps": 4, "num_stages": 1}
    return for_release((tile,), SEQ_OVERRIDES, lambda t: t["BH"], release())[0]


def seq_configs_for(dtype: torch.dtype, mode: str):
    """Every distinct configuration :func:`seq_config` can return for ``dtype`` and ``mode`` (for the AOT
    check)."""
    out = []
    H = 1
    while H <= seq_max_h(dtype, mode):
        cfg = seq_config(H, dtype, mode)
        if cfg not in out:
            out.append(cfg)
        H *= 2
    return out


@triton.jit
def _load_gate_weights(p_w, o_r, o_c, H, HO, G: tl.constexpr, TRANS: tl.constexpr):
    """W_hh gate blocks: ``[k, j] = W[g*H + j, k]`` (TRANS, for h @ W_g^T) or ``[j, k]`` (for dG @ W_g)."""
    if TRANS:
        p_0 = p_w + o_c[None, :] * HO + o_r[:, None]
        m = (o_r < HO)[:, None] & (o_c < H)[None, :]
    else:
        p_0 = p_w + o_r[:, None] * HO + o_c[None, :]
        m = (o_r < H)[:, None] & (o_c < HO)[None, :]
    b_w0 = tl.load(p_0, mask=m, other=0.0)
    b_w1 = b_w0
    b_w2 = b_w0
    b_w3 = b_w0
    if G > 1:
        b_w1 = tl.load(p_0 + H * HO, mask=m, other=0.0)
        b_w2 = tl.load(p_0 + 2 * H * HO, mask=m, other=0.0)
    if G > 3:
        b_w3 = tl.load(p_0 + 3 * H * HO, mask=m, other=0.0)
    return b_w0, b_w1, b_w2, b_w3


@triton.jit
def _seq_tile(p_w, B, H, G: tl.constexpr, TRANS: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """This program's batch rows, the hidden columns, their masks and the gate weight blocks."""
    o_b = tl.program_id(0) * BB + tl.arange(0, BB)
    o_h = tl.arange(0, BH)
    m_h = o_h < H
    m_bh = (o_b < B)[:, None] & m_h[None, :]
    o_s = o_b[:, None] * H + o_h[None, :]
    b_w0, b_w1, b_w2, b_w3 = _load_gate_weights(p_w, o_h, o_h, H, H, G, TRANS)
    return o_b, o_h, m_h, m_bh, o_s, b_w0, b_w1, b_w2, b_w3


@triton.jit
def _store_final(p_h, p_c, o_b, o_h, b_h, b_c, MODE: tl.constexpr, BH: tl.constexpr):
    # Final states go to tile-padded buffers without a mask: a mask kept live across the time loop
    # was spilled by ptxas (sm_80).
    o_p = o_b[:, None] * BH + o_h[None, :]
    tl.store(p_h + o_p, b_h)
    if MODE == 0:
        tl.store(p_c + o_p, b_c)


# T and B never specialised (Triton would compile apart T or B of 1 or a multiple of 16): one compile per tile
# serves every sequence, and is the one benchmarks/kernel_report.py checks.
@triton.jit(do_not_specialize=["T", "B"])
def _fwd_seq_kernel(
    p_x, p_b, p_w, p_h0, p_c0, p_bs, p_off, p_h, p_c, p_s, p_hn, p_hT, p_cT,
    T, B, H,
    MODE: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, REVERSE: tl.constexpr,
    UPCAST: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
):
    o_b, o_h, m_h, m_bh, o_s, b_w0, b_w1, b_w2, b_w3 = _seq_tile(p_w, B, H, G, True, BB, BH)
    b_bias0 = tl.zeros([1, BH], dtype=tl.float32)
    b_bias1 = b_bias0
    b_bias2 = b_bias0
    b_bias3 = b_bias0
    if HAS_BIAS:
        b_bias0, b_bias1, b_bias2, b_bias3 = load_gates(p_b, tl.zeros([1], dtype=tl.int32), o_h, 0,
                                                         m_h[None, :], H, G)
    b_h = tl.load(p_h0 + o_s, mask=m_bh, other=0.0).to(tl.float32)
    b_c = b_h
    if MODE == 0:
        b_c = tl.load(p_c0 + o_s, mask=m_bh, other=0.0).to(tl.float32)
    for i_s in range(T):
        i_t = T - 1 - i_s if REVERSE else i_s
        n_t = tl.load(p_bs + i_t)
        o_row = tl.load(p_off + i_t) + o_b.to(tl.int64)
        m_t = (o_b < n_t)[:, None] & m_h[None, :]
        b_hw = b_h.to(p_w.dtype.element_ty)
        zero = tl.zeros([BB, BH], dtype=tl.float32)
        b_a0 = mma(zero, b_hw, b_w0, UPCAST) + b_bias0
        b_a1 = b_a0
        b_a2 = b_a0
        b_a3 = b_a0
        if G > 1:
            b_a1 = mma(zero, b_hw, b_w1, UPCAST) + b_bias1
            b_a2 = mma(zero, b_hw, b_w2, UPCAST) + b_bias2
        if G > 3:
            b_a3 = mma(zero, b_hw, b_w3, UPCAST) + b_bias3
        b_hn, b_cn = forward_tile(MODE, G, SAVE, p_x, p_h, p_c, p_s, p_hn, o_row, o_h, m_t, H,
                                  b_a0, b_a1, b_a2, b_a3, b_h, b_c)
        b_h = tl.where(m_t, b_hn, b_h)
        if MODE == 0:
            b_c = tl.where(m_t, b_cn, b_c)
    _store_final(p_hT, p_cT, o_b, o_h, b_h, b_c, MODE, BH)


@triton.jit(do_not_specialize=["T", "B"])
def _bwd_seq_kernel(
    p_dy, p_dhn, p_dcn, p_w, p_s, p_hn, p_h, p_c, p_hp, p_cp, p_bs, p_off, p_gh, p_gx, p_dh0, p_dc0,
    T, B, H,
    MODE: tl.constexpr, G: tl.constexpr, REVERSE: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr,
):
    o_b, o_h, m_h, m_bh, o_s, b_w0, b_w1, b_w2, b_w3 = _seq_tile(p_w, B, H, G, False, BB, BH)
    b_dh = tl.load(p_dhn + o_s, mask=m_bh, other=0.0)
    b_dc = b_dh
    if MODE == 0:
        b_dc = tl.load(p_dcn + o_s, mask=m_bh, other=0.0)
    for i_s in range(T):
        i_t = i_s if REVERSE else T - 1 - i_s
        n_t = tl.load(p_bs + i_t)
        o_row = tl.load(p_off + i_t) + o_b.to(tl.int64)
        m_t = (o_b < n_t)[:, None] & m_h[None, :]
        o_rh = o_row[:, None] * H + o_h[None, :]
        b_dht = b_dh + tl.load(p_dy + o_rh, mask=m_t, other=0.0).to(tl.float32)
        b_g0, b_g1, b_g2, b_g3, b_dcp, b_dd = backward_tile(MODE, G, p_s, p_hn, p_h, p_c, p_hp, p_cp, p_gh, p_gx,
                                                            o_row, o_h, m_t, H, b_dht, b_dc)
        b_dhp = mma(b_dd, b_g0.to(p_w.dtype.element_ty), b_w0, UPCAST)
        if G > 1:
            b_dhp = mma(b_dhp, b_g1.to(p_w.dtype.element_ty), b_w1, UPCAST)
            b_dhp = mma(b_dhp, b_g2.to(p_w.dtype.element_ty), b_w2, UPCAST)
        if G > 3:
            b_dhp = mma(b_dhp, b_g3.to(p_w.dtype.element_ty), b_w3, UPCAST)
        b_dh = tl.where(m_t, b_dhp, b_dh)
        if MODE == 0:
            b_dc = tl.where(m_t, b_dcp, b_dc)
    _store_final(p_dh0, p_dc0, o_b, o_h, b_dh, b_dc, MODE, BH)


def fwd_seq(mode_id: int, G: int, xp, b_hh, w_hh, h0, c0, bs, off, hs, cs, gates, hn, h_n, c_n,
            save: bool, reverse: bool, upcast: bool) -> None:
    """Launch the forward whole-sequence kernel; ``bs``/``off`` are device int32/int64 ``[T]``, ``h_n`` and
    ``c_n`` come from ``host.padded_state``; ``gates`` and ``hn`` are written only with ``save``."""
    B, H = h0.shape
    cfg = seq_config(H, w_hh.dtype, MODES[mode_id])
    _fwd_seq_kernel[(triton.cdiv(B, cfg["BB"]),)](
        xp, w_hh if b_hh is None else b_hh, w_hh, h0, c0, bs, off, hs, cs, gates, hn, h_n, c_n,
        bs.shape[0], B, H,
        MODE=mode_id, G=G, HAS_BIAS=b_hh is not None, SAVE=save, REVERSE=reverse, UPCAST=upcast,
        BB=cfg["BB"], BH=cfg["BH"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=FP_FUSION,
    )


def bwd_seq(mode_id: int, G: int, dy, dh_n, dc_n, w_hh, gates, hn, hs, cs, h_prev, c_prev, bs, off,
            g_h, g_x, dh0, dc0, reverse: bool, upcast: bool) -> None:
    """Launch the backward whole-sequence kernel (reverse of the forward processing order); ``dh0`` and
    ``dc0`` come from ``host.padded_state``."""
    B, H = dh_n.shape
    cfg = seq_config(H, w_hh.dtype, MODES[mode_id])
    _bwd_seq_kernel[(triton.cdiv(B, cfg["BB"]),)](
        dy, dh_n, dc_n, w_hh, gates, hn, hs, cs, h_prev, c_prev, bs, off, g_h, g_x, dh0, dc0,
        bs.shape[0], B, H,
        MODE=mode_id, G=G, REVERSE=reverse, UPCAST=upcast,
        BB=cfg["BB"], BH=cfg["BH"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=FP_FUSION,
    )
