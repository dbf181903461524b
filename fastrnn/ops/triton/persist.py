"""Whole-sequence kernels for any H: one launch per layer and direction, the time loop inside the kernel.

The grid is laid out as the step kernels' (``step.py``): batch tiles x hidden slices, each program owning ``BB``
rows and ``BH`` hidden units with every gate of those units, and each step is the step kernels' tile function. What
changes is who runs the loop over time: the programs themselves, reading the step's row count and offset
from ``batch_sizes`` on the device, so the host issues one launch instead of one per step and Python never
sees a time step. A program loads its slice of W_hh once, before the time loop, where it fits
(``RESIDENT_BYTES``: Triton then keeps it in shared memory, as the CUDA engine does its slice), and otherwise
streams it from L2 every step as the step kernels do (an H200 keeps 60 MB there; one fp32 LSTM layer at
H = 1024 is 16 MB). Both read K in the same chunks in the same order, so they compute the same bits.

A step needs the previous step's ``h`` (backward: gate gradients) of every hidden unit, written by the
other slices of the same batch tile, so the slices of a tile meet at a barrier after each step: an atomic
counter per batch tile in global memory, each on a cache line of its own (release on arrival, acquire while
waiting). Batch tiles never
wait for each other. A barrier between programs only works if all of them are resident at once, hence
:func:`persist_config` refusing a grid larger than the GPU's SM count (every configuration fits at least
one program per SM; see ``benchmarks/kernel_report.py``) and a cooperative launch whenever programs wait
for each other. The previous step's rows are loaded ``volatile``
(bypassing L1, which is not coherent across SMs).

The Triton interpreter runs the programs of a launch one after another, so a program waiting for a later
one would never return: there, a grid of several slices is launched once per step (the launch boundary is
the barrier) with the barrier compiled out, and a single-slice grid runs the whole sequence in one launch
with the barrier compiled in (it then waits only for itself), or out as a GPU compiles it
(``INTERPRETED_BARRIER``). Both run the same kernel as the GPU.

No projection (``proj_size``): its per-step product mixes all hidden units after the cell; the step
kernels handle it.
"""

import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources, PTXASError

from fastrnn.ops.triton.cells import FP_FUSION, for_release, interpreting, release
from fastrnn.ops.triton.step import bwd_step_tile, fwd_step_tile, resident_w

ENV = "FASTRNN_PERSISTENT"


def enabled_by_default() -> bool:
    """Whether the automatic variant choice may pick ``"persist"``: only with ``FASTRNN_PERSISTENT=1`` (the
    switch the cpp backend's persistent engine has too) until a GPU run has measured it."""
    return os.environ.get(ENV) == "1"


# Tiles of the persist kernels: BB batch rows x BH hidden units (all their gates), BK-wide reduction chunks.
# 16-unit slices: the only ones whose forward and backward compile without spills for every mode and dtype on
# sm_80 and sm_90 with Triton 3.6 and 3.8 alike (benchmarks/kernel_report.py, searched over 4/8 warps and 1/2
# stages; at 32 units some (mode, dtype, arch) spills 8-16 B on one version or the other, where the loop over
# time keeps the tile's index arithmetic live). Forward double-buffers its chunks of W_hh; backward spilled
# with two stages on 3.8.
PERSIST_TILES = (
    {"BB": 16, "BH": 16, "BK": 32, "num_warps": 4, "fwd_stages": 2, "bwd_stages": 1},
    {"BB": 32, "BH": 16, "BK": 32, "num_warps": 8, "fwd_stages": 2, "bwd_stages": 1},
)
# What a Triton release changes in a tile (by its BB). Triton 3.9 (torch 2.15's) spilled 8 B in the 32-row
# forward of the 16-bit GRU on sm_90 (unaligned); one forward stage is clean there for every mode and dtype on
# both archs, but spilled 4 B in the 16-bit LSTM on sm_80 on 3.8; BK 16 or 64, 4 warps or 3 stages spilled on 3.9.
# At 16 rows 3.9 spilled 4-8 B in the streamed fp32 LSTM (unaligned) and bf16 tanh-RNN (16-aligned) forward on
# sm_90 with 4 warps (counted in Triton's own ptxas log), and one or three stages, or BK 64, did too. 8 warps
# compile every streamed 16-row kernel clean there, but the resident fp32 LSTM forward at H = 512 on sm_80 and the
# 16-bit tanh-RNN's at H = 128 on sm_90 then spilled (and would stream), so only the streamed kernels take them
# (``streamed_warps``; ``warps``).
PERSIST_OVERRIDES = {"3.9": {16: {"streamed_warps": 8}, 32: {"fwd_stages": 1}}}


def configs_for(version: str) -> Tuple[Dict[str, int], ...]:
    """``PERSIST_TILES`` as Triton release ``version`` ("3.9") compiles them."""
    return for_release(PERSIST_TILES, PERSIST_OVERRIDES, lambda tile: tile["BB"], version)


PERSIST_CONFIGS = configs_for(release())


def warps(cfg: Dict[str, int], chunks: int) -> int:
    """The warps of tile ``cfg``'s kernels holding ``chunks`` chunks of W_hh (``NK``; 0: streaming it): its
    ``streamed_warps`` where it streams and a release gave it some, else its ``num_warps``."""
    return cfg.get("streamed_warps", cfg["num_warps"]) if chunks == 0 else cfg["num_warps"]


def persist_config(B: int, H: int, max_programs: Optional[int]) -> Optional[Dict[str, int]]:
    """The tile (one of ``PERSIST_CONFIGS``) for ``B`` rows and ``H`` units, or ``None`` when its grid would
    exceed ``max_programs`` (the SM count: the barrier needs every program resident; ``None``: no limit, the
    interpreter's case).

    16-row tiles up to 16 rows, else 32: each batch tile streams all of W_hh from L2 once per step, so fewer,
    taller tiles move less.
    """
    cfg = PERSIST_CONFIGS[0 if B <= 16 else 1]
    n_tiles, n_slices = grid(B, H, cfg)
    return cfg if max_programs is None or n_tiles * n_slices <= max_programs else None


def grid(B: int, H: int, cfg: Dict[str, int]):
    return (triton.cdiv(B, cfg["BB"]), triton.cdiv(H, cfg["BH"]))


def device_programs(device: torch.device) -> Optional[int]:
    """How many programs of one launch are sure to be resident together: the SM count on CUDA, no limit
    under the interpreter."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


# Each batch tile's barrier counter on a 128-byte line of its own (32 int32), so that one tile's arrivals (atomics)
# and polls (acquire loads), both served at L2, do not queue behind another's (as the CUDA engine's kCounterStride).
COUNTER_STRIDE = tl.constexpr(32)


def barrier_counters(tiles: int, device: torch.device) -> torch.Tensor:
    """Zeroed barrier counters for a launch of ``tiles`` batch tiles (:func:`_barrier`)."""
    return torch.zeros(tiles * COUNTER_STRIDE.value, dtype=torch.int32, device=device)


# A counter is an int32 compared as such, and it counts every arrival of its launch: a launch may take at most
# this many, so a sequence whose barriers would count more (T x slices, past 2^31 from about 16 million steps at
# 132 slices) takes several launches, each from zeroed counters.
MAX_ARRIVALS = 2**31 - 1


# Under the interpreter a one-slice grid compiles the barrier in, waiting only for its own program, so that the
# tests run the barrier's code; False compiles what a GPU runs there instead (no barrier, plain loads, the forward's
# loop over K pipelined), which the tests run too.
INTERPRETED_BARRIER = True


def compiles_barrier(slices: int) -> bool:
    """Whether a launch of ``slices`` hidden slices compiles the barrier in (``SYNC``): where programs meet on a
    GPU, and under the interpreter as INTERPRETED_BARRIER says."""
    return slices > 1 or (interpreting() and INTERPRETED_BARRIER)


def launch_spans(T: int, arrivals_per_step: int) -> List[Tuple[int, int]]:
    """Consecutive step ranges ``[begin, end)`` covering ``T`` steps, one launch each, none of whose counters
    passes MAX_ARRIVALS at ``arrivals_per_step`` (the slices times the barriers per step)."""
    steps = max(1, MAX_ARRIVALS // max(1, arrivals_per_step))
    return [(k, min(k + steps, T)) for k in range(0, T, steps)]


@triton.jit
def _barrier(p_sync, target, SYNC: tl.constexpr):
    """Wait until ``target`` arrivals at this program's batch tile's counter (of :func:`barrier_counters`'s at
    ``p_sync``), counting this program's. Without ``SYNC`` only the program's own threads meet (what a
    single-slice grid needs between steps)."""
    tl.debug_barrier()
    if SYNC:
        p_count = p_sync + tl.program_id(0) * COUNTER_STRIDE
        tl.atomic_add(p_count, 1, sem="release")
        arrived = tl.atomic_add(p_count, 0, sem="acquire")
        while arrived < target:
            arrived = tl.atomic_add(p_count, 0, sem="acquire")
        tl.debug_barrier()


@triton.jit
def _step_rows(p_bs, p_off, T, t, t_other, has_other):
    """Row count and offset of step ``t`` and of the neighbouring step ``t_other`` (count 0 when absent)."""
    n_t = tl.load(p_bs + t)
    o_t = tl.load(p_off + t)
    t_o = tl.minimum(tl.maximum(t_other, 0), T - 1)
    n_o = tl.where(has_other, tl.load(p_bs + t_o), 0)
    o_o = tl.load(p_off + t_o)
    return n_t, o_t, n_o, o_o


# ``zero`` is always 0 and must stay a run-time value (see step.fwd_step_tile), hence never specialised; nor are the
# step range and T (Triton would compile apart T == 1, T % 16 == 0 and a range from 0), so that one compile serves
# every sequence length and is the one benchmarks/kernel_report.py checks.
@triton.jit(do_not_specialize=["zero", "k_begin", "k_end", "T"])
def _fwd_persist_kernel(
    p_x, p_b, p_w, p_h0, p_c0, p_bs, p_off, p_h, p_c, p_s, p_hn, p_sync,
    k_begin, k_end, T, H, zero,
    MODE: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, REVERSE: tl.constexpr,
    UPCAST: tl.constexpr, SYNC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
    NK: tl.constexpr,
):
    # Steps in processing order k (t = T-1-k in reverse); the state comes from the step processed before.
    n_slices = tl.num_programs(1)
    w_res = resident_w(p_w, H, H, G, False, BH, BK, NK)
    for k in range(k_begin, k_end):
        t = T - 1 - k if REVERSE else k
        n_t, o_t, n_p, o_p = _step_rows(p_bs, p_off, T, t, t + 1 if REVERSE else t - 1, k > 0)
        if tl.program_id(0) * BB < n_t:
            z = k * zero
            fwd_step_tile(p_x + o_t * (G * H), p_b + z, p_w + z, p_h + o_p * H, p_h0 + z, p_c + o_p * H, p_c0 + z,
                          p_h + o_t * H, p_c + o_t * H, p_s + o_t * (G * H), p_hn + o_t * H, n_t, n_p, H, H, z, w_res,
                          MODE, G, HAS_BIAS, SAVE, UPCAST, SYNC, BB, BH, BK, NK)
        if k + 1 < k_end:
            _barrier(p_sync, (k + 1 - k_begin) * n_slices, SYNC)


@triton.jit(do_not_specialize=["zero", "j_begin", "j_end", "T"])
def _bwd_persist_kernel(
    p_dy, p_dhs, p_dcs, p_w, p_s, p_hn, p_h, p_c, p_hp, p_cp, p_gh, p_gx, p_bs, p_off, p_sync,
    j_begin, j_end, T, H, zero,
    MODE: tl.constexpr, G: tl.constexpr, REVERSE: tl.constexpr, UPCAST: tl.constexpr, SYNC: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
):
    # j counts backward steps: processing position k = T-1-j, whose gradient arrives from position k+1.
    n_slices = tl.num_programs(1)
    w_res = resident_w(p_w, H, H, G, True, BH, BK, NK)
    for j in range(j_begin, j_end):
        k = T - 1 - j
        t = T - 1 - k if REVERSE else k
        n_t, o_t, n_n, o_n = _step_rows(p_bs, p_off, T, t, t - 1 if REVERSE else t + 1, k + 1 < T)
        if tl.program_id(0) * BB < n_t:
            z = j * zero
            bwd_step_tile(p_dy + o_t * H, p_dhs + z, p_dcs + z, p_gh + o_n * (G * H), p_w + z, p_s + o_t * (G * H),
                          p_hn + o_t * H, p_h + o_t * H, p_c + o_t * H, p_hp + o_t * H, p_cp + o_t * H,
                          p_gh + o_t * (G * H), p_gx + o_t * H, n_t, n_n, H, H, z, w_res,
                          MODE, G, False, UPCAST, SYNC, BB, BH, BK, NK)
        if j + 1 < j_end:
            _barrier(p_sync, (j + 1 - j_begin) * n_slices, SYNC)


# W_hh's slice stays on chip through the time loop (step.resident_w: Triton keeps a loop-invariant dot operand in
# shared memory, loaded once) where it takes at most this many bytes: within an A100's 163 KiB of shared memory
# per block beside a step's staged h chunks (the LSTM up to H = 512 in fp32 at 16-unit slices, and in 16-bit its
# forward up to H = 1024, its backward up to 512 by MAX_RESIDENT_CHUNKS).
# Beyond it, or where the compiled kernel spills or wants more shared memory than the device has, every step
# streams it from L2 (NK = 0).
RESIDENT_BYTES = 128 * 1024
# The chunks are unrolled (a tuple, indexed at compile time), so the compile grows with them: on sm_90 (Triton
# 3.8, no GPU needed) 2-3 s at 4-16 chunks, 14 s at 64 (the LSTM backward at H = 512), 53 s at 128.
MAX_RESIDENT_CHUNKS = 64


def resident_chunks(G: int, H: int, cfg: Dict[str, int], elem: int, backward: bool) -> int:
    """``NK`` of the persist kernels: how many ``BK``-row chunks of K (H forward, G*H backward) a program's
    resident W_hh slice has, or 0 where it would take more than ``RESIDENT_BYTES`` or ``MAX_RESIDENT_CHUNKS``
    (``elem``: W_hh's bytes per element)."""
    chunks = triton.cdiv(G * H if backward else H, cfg["BK"])
    size = chunks * cfg["BK"] * cfg["BH"] * elem * (1 if backward else G)
    return chunks if size <= RESIDENT_BYTES and chunks <= MAX_RESIDENT_CHUNKS else 0


_FIRST_CLEAN = {}  # (kernel, candidates, what its options follow from, specialisations, device) -> the one taken


def first_clean(kernel, grid, args, candidates: tuple, options_of, given: tuple):
    """The first of ``candidates`` whose compiled kernel does not spill on this device and fits its resources,
    ``None`` where none does (the first where this Triton does not say), compiled without launching and remembered
    per configuration: ``given``, what ``options_of(candidate)`` follows from for every candidate (options are only
    built on a miss: building them per launch cost ~0.2 ms), and what Triton specialises a compile on besides the
    options: the tensors' dtypes and 16-byte alignment, and of the ints it specialises (not the step range and T:
    do_not_specialize) divisibility by 16 and a value of 1."""
    fixed = [getattr(p, "do_not_specialize", False) for p in getattr(kernel, "params", ())]
    spec = tuple((a.dtype, a.data_ptr() % 16 == 0) if torch.is_tensor(a) else
                 None if i < len(fixed) and fixed[i] else (a % 16 == 0, a == 1) for i, a in enumerate(args))
    key = (kernel.fn.__name__, candidates, given, spec, args[0].device)
    if key not in _FIRST_CLEAN:
        taken = None
        for candidate in candidates:
            try:
                compiled = kernel.warmup(*args, grid=grid, **options_of(candidate))
                if not hasattr(compiled, "_init_handles"):
                    taken = candidate
                    break
                compiled._init_handles()  # loads the binary, which is where Triton reads its local memory size
            # more shared memory or threads than the device has, or an assembler that fails on it (as Triton's
            # autotuner treats one): the next candidate
            except (OutOfResources, PTXASError):
                continue
            if getattr(compiled, "n_spills", 0) == 0:
                taken = candidate
                break
        _FIRST_CLEAN[key] = taken
    return _FIRST_CLEAN[key]


def chunks_taken(backward: bool, B: int, H: int, device: torch.device) -> set:
    """The ``NK`` that GPU launches of the forward (or backward) persist kernel at ``B`` rows and ``H`` units on
    ``device`` took so far (``first_clean``'s choices, 0 where the resident kernel spilled or did not fit and
    the streamed one ran); empty before any, and under the interpreter, which takes the resident kernel as is."""
    name = (_bwd_persist_kernel if backward else _fwd_persist_kernel).fn.__name__
    return {taken or 0 for (kernel, _, given, _, dev), taken in _FIRST_CLEAN.items()
            if kernel == name and given[:2] == (B, H) and dev == device}


def _launch(kernel, args, T: int, B: int, H: int, device: torch.device, consts: Dict) -> None:
    """One launch over all ``T`` steps, or on the interpreter with several slices one per step (module
    docstring)."""
    cfg = persist_config(B, H, device_programs(device))
    g = grid(B, H, cfg)
    per_step = interpreting() and g[1] > 1
    sync = compiles_barrier(g[1])
    backward = kernel is _bwd_persist_kernel
    w_hh = args[3 if backward else 2]
    nk = resident_chunks(consts["G"], H, cfg, w_hh.element_size(), backward)
    # A cooperative launch makes the driver guarantee that every program is resident (or refuse the launch)
    # even beside other kernels on other streams, which the SM-count bound alone cannot.
    launch = {"launch_cooperative_grid": True} if g[1] > 1 and not interpreting() else {}
    counters = barrier_counters(g[0], device)  # one barrier per batch tile; unused per step

    def options(chunks: int, synced: bool) -> Dict:
        return dict(**consts, SYNC=synced, BB=cfg["BB"], BH=cfg["BH"], BK=cfg["BK"], NK=chunks,
                    num_warps=warps(cfg, chunks), num_stages=cfg["bwd_stages" if backward else "fwd_stages"],
                    enable_fp_fusion=FP_FUSION, **launch)

    if nk and not interpreting():
        taken = first_clean(kernel, g, (*args, counters, 0, T, T, H, 0), (nk, 0), lambda c: options(c, sync),
                            (B, H, device_programs(device), tuple(sorted(consts.items()))))
        nk = taken or 0
    spans = [(k, k + 1) for k in range(T)] if per_step else launch_spans(T, g[1])
    for begin, end in spans:
        if begin and not per_step:
            counters.zero_()  # ordered on the stream after the launch before, which counted in them
        kernel[g](*args, counters, begin, end, T, H, 0, **options(nk, sync and not per_step))


def fwd_persist(mode_id: int, G: int, xp, b_hh, w_hh, h0, c0, bs, off, hs, cs, gates, hn,
                save: bool, reverse: bool, upcast: bool) -> None:
    """The forward of every step into ``hs``/``cs`` (and, with ``save``, ``gates``/``hn``), all ``[N, *]``
    fp32 in time-major row order; ``bs``/``off`` are device int32/int64 ``[T]``."""
    B, H = h0.shape
    _launch(_fwd_persist_kernel, (xp, w_hh if b_hh is None else b_hh, w_hh, h0, c0, bs, off, hs, cs, gates, hn),
            bs.shape[0], B, H, xp.device,
            dict(MODE=mode_id, G=G, HAS_BIAS=b_hh is not None, SAVE=save, REVERSE=reverse, UPCAST=upcast))


def bwd_persist(mode_id: int, G: int, dy, dh_state, dc_state, w_hh, gates, hn, hs, cs, h_prev, c_prev, bs, off,
                g_h, g_x, reverse: bool, upcast: bool) -> None:
    """The backward of every step: gate gradients into ``g_h``/``g_x``; ``dh_state``/``dc_state`` ``[B, H]``
    fp32 enter as ``dh_n``/``dc_n`` and leave as the direct parts of ``dh0``/``dc0`` (as the step loop's)."""
    B, H = dh_state.shape
    _launch(_bwd_persist_kernel, (dy, dh_state, dc_state, w_hh, gates, hn, hs, cs, h_prev, c_prev, g_h, g_x, bs, off),
            bs.shape[0], B, H, dy.device, dict(MODE=mode_id, G=G, REVERSE=reverse, UPCAST=upcast))
