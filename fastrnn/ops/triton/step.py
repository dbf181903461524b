"""Fused step kernels: one launch per time step forward, one per step backward.

Each program owns a tile of ``BB`` batch rows x ``BH`` hidden units and every gate of those units, so the
recurrent product for its gate rows, the biases, the cell and the stores all happen in registers; gate
pre-activations never round-trip through memory.

Rows of step ``t`` are the prefix ``[0, n_rows)`` of the batch (packed sequences shrink it). The state a
row starts the step from is read from the previous step's output rows when the row was active there
(``row < n_prev``) and from the initial state otherwise, so no state buffer has to be copied for
inactive rows and the per-step outputs double as the values backward needs.
"""

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from fastrnn.ops.triton.cells import FP_FUSION, backward_tile, for_release, forward_tile, load_gates, mma, release


# (BB rows, BH units): warps and pipeline stages, forward and backward. Each entry is one that compiles without
# spills for every mode and dtype on sm_80 and sm_90 with Triton 3.6 and 3.8 alike (benchmarks/kernel_report.py,
# searched over 4/8 warps and 1/2 stages): 32-unit slices take 8 warps and double-buffer both directions (with
# 4 warps Triton 3.6 spilled the GRU forward at 16 rows on sm_90, with one backward stage the 16-bit LSTM
# backward at 32 rows on sm_80); 16-unit slices keep one backward stage, which two spilled on 3.8.
STEP_TILES = (
    {"BB": 16, "BH": 16, "BK": 32, "num_warps": 4, "fwd_stages": 2, "bwd_stages": 1},
    {"BB": 16, "BH": 32, "BK": 32, "num_warps": 8, "fwd_stages": 2, "bwd_stages": 2},
    {"BB": 32, "BH": 16, "BK": 32, "num_warps": 8, "fwd_stages": 2, "bwd_stages": 1},
    {"BB": 32, "BH": 32, "BK": 32, "num_warps": 8, "fwd_stages": 2, "bwd_stages": 2},
)
# What a Triton release changes in a tile, by its (BB, BH). Triton 3.9 (torch 2.15's) spilled 4 B in the 16-bit
# LSTM forward at 32 rows x 16 units on sm_90 (16-aligned, 8 warps); 4 warps compile that tile clean in both
# directions for every mode and dtype on both archs, where one forward stage moved the spill to the Elman cells and
# 16-wide chunks or three stages kept it.
STEP_OVERRIDES = {"3.9": {(32, 16): {"num_warps": 4}}}


def configs_for(version: str) -> Tuple[Dict[str, int], ...]:
    """``STEP_TILES`` as Triton release ``version`` ("3.9") compiles them."""
    return for_release(STEP_TILES, STEP_OVERRIDES, lambda tile: (tile["BB"], tile["BH"]), version)


STEP_CONFIGS = configs_for(release())


def step_config(n_rows: int, H: int) -> Dict[str, int]:
    """Tile sizes and warps for a step kernel, one of ``STEP_CONFIGS``.

    The step kernel is a skinny GEMM (``n_rows`` x ``G*H`` x ``Hout``) bound by reading W_hh each step, so
    tiles stay small to spread the weights over many programs: 16 rows unless the batch fills 32, 32
    hidden units and a 32-wide reduction chunk. Wider chunks or 64-unit slices spill the LSTM forward
    (4 gates x BB x BH fp32 accumulators) on sm_80/sm_90.
    Keyed on rows and H only, deterministically: an autotuner would benchmark by re-running kernels that
    update state in place, and would re-tune inside a CUDA graph capture.
    """
    bb, bh = (16 if n_rows <= 16 else 32), (32 if H > 16 else 16)
    return next(c for c in STEP_CONFIGS if c["BB"] == bb and c["BH"] == bh)


@triton.jit
def _load_prev(p_src, p_init, o_b, o_c, n_rows, n_prev, ncols, VOLATILE: tl.constexpr):
    """fp32 block ``[rows o_b, cols o_c]`` of the state a step starts from (previous step's rows or init).

    ``VOLATILE`` when other programs of the same launch wrote the previous rows (persist.py): such loads
    must bypass L1, which is not coherent across SMs and may hold a line read a step earlier."""
    m = (o_b < n_rows)[:, None] & (o_c < ncols)[None, :]
    prev = (o_b < n_prev)[:, None]
    off = o_b[:, None] * ncols + o_c[None, :]
    b_prev = tl.load(p_src + off, mask=m & prev, other=0.0, volatile=VOLATILE).to(tl.float32)
    b_init = tl.load(p_init + off, mask=m & ~prev, other=0.0).to(tl.float32)
    return b_prev + b_init


@triton.jit
def _step_tile(n_rows, H, z, BB: tl.constexpr, BH: tl.constexpr):
    """This program's rows and hidden units (grid: row tiles x hidden slices) and their masks; ``z`` is 0
    (see :func:`fwd_step_tile`)."""
    o_b = tl.program_id(0) * BB + z + tl.arange(0, BB)
    o_h = tl.program_id(1) * BH + z + tl.arange(0, BH)
    m_h = o_h < H
    return o_b, o_h, m_h, (o_b < n_rows)[:, None] & m_h[None, :]


@triton.jit
def resident_w(p_w, H, HO, G: tl.constexpr, BACKWARD: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
               NK: tl.constexpr):
    """This program's hidden slice of ``W_hh [G*H, HO]``, loaded once for a whole-sequence kernel's time loop: a
    tuple of ``NK`` chunks of ``BK`` rows of K, zero past its end. Forward (K = HO) a chunk is the tuple of its G
    gates' ``[BK, BH]`` tiles (element k, u: ``W_hh[g*H + u, k]``), as :func:`fwd_step_tile`'s streamed loads;
    ``BACKWARD`` (K = G*H) one ``[BK, BH]`` tile (element k, u: ``W_hh[k, u]``), as :func:`bwd_step_tile`'s."""
    o_h = tl.program_id(1) * BH + tl.arange(0, BH)
    m_h = o_h < H
    chunks = ()
    for i in tl.static_range(NK):
        o_k = i * BK + tl.arange(0, BK)
        if BACKWARD:
            m_w = (o_k < G * H)[:, None] & m_h[None, :]
            chunks = chunks + (tl.load(p_w + o_k.to(tl.int64)[:, None] * HO + o_h[None, :], mask=m_w, other=0.0),)
        else:
            m_w = (o_k < HO)[:, None] & m_h[None, :]
            p_wk = p_w + o_h.to(tl.int64)[None, :] * HO + o_k[:, None]
            s_g = tl.cast(H, tl.int64) * HO
            w0 = tl.load(p_wk, mask=m_w, other=0.0)
            w1 = w0
            w2 = w0
            w3 = w0
            if G > 1:
                w1 = tl.load(p_wk + s_g, mask=m_w, other=0.0)
                w2 = tl.load(p_wk + 2 * s_g, mask=m_w, other=0.0)
            if G > 3:
                w3 = tl.load(p_wk + 3 * s_g, mask=m_w, other=0.0)
            chunks = chunks + ((w0, w1, w2, w3),)
    return chunks


@triton.jit
def _resident_products(a0, a1, a2, a3, b_hk, w, G: tl.constexpr, UPCAST: tl.constexpr):
    """The gates' accumulators after one chunk ``b_hk`` of K times its resident tiles ``w`` (resident_w)."""
    a0 = mma(a0, b_hk, w[0], UPCAST)
    if G > 1:
        a1 = mma(a1, b_hk, w[1], UPCAST)
        a2 = mma(a2, b_hk, w[2], UPCAST)
    if G > 3:
        a3 = mma(a3, b_hk, w[3], UPCAST)
    return a0, a1, a2, a3


@triton.jit
def fwd_step_tile(
    p_x, p_b, p_w, p_hsrc, p_h0, p_csrc, p_c0, p_h, p_c, p_s, p_hn, n_rows, n_prev, H, HO, z, w_res,
    MODE: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, UPCAST: tl.constexpr,
    VOLATILE: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
):
    """One forward step for this program's tile; the pointers are the step's row blocks (see the module
    docstring), ``VOLATILE`` as :func:`_load_prev`'s. ``z`` is a zero the compiler cannot see through: a
    caller looping over steps passes ``step * zero`` (a run-time 0) so that nothing here looks invariant
    across its loop; hoisted, the tile's index and address tensors stayed live through the whole loop and
    spilled. ``NK`` 0: W_hh read from memory chunk by chunk; else ``w_res`` holds this slice's W_hh already,
    ``NK`` chunks of BK rows of K (:func:`resident_w`), and no step reads it again."""
    o_b, o_h, m_h, m_bh = _step_tile(n_rows, H, z, BB, BH)
    b_a0 = tl.zeros([BB, BH], dtype=tl.float32)
    b_a1 = tl.zeros([BB, BH], dtype=tl.float32)
    b_a2 = tl.zeros([BB, BH], dtype=tl.float32)
    b_a3 = tl.zeros([BB, BH], dtype=tl.float32)
    # W_hh offsets in int64: G*H*Hout passes 2^31 for H around 23k.
    o_wr = o_h.to(tl.int64) * HO
    s_g = tl.cast(H, tl.int64) * HO
    if NK == 0:
        # Not software-pipelined where the previous rows are another program's (VOLATILE): the pipeliner turns
        # the volatile load into an asynchronous copy, which drops the flag and, below 16-byte accesses, caches
        # in L1 (cp.async.ca). The gated cells' chunks half as wide there: at full width, without the pipeline's
        # shared-memory buffers, the 16-bit LSTM's forward spilled 4-12 B on Triton 3.8 and the GRU's 4 B on 3.9,
        # where the Elman cells' forward spilled 4-8 B at half width (benchmarks/kernel_report.py).
        KS: tl.constexpr = BK // 2 if VOLATILE and G > 1 else BK
        for k0 in tl.range(0, HO, KS, num_stages=1 if VOLATILE else None):
            o_k = k0 + tl.arange(0, KS)
            b_hk = _load_prev(p_hsrc, p_h0, o_b, o_k, n_rows, n_prev, HO, VOLATILE).to(p_w.dtype.element_ty)
            m_w = (o_k < HO)[:, None] & m_h[None, :]
            p_wk = p_w + o_wr[None, :] + o_k[:, None]
            b_a0 = mma(b_a0, b_hk, tl.load(p_wk, mask=m_w, other=0.0), UPCAST)
            if G > 1:
                b_a1 = mma(b_a1, b_hk, tl.load(p_wk + s_g, mask=m_w, other=0.0), UPCAST)
                b_a2 = mma(b_a2, b_hk, tl.load(p_wk + 2 * s_g, mask=m_w, other=0.0), UPCAST)
            if G > 3:
                b_a3 = mma(b_a3, b_hk, tl.load(p_wk + 3 * s_g, mask=m_w, other=0.0), UPCAST)
    else:
        for i in tl.static_range(NK):
            o_k = i * BK + z + tl.arange(0, BK)
            b_hk = _load_prev(p_hsrc, p_h0, o_b, o_k, n_rows, n_prev, HO, VOLATILE).to(p_w.dtype.element_ty)
            b_a0, b_a1, b_a2, b_a3 = _resident_products(b_a0, b_a1, b_a2, b_a3, b_hk, w_res[i], G, UPCAST)
    if HAS_BIAS:
        b_b0, b_b1, b_b2, b_b3 = load_gates(p_b, tl.zeros([1], dtype=tl.int32), o_h, 0, m_h[None, :], H, G)
        b_a0 += b_b0
        b_a1 += b_b1
        b_a2 += b_b2
        b_a3 += b_b3
    b_hp = b_a0
    b_cp = b_a0
    if MODE == 1:
        b_hp = _load_prev(p_hsrc, p_h0, o_b, o_h, n_rows, n_prev, H, VOLATILE)
    if MODE == 0:
        b_cp = _load_prev(p_csrc, p_c0, o_b, o_h, n_rows, n_prev, H, VOLATILE)
    forward_tile(MODE, G, SAVE, p_x, p_h, p_c, p_s, p_hn, o_b, o_h, m_bh, H, b_a0, b_a1, b_a2, b_a3, b_hp, b_cp)


# The row counts never specialised (Triton would compile apart a count of 1, as at B = 1 or a packed sequence's
# last steps, and a multiple of 16): the compile a launch takes is the one benchmarks/kernel_report.py checks.
@triton.jit(do_not_specialize=["n_rows", "n_prev"])
def _fwd_step_kernel(
    p_x, p_b, p_w, p_hsrc, p_h0, p_csrc, p_c0, p_h, p_c, p_s, p_hn,
    n_rows, n_prev, H, HO,
    MODE: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):
    fwd_step_tile(p_x, p_b, p_w, p_hsrc, p_h0, p_csrc, p_c0, p_h, p_c, p_s, p_hn, n_rows, n_prev, H, HO, 0, (),
                  MODE, G, HAS_BIAS, SAVE, UPCAST, False, BB, BH, BK, 0)


@triton.jit
def bwd_step_tile(
    p_dy, p_dhs, p_dcs, p_gprev, p_w, p_s, p_hn, p_h, p_c, p_hp, p_cp, p_gh, p_gx, n_rows, n_prev, H, HO, z, w_res,
    MODE: tl.constexpr, G: tl.constexpr, DH_GIVEN: tl.constexpr, UPCAST: tl.constexpr, VOLATILE: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
):
    """One backward step for this program's tile: ``p_gprev`` holds the gate gradients of the step
    processed before it (written by every hidden slice; ``VOLATILE`` as :func:`_load_prev`'s), ``p_dhs`` and
    ``p_dcs`` the ``[B, H]`` carried gradients, read and written by this tile alone; ``z``, ``w_res`` and ``NK``
    as :func:`fwd_step_tile`'s."""
    o_b, o_h, m_h, m_bh = _step_tile(n_rows, H, z, BB, BH)
    o_r = o_b[:, None] * H + o_h[None, :]
    b_dh = tl.zeros([BB, BH], dtype=tl.float32)
    if not DH_GIVEN:
        # dh_t = dG_{t+1} . W_hh[:, slice] + dy_t + dh_direct (or dh_n for a row's first backward step); the
        # product comes first so that no store mask is live across its loop (ptxas spilled one on sm_90).
        m_p = (o_b < n_prev)[:, None]
        if NK == 0:
            for k0 in range(0, G * H, BK):
                o_k = k0 + tl.arange(0, BK)
                m_k = o_k < G * H
                b_g = tl.load(p_gprev + o_b[:, None] * (G * H) + o_k[None, :], mask=m_p & m_k[None, :], other=0.0,
                              volatile=VOLATILE)
                p_wk = p_w + o_k.to(tl.int64)[:, None] * HO + o_h[None, :]
                b_w = tl.load(p_wk, mask=m_k[:, None] & m_h[None, :], other=0.0)
                b_dh = mma(b_dh, b_g.to(p_w.dtype.element_ty), b_w, UPCAST)
        else:
            for i in tl.static_range(NK):
                o_k = i * BK + z + tl.arange(0, BK)
                b_g = tl.load(p_gprev + o_b[:, None] * (G * H) + o_k[None, :], mask=m_p & (o_k < G * H)[None, :],
                              other=0.0, volatile=VOLATILE)
                b_dh = mma(b_dh, b_g.to(p_w.dtype.element_ty), w_res[i], UPCAST)
        b_dh += tl.load(p_dhs + o_r, mask=m_bh, other=0.0)
    b_dh += tl.load(p_dy + o_r, mask=m_bh, other=0.0).to(tl.float32)
    b_dc = b_dh
    if MODE == 0:
        b_dc = tl.load(p_dcs + o_r, mask=m_bh, other=0.0)
    _, _, _, _, b_dcp, b_dd = backward_tile(MODE, G, p_s, p_hn, p_h, p_c, p_hp, p_cp, p_gh, p_gx, o_b, o_h, m_bh, H,
                                            b_dh, b_dc)
    if MODE == 0:
        tl.store(p_dcs + o_r, b_dcp, mask=m_bh)
    if not DH_GIVEN:
        tl.store(p_dhs + o_r, b_dd, mask=m_bh)


@triton.jit(do_not_specialize=["n_rows", "n_prev"])
def _bwd_step_kernel(
    p_dy, p_dhs, p_dcs, p_gprev, p_w, p_s, p_hn, p_h, p_c, p_hp, p_cp, p_gh, p_gx,
    n_rows, n_prev, H, HO,
    MODE: tl.constexpr, G: tl.constexpr, DH_GIVEN: tl.constexpr, UPCAST: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):
    bwd_step_tile(p_dy, p_dhs, p_dcs, p_gprev, p_w, p_s, p_hn, p_h, p_c, p_hp, p_cp, p_gh, p_gx, n_rows, n_prev, H,
                  HO, 0, (), MODE, G, DH_GIVEN, UPCAST, False, BB, BH, BK, 0)


def _grid(n_rows: int, H: int, cfg: Dict[str, int]):
    return (triton.cdiv(n_rows, cfg["BB"]), triton.cdiv(H, cfg["BH"]))


def fwd_step(mode_id: int, G: int, x, b_hh, w_hh, h_src, h0, c_src, c0, h_out, c_out, gates, hn,
             n_rows: int, n_prev: int, save: bool, upcast: bool) -> None:
    """Launch one forward step over rows ``[0, n_rows)``; tensors are the step's row blocks; ``gates`` and
    ``hn`` are written only with ``save``."""
    H, HO = h_out.shape[1], w_hh.shape[1]
    cfg = step_config(n_rows, H)
    _fwd_step_kernel[_grid(n_rows, H, cfg)](
        x, w_hh if b_hh is None else b_hh, w_hh, h_src, h0, c_src, c0, h_out, c_out, gates, hn,
        n_rows, n_prev, H, HO,
        MODE=mode_id, G=G, HAS_BIAS=b_hh is not None, SAVE=save, UPCAST=upcast,
        BB=cfg["BB"], BH=cfg["BH"], BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["fwd_stages"],
        enable_fp_fusion=FP_FUSION,
    )


def bwd_step(mode_id: int, G: int, dy, dh_state, dc_state, g_prev, w_hh, gates, hn, h, c, h_prev, c_prev,
             g_h, g_x, n_rows: int, n_prev: int, dh_given: bool, upcast: bool) -> None:
    """Launch one backward step; with ``dh_given`` ``dy`` already is the full fp32 gradient of h."""
    H, HO = h.shape[1], w_hh.shape[1]
    cfg = step_config(n_rows, H)
    _bwd_step_kernel[_grid(n_rows, H, cfg)](
        dy, dh_state, dc_state, g_prev, w_hh, gates, hn, h, c, h_prev, c_prev, g_h, g_x,
        n_rows, n_prev, H, HO,
        MODE=mode_id, G=G, DH_GIVEN=dh_given, UPCAST=upcast,
        BB=cfg["BB"], BH=cfg["BH"], BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["bwd_stages"],
        enable_fp_fusion=FP_FUSION,
    )

