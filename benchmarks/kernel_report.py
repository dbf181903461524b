"""Registers, shared memory and spills of every Triton kernel configuration, compiled ahead of time.

No GPU is needed: each configuration the launch heuristics can pick (``triton_step.STEP_CONFIGS``,
``triton_persist.PERSIST_CONFIGS``, ``triton_seq.seq_configs_for``) is compiled with ``triton.compile`` for
sm_80 and sm_90 and the PTX is run (``ptxas -v``) through the ptxas Triton itself assembles that target with
(``ptxas_tool``: Triton 3.9 uses its ``ptxas-blackwell`` from sm_90 on, Triton 3.8 its ``ptxas`` below
sm_100) with the flags Triton passes it (``triton_ptxas_flags``: ``--fmad=false`` without fp fusion, and from
3.8 ``--regAllocOptLevel=2``) for register and spill counts; the report names each tool and its version.
``--triton-log`` reads Triton's own ptxas run instead (every kernel compiled afresh, so slower). Without
Triton's flags the counts differed on Triton 3.9 for sm_90 (6 spilling configurations missed, 167 rows off),
not on 3.8 (all 2,740 configurations of the full report the same; 2026-12-07).
Specialisations that only remove work (no bias, forward direction) are not compiled separately: the
configurations below carry the bias and every optional input of their mode.

Usage: ``python benchmarks/kernel_report.py [--quick] [--check] [--no-cuda] [--triton-log] [--out FILE] [--jobs N]``.
``--check`` exits 1 when any configuration spills, or when a kernel whose programs meet at a barrier reads what
the others wrote through an L1-caching asynchronous copy; ``--quick`` compiles one storage dtype per width
(fp32 and bf16) instead of all three. Must run without ``TRITON_INTERPRET`` (the interpreter replaces
the kernels' compiled form).
"""

import argparse
import concurrent.futures
import contextlib
import functools
import io
import os
import re
import subprocess
import sys
import tempfile
import unittest.mock
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastrnn import _buildcfg  # noqa: E402
from fastrnn.ops import GATES, MODES  # noqa: E402
from fastrnn.ops.triton import ext as triton_ext  # noqa: E402
from fastrnn.ops.triton import persist as triton_persist  # noqa: E402
from fastrnn.ops.triton import seq as triton_seq  # noqa: E402
from fastrnn.ops.triton import step as triton_step  # noqa: E402
from fastrnn.ops.triton.cells import FP_FUSION  # noqa: E402

ARCHS = (80, 90)
TT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Pointer arguments in the storage dtype; the others are fp32 (input projection, state, saved values).
STORAGE_PTRS = {"p_b", "p_w", "p_h0", "p_c0", "p_dy"}
# The same for fastrnn's cells (triton_ext): LayerNorm gains, zoneout weights, the mask, y and dy.
EXT_STORAGE_PTRS = {"p_gx", "p_gh", "p_gc", "p_sc", "p_g", "p_zh", "p_zc", "p_m", "p_y", "p_dy"}
# Hidden sizes whose row-kernel tile (triton_ext.row_config) the report compiles: one per tile, 256 for the
# widest (wider rows loop over MAX_CHUNK-column chunks in the same code); --quick the widest and one narrow.
EXT_HIDDEN = (16, 32, 64, 128, 256)
EXT_HIDDEN_QUICK = (64, 256)
# Hidden sizes of the persist kernels holding W_hh (their resident chunks unrolled: the kernel grows with H): the
# standard configurations' smallest, and their largest within persist.RESIDENT_BYTES in fp32; --quick the first.
RESIDENT_HIDDEN = (128, 512)
RESIDENT_HIDDEN_QUICK = (128,)
INDEX_PTRS = {"p_bs": "*i32", "p_off": "*i64", "p_sync": "*i32"}
ALIGNED_INTS = {"H", "HO", "n", "CW"}  # CW: a seq plan's product columns, G * H or H
LAUNCHES = {
    "step": ("1 fused step kernel (+1 torch mm with proj)", "1 fused step kernel (+3 torch ops with proj)"),
    "seq": ("1 per sequence (0 per step)", "1 per sequence (0 per step)"),
    "persist": ("1 per sequence + 1 memset (0 per step; a barrier per step)",
                "1 per sequence + 1 memset (0 per step; a barrier per step)"),
    "ext (fastrnn's cells)": ("1 torch mm + 1 row kernel (+2 to 4 torch ops with proj)",
                              "1 row kernel + 1 torch mm (+1 to 2 elementwise torch ops; +3 to 4 with proj)"),
    "ext seq (fastrnn's cells, no proj)": ("1 per sequence (0 per step)", "1 per sequence (0 per step)"),
    "ext persist (fastrnn's cells, no proj)": ("1 per sequence + 1 memset (0 per step; 2 barriers per step)",
                                               "1 per sequence + 1 memset (0 per step; 2 barriers per step)"),
}


def kernel_specs(quick: bool) -> List[Dict]:
    """Every (kernel, mode, dtype, tile) combination to compile."""
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.float16, torch.bfloat16)
    specs = []
    for mode in MODES:
        mode_id, G = MODES.index(mode), GATES[mode]
        for dtype in dtypes:
            for tile in triton_step.STEP_CONFIGS:
                tiles = {k: tile[k] for k in ("BB", "BH", "BK")}
                specs.append(dict(kernel="step_fwd", fn=triton_step._fwd_step_kernel, mode=mode, dtype=dtype,
                                  warps=tile["num_warps"], stages=tile["fwd_stages"],
                                  const=dict(MODE=mode_id, G=G, HAS_BIAS=True, SAVE=True, UPCAST=False, **tiles)))
                for dh_given in ((False, True) if mode == "LSTM" else (False,)):
                    specs.append(dict(kernel="step_bwd" + ("_proj" if dh_given else ""),
                                      fn=triton_step._bwd_step_kernel, mode=mode, dtype=dtype,
                                      warps=tile["num_warps"], stages=tile["bwd_stages"],
                                      const=dict(MODE=mode_id, G=G, DH_GIVEN=dh_given, UPCAST=False, **tiles)))
            for tile in triton_persist.PERSIST_CONFIGS:
                tiles = {k: tile[k] for k in ("BB", "BH", "BK")}
                streamed = (dict(kernel="persist_fwd", fn=triton_persist._fwd_persist_kernel, mode=mode,
                                 dtype=dtype, warps=triton_persist.warps(tile, 0), stages=tile["fwd_stages"],
                                 const=dict(MODE=mode_id, G=G, HAS_BIAS=True, SAVE=True, REVERSE=False,
                                            UPCAST=False, SYNC=True, NK=0, **tiles)),
                            dict(kernel="persist_bwd", fn=triton_persist._bwd_persist_kernel, mode=mode,
                                 dtype=dtype, warps=triton_persist.warps(tile, 0), stages=tile["bwd_stages"],
                                 const=dict(MODE=mode_id, G=G, REVERSE=False, UPCAST=False, SYNC=True, NK=0,
                                            **tiles)))
                specs += streamed
                if not quick or tile is triton_persist.PERSIST_CONFIGS[0]:
                    specs += resident_specs(streamed, tile, RESIDENT_HIDDEN_QUICK if quick else RESIDENT_HIDDEN)
            for cfg in triton_seq.seq_configs_for(dtype, mode):
                tiles = {"BB": cfg["BB"], "BH": cfg["BH"]}
                specs.append(dict(kernel="seq_fwd", fn=triton_seq._fwd_seq_kernel, mode=mode, dtype=dtype,
                                  warps=cfg["num_warps"], stages=cfg["num_stages"],
                                  const=dict(MODE=mode_id, G=G, HAS_BIAS=True, SAVE=True, REVERSE=False, UPCAST=False,
                                             **tiles)))
                specs.append(dict(kernel="seq_bwd", fn=triton_seq._bwd_seq_kernel, mode=mode, dtype=dtype,
                                  warps=cfg["num_warps"], stages=cfg["num_stages"],
                                  const=dict(MODE=mode_id, G=G, REVERSE=False, UPCAST=False, **tiles)))
    specs += ext_specs(dtypes, EXT_HIDDEN_QUICK if quick else EXT_HIDDEN)
    return [dict(spec, aligned=aligned, fallbacks=[dict(f, aligned=aligned) for f in spec.get("fallbacks", [])])
            for spec in specs for aligned in ((True,) if spec.get("aligned_only") else (False, True))]


def resident_specs(streamed, tile: Dict, hidden) -> List[Dict]:
    """The persist kernels (``streamed``: forward and backward reading W_hh every step) holding their W_hh slice
    through the time loop at each of the ``hidden`` sizes, where ``persist.resident_chunks`` takes it: a launch
    compiles that first and streams where it spills (``persist.first_clean``), so the streamed kernel is the
    fallback here. Aligned only: the sizes are multiples of 16."""
    specs = []
    for H in hidden:
        for spec in streamed:
            backward = spec["kernel"] == "persist_bwd"
            elem = torch.empty(0, dtype=spec["dtype"]).element_size()
            nk = triton_persist.resident_chunks(spec["const"]["G"], H, tile, elem, backward)
            name = "x".join(f"{k}{tile[k]}" for k in ("BB", "BH", "BK"))
            if nk:
                specs.append(dict(spec, const=dict(spec["const"], NK=nk), warps=triton_persist.warps(tile, nk),
                                  tiles=f"{name}, NK{nk} (H {H})",
                                  aligned_only=True, fallbacks=[dict(spec, tiles=f"{name}, streamed (H {H})")]))
    return specs


def ext_specs(dtypes, hidden) -> List[Dict]:
    """fastrnn's cells (LayerNorm, zoneout, recurrent dropout): every feature on, per tile of the ``hidden``
    sizes."""
    specs = []
    for H in hidden:
        cfg = triton_ext.row_config(H)
        common = dict(warps=cfg["num_warps"], stages=1, storage=EXT_STORAGE_PTRS,
                      tiles=f"BR{cfg['BR']}xBC{cfg['BC']} (H {H})")
        for dtype in dtypes:
            for mode in MODES:
                ids = dict(MODE=MODES.index(mode), G=GATES[mode], LN=True, BR=cfg["BR"], BC=cfg["BC"])
                lstm = mode == "LSTM"
                specs.append(dict(common, kernel="ext_fwd", fn=triton_ext._fwd_kernel, mode=mode, dtype=dtype,
                                  const=dict(ids, SAVE=True, STORE=True, ZONE_H=True, ZONE_C=lstm, MASK=True,
                                             WRITE_Y=True)))
                specs.append(dict(common, kernel="ext_bwd", fn=triton_ext._bwd_kernel, mode=mode, dtype=dtype,
                                  const=dict(ids, ZONE_H=True, ZONE_C=lstm, HAS_DY=True, BYPASS=True,
                                             WRITE_HR=False, SPLIT=True)))
                if lstm:
                    specs.append(dict(common, kernel="ext_bwd_proj", fn=triton_ext._bwd_kernel, mode=mode,
                                      dtype=dtype, const=dict(ids, ZONE_H=False, ZONE_C=True, HAS_DY=False,
                                                              BYPASS=False, WRITE_HR=True, SPLIT=True)))
                specs += ext_seq_specs(common, ids, mode, dtype, H)
            # the input projection's LayerNorm rows are G*H wide: their launches pick among the same chunks
            for kernel, fn in (("ext_ln_rows", triton_ext._ln_rows_kernel),
                               ("ext_ln_rows_bwd", triton_ext._ln_rows_bwd_kernel)):
                specs.append(dict(common, kernel=kernel, fn=fn, mode="any", dtype=dtype,
                                  const=dict(BR=cfg["BR"], BC=cfg["BC"])))
    return specs


BOTH_PASSES = triton_ext.PRODUCT.value | triton_ext.ROWS.value  # a GPU launch runs both passes of every step


def ext_seq_specs(common: Dict, ids: Dict, mode: str, dtype: torch.dtype, H: int) -> List[Dict]:
    """The whole-sequence kernels of fastrnn's cells at hidden size ``H``: the "seq" tiles (one slice, no barrier
    across programs) and the "persist" tiles of both row heights (B = 1 and larger), barrier and volatile loads
    compiled in, as a GPU launch with several slices compiles them."""
    G, lstm = GATES[mode], mode == "LSTM"
    kinds = [("ext_seq", False, lambda bwd, _tile: triton_ext.seq_tiles(H, G, bwd))]
    # The persist plans a GPU takes (H >= ext.PERSIST_MIN_H): B = 1 on an H200's 132 SMs (one-row tiles, a row
    # pass per slice); 16-row tiles there (a row per slice where there are 16 slices or more, else all in the first);
    # and on 4 programs (all rows in the first slice). A launch takes the first of PERSIST_TILES that compiles
    # without spilling (ext._spill_free): the report compiles them in that order (``fallbacks``), shows the one taken.
    kinds += [("ext_persist", True, lambda bwd, tile, b=b, sms=sms: triton_ext.persist_tiles(b, H, G, bwd, sms, tile))
              for b, sms in ((1, 132), (2, 132), (2, 4))]
    fwd_const = dict(ids, SAVE=True, STORE=True, RAW=True, ZONE_H=True, ZONE_C=lstm, MASK=True, REVERSE=False,
                     PASSES=BOTH_PASSES)
    bwd_const = dict(ids, ZONE_H=True, ZONE_C=lstm, BYPASS=True, SPLIT=True, MASK=True, REVERSE=False,
                     PASSES=BOTH_PASSES)
    specs, seen = [], set()
    for name, sync, tiles_of in kinds:  # sync: the barrier and volatile loads, where a plan has several slices
        for backward, fn, const in ((False, triton_ext._fwd_seq_kernel, fwd_const),
                                    (True, triton_ext._bwd_seq_kernel, bwd_const)):
            tiles = [tiles_of(backward, tile) for tile in (triton_ext.PERSIST_TILES if sync else (None,))]
            if tiles[0] is None or (name, backward, str(tiles[0])) in seen:  # None: persist takes no such H on a GPU
                continue
            seen.add((name, backward, str(tiles[0])))
            found = [dict(common, kernel=f"{name}_{'bwd' if backward else 'fwd'}", warps=t["num_warps"], fn=fn,
                          mode=mode, dtype=dtype, tiles=seq_tiles_name(t, H), divisible=("CW",) if sync else (),
                          const=dict(const, ONE_SLICE=t["S"] == 1, SYNC=sync and t["S"] > 1, **seq_consts(t)))
                     for t in tiles]
            specs.append(dict(found[0], fallbacks=found[1:]))
    return specs


def seq_tiles_name(tiles: Dict, H: int) -> str:
    return f"BR{tiles['BR']}xBC{tiles['BC']}, RB{tiles['RB']}, BN{tiles['BN']}xBK{tiles['BK']} (H {H})"


def seq_consts(tiles: Dict) -> Dict:
    """The constexprs of a whole-sequence kernel's tile (``triton_ext.seq_tiles``/``persist_tiles``), not the row
    kernels' ``BR``/``BC``."""
    return {k: tiles[k] for k in ("BR", "RB", "BC", "BN", "BK")}


def alignment_attrs(spec: Dict) -> Dict:
    """With ``aligned``, what Triton's launcher assumes for 16-byte aligned tensors and H % 16 == 0: every
    pointer and the width arguments divisible by 16 (row counts and T stay unconstrained; the whole-sequence
    kernels never specialise their step range and T). ``divisible``: the ints divisible by 16 whatever H (a
    persist plan's slice width, a multiple of 16 columns)."""
    names = [n for n in spec["fn"].arg_names if n not in spec["const"]]
    div = set(spec.get("divisible", ()))
    if spec["aligned"]:
        div |= {n for n in names if n.startswith("p_") or n in ALIGNED_INTS}
    return {(spec["fn"].arg_names.index(n),): [["tt.divisibility", 16]] for n in names if n in div}


def signature(spec: Dict) -> Dict[str, str]:
    fn, dt = spec["fn"], TT_DTYPE[spec["dtype"]]
    proj_dy = spec["const"].get("DH_GIVEN", False)
    storage_ptrs = spec.get("storage", STORAGE_PTRS)
    sig = {}
    for name in fn.arg_names:
        if name in spec["const"]:
            sig[name] = "constexpr"
        elif name in INDEX_PTRS:
            sig[name] = INDEX_PTRS[name]
        elif name.startswith("p_"):
            storage = name in storage_ptrs and not (name == "p_dy" and proj_dy)
            sig[name] = "*" + (dt if storage else "fp32")
        else:
            sig[name] = "i32"
    return sig


def ptxas_tool(cc: int) -> Tuple[str, str, str]:
    """``(path, version, gpu_name)`` of the ptxas Triton runs for compute capability ``cc``.

    Asked of Triton's NVIDIA backend rather than assumed: the PTX it emits must go through the assembler it
    picked for that target (Triton 3.9's PTX 9.4 for sm_90 is beyond its CUDA 12.9 ``ptxas``). Honours
    ``TRITON_PTXAS_PATH``/``TRITON_PTXAS_BLACKWELL_PATH`` as Triton does.
    """
    from triton.backends.nvidia import compiler as nv

    tool = nv.get_ptxas(cc)
    return tool.path, tool.version, nv.sm_arch_from_capability(cc)


def describe_tools() -> List[str]:
    """One line per arch naming the ptxas used, relative to the triton package when it ships there."""
    root = os.path.dirname(os.path.dirname(triton.__file__))
    lines = []
    for cc in ARCHS:
        path, version, arch = ptxas_tool(cc)
        shown = os.path.relpath(path, root) if path.startswith(root + os.sep) else path
        lines.append(f"{arch}: `{shown}`, CUDA {version}")
    return lines


@contextlib.contextmanager
def _triton_ptxas_log():
    """Triton compiles afresh (no cache hit, which would skip its ptxas) and prints its ptxas's ``-v`` log."""
    knobs = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}
    before = {k: os.environ.get(k) for k in knobs}
    os.environ.update(knobs)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


@triton.jit
def _store_one(p):
    tl.store(p, 1.0)


@functools.lru_cache(maxsize=None)
def triton_ptxas_flags(cc: int) -> Tuple[str, ...]:
    """The flags Triton passes its ptxas for ``cc`` with the report's options, read off its command as it assembles
    a one-store kernel: ``--fmad=false`` without fp fusion, and from 3.8 ``--regAllocOptLevel=2``, which changes
    registers and spills through Triton 3.9's ptxas for sm_90 (``--triton-log`` found 6 spills there that a plain
    ``ptxas -v`` did not see)."""
    ptxas, _, _ = ptxas_tool(cc)
    commands = []
    run = subprocess.run

    def record(cmd, *args, **kwargs):
        if isinstance(cmd, (list, tuple)) and cmd and cmd[0] == ptxas:
            commands.append(list(cmd))
        return run(cmd, *args, **kwargs)

    src = ASTSource(fn=_store_one, signature={"p": "*fp32"}, constexprs={})
    with _triton_ptxas_log(), contextlib.redirect_stdout(io.StringIO()), unittest.mock.patch("subprocess.run",
                                                                                              record):
        triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 1,
                                                                        "enable_fp_fusion": FP_FUSION})
    (cmd,) = [c for c in commands if "-o" in c]  # not its `ptxas --version`
    out = cmd.index("-o")
    return tuple(a for i, a in enumerate(cmd[1:], 1) if i not in (out, out + 1) and not a.endswith(".ptx"))


def compile_one(spec: Dict, cc: int, triton_log: bool = False) -> Dict:
    """Resources of ``spec`` compiled for ``cc``: from a ptxas run of ours with Triton's flags on the PTX (Triton's
    cache serves the PTX), or with ``triton_log`` from Triton's own ptxas run, which compiles every kernel
    afresh."""
    warps = spec["warps"]
    src = ASTSource(fn=spec["fn"], signature=signature(spec), constexprs=spec["const"], attrs=alignment_attrs(spec))
    options = {"num_warps": warps, "num_stages": spec["stages"], "enable_fp_fusion": FP_FUSION}
    ptxas, _, arch = ptxas_tool(cc)
    if triton_log:
        log = io.StringIO()
        with _triton_ptxas_log(), contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        text = log.getvalue()
    else:
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            text = subprocess.run([ptxas, *triton_ptxas_flags(cc), ptx, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True, check=True).stderr
    (info,) = _buildcfg.parse_ptxas(text)[arch.removeprefix("sm_")].values()
    # a kernel whose programs read rows other programs of the launch wrote (SYNC: they meet at a barrier) must
    # read them past L1, which is not coherent across SMs; the software pipeliner makes a volatile load below
    # 16-byte accesses an asynchronous copy that caches there (cp.async.ca). Such kernels take none at all, so
    # the check counts every one rather than telling W_hh's (read-only, harmless) from the state's.
    l1_copies = kernel.asm["ptx"].count("cp.async.ca.") if spec["const"].get("SYNC") else 0
    # Triton's shared memory is dynamic, so ptxas does not see it; Triton's metadata has the size.
    return dict(info, smem=kernel.metadata.shared, warps=warps, cc=cc, l1_copies=l1_copies)


def _run(args) -> Dict:
    """The compiled resources of spec ``index``, or of the first of its fallbacks that does not spill where it
    does (``tiles`` then names the one taken)."""
    index, quick, cc, triton_log = args
    spec = kernel_specs(quick)[index]
    for candidate in [spec] + spec.get("fallbacks", []):
        res = dict(compile_one(candidate, cc, triton_log), tiles=candidate.get("tiles"))
        if not (res["spill_stores"] or res["spill_loads"] or res["stack"]):
            break
    return res


def collect(quick: bool, jobs: int, triton_log: bool = False) -> List[Dict]:
    specs = kernel_specs(quick)
    work = [(i, quick, cc, triton_log) for i in range(len(specs)) for cc in ARCHS]
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_run, work))
    else:
        results = [_run(w) for w in work]
    rows = []
    for (i, _, _, _), res in zip(work, results):
        s = specs[i]
        tiles = res.pop("tiles") or "x".join(f"{k}{s['const'][k]}" for k in ("BB", "BH", "BK") if k in s["const"])
        rows.append(dict(res, kernel=s["kernel"], mode=s["mode"], dtype=TT_DTYPE[s["dtype"]], tiles=tiles,
                         align="16" if s["aligned"] else "any"))
    return rows


def _kernel_name(mangled: str) -> str:
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    return demangled.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0]


def cuda_rows(objects: Optional[str] = None) -> List[Dict]:
    """The C++ backend's .cu kernels through ``fastrnn._buildcfg.ptxas_report`` (needs nvcc); ``objects``: a folder
    to keep the objects in, for ``loop_rows``."""
    rows = []
    for arch, kernels in _buildcfg.ptxas_report(objects=objects).items():
        for name, info in kernels.items():
            rows.append(dict(info, kernel=_kernel_name(name), arch=arch))
    return rows


def loop_rows(objects: str) -> List[Dict]:
    """The persistent engine's inner loops in the SASS of the objects ``cuda_rows(objects)`` kept: per kernel and
    arch, its SIMT K loop's instructions per K step and its tensor-core loop's per mma.sync
    (``_buildcfg.persist_loop_costs``). Needs cuobjdump (``_buildcfg.cuobjdump_path``)."""
    tool = _buildcfg.cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (beside nvcc, or Triton's)")
    rows = []
    for arch in _buildcfg.cuda_archs():
        sass = subprocess.run([tool, "-sass", "-arch", f"sm_{arch}", os.path.join(objects, "persist_cuda.o")],
                              capture_output=True, text=True, check=True).stdout
        for name, loops in _buildcfg.sass_loops(sass).items():
            rows.append(dict(_buildcfg.persist_loop_costs(loops), kernel=_kernel_name(name), arch=arch))
    return rows


def markdown(rows: List[Dict], cuda, loops=None, triton_log: bool = False) -> str:
    source = ("Triton's own ptxas run (`--triton-log`: its `-v` log)" if triton_log
              else "a ptxas run on the PTX Triton emits, with the flags Triton passes")
    out = ["# Kernel resources (ahead-of-time compile, no GPU run)", "",
           "Triton " + triton.__version__ + f" (enable_fp_fusion={FP_FUSION}); registers and spills from "
           f"{source}, through the ptxas Triton picks per target:", "",
           *(f"- {line}" for line in describe_tools()), "",
           "Shared memory from Triton's metadata. Nothing here has run on a GPU.", "",
           "`align`: `any` compiles for arbitrary H and pointers, `16` with the divisibility Triton's launcher "
           "assumes when H % 16 == 0 and tensors are 16-byte aligned (both can be picked at run time).", "",
           "| kernel | mode | dtype | tiles | align | warps | sm | regs | smem B | stack B | spill st B | spill ld B |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['kernel']} | {r['mode']} | {r['dtype']} | {r['tiles']} | {r['align']} | {r['warps']} | "
                   f"{r['cc']} | "
                   f"{r['registers']} | {r['smem']} | {r['stack']} | {r['spill_stores']} | {r['spill_loads']} |")
    out += ["", "## Launches per time step", "", "| variant | forward | backward |", "| --- | --- | --- |"]
    for variant, (fwd, bwd) in LAUNCHES.items():
        out.append(f"| {variant} | {fwd} | {bwd} |")
    out += ["", "Outside the loop: one input-projection GEMM forward; backward one gather of h_{t-1} (and "
            "c_{t-1}), one dh0 GEMM (step variant) and the dx/dW_ih/dW_hh(/dW_hr) GEMMs and bias sums.", "",
            "## CUDA kernels (C++ backend, `fastrnn._buildcfg.ptxas_report`)", "",
            f"nvcc {_buildcfg.nvcc_version() or 'not found'} (`nvcc -Xptxas -v`, the build's flags).", ""]
    if isinstance(cuda, str):
        out.append(cuda)
    else:
        out += ["| kernel | sm | regs | static smem B | stack B | spill st B | spill ld B |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in cuda:
            out.append(f"| `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['smem']} | {r['stack']} | "
                       f"{r['spill_stores']} | {r['spill_loads']} |")
    if loops is not None:
        out += ["", "## The persistent engine's inner loops (SASS, `cuobjdump -sass`)", "",
                "Instructions a warp issues per K step of the SIMT block GEMM (16 FMAs and 8 shared loads a thread) "
                "and per `mma.sync` of the tensor-core GEMM (and how many one pass of its loop issues: two "
                "accumulators in flight), in each kernel's innermost loops. A block's 8 warps share an SM's 4 "
                "schedulers, so a K step takes at least 2 x that many cycles to issue, against 64 cycles of "
                "shared-memory wavefronts (8 warps x 8 loads, conflict-free) and 32 of FMAs: at 32 or fewer the "
                "loop is bound by shared memory, not by issue.", ""]
        if isinstance(loops, str):
            out.append(loops)
        else:
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            out += ["| kernel | sm | SIMT: per K step | tensor cores: per mma | mma per pass |",
                    "| --- | --- | --- | --- | --- |"]
            out += [f"| `{r['kernel']}` | {r['arch']} | {fmt(r['k_step'])} | {fmt(r['mma'])} | "
                    f"{r['mma_per_pass'] or '-'} |" for r in loops]
    return "\n".join(out) + "\n"


def _if_available(collect):
    """collect(), or what stopped it where the CUDA tools are missing or fail."""
    try:
        return collect()
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"Not available here: {type(exc).__name__}: {str(exc)[:300]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 if any configuration spills, or reads rows other "
                    "programs wrote through L1")
    ap.add_argument("--out", help="write the markdown here instead of stdout")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--no-cuda", action="store_true", help="skip the C++ backend's .cu kernels (nvcc)")
    ap.add_argument("--triton-log", action="store_true", help="counts from Triton's own ptxas run (its flags; "
                    "every kernel compiled afresh, slower) instead of a ptxas run on its cached PTX")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the compiled kernels this report reads")
    rows = collect(args.quick, args.jobs, args.triton_log)
    loops = None
    if args.no_cuda:
        cuda = "Not compiled in this run (`--no-cuda`)."
    else:
        with tempfile.TemporaryDirectory() as objects:
            cuda = _if_available(lambda: cuda_rows(objects))
            if not isinstance(cuda, str):
                loops = _if_available(lambda: loop_rows(objects))
    text = markdown(rows, cuda, loops, args.triton_log)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    for r in spills:
        print(f"SPILL {r['kernel']} {r['mode']} {r['dtype']} {r['tiles']} align {r['align']} sm_{r['cc']}: "
              f"{r['spill_stores']}/{r['spill_loads']} B, stack {r['stack']} B", file=sys.stderr)
    cached = [r for r in rows if r["l1_copies"]]
    for r in cached:
        print(f"L1 {r['kernel']} {r['mode']} {r['dtype']} {r['tiles']} align {r['align']} sm_{r['cc']}: "
              f"{r['l1_copies']} cp.async.ca in a kernel whose programs read each other's rows", file=sys.stderr)
    return 1 if args.check and (spills or cached) else 0


if __name__ == "__main__":
    sys.exit(main())
