"""Build configuration shared by setup.py, the tests and the benchmarks: one source of truth.

setup.py loads this file by path (fastrnn is not installed yet at build time), so it imports nothing from
fastrnn and nothing from torch at module level.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CPP_SOURCES = ["csrc/rnn.cpp", "csrc/rnn_ext.cpp", "csrc/seq.cpp", "csrc/persist.cpp", "csrc/cpu/engine_cpu.cpp",
               "csrc/cpu/cell_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/cell_cuda.cu", "csrc/cuda/cell_ln_cuda.cu", "csrc/cuda/persist_cuda.cu"]

DEFAULT_CUDA_ARCHS = "80;90"

# No contraction of a*b+c into a fused multiply-add, on any compiler: where g++ (x86-64-v3/v4 clones) and
# nvcc would each fuse is their own choice, so the CPU and the GPU would round differently. csrc/cell/cell.h
# writes the fused multiply-adds of its polynomials out instead (fmaf, `Fused`), which round alike on both
# (the CPU's x86-64 baseline clone, without FMA units, runs them unfused); the GEMMs, where most of the time
# goes, are not compiled here and keep theirs.
# -fno-trapping-math: the cells compute both sides of their selects (cell.h's tanh: polynomial or 1 - 2/(e+1)),
# but gcc sinks each side under its branch, and under the default -ftrapping-math it may not speculate the
# division back out without AVX-512's masked lanes: the x86-64-v3 (AVX2) clones of every cell loop stayed
# scalar, and the LSTM cell took as long as the step's GEMMs on an AVX2 Zen 2. fastrnn reads no FP exception
# flags; no operation's result changes (no reassociation, no contraction).
# -g0 overrides Python's default -g: debug info of torch's headers doubles compile time and the .so size
CXX_FLAGS = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math",
             "-DFASTRNN_CXX_OPT=O3"]
# IEEE division and exp on purpose (no --use_fast_math): the GPU must run the arithmetic the CPU tests check.
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "--fmad=false"]
# What torch.utils.cpp_extension adds to every nvcc call; repeated so a standalone ptxas report compiles
# the same code as the build.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


# The oldest compute capability the CUDA kernels compile for: __grid_constant__ kernel arguments need sm_70.
MIN_CUDA_ARCH = 70


def cuda_archs() -> List[str]:
    """Compute capabilities to build, from FASTRNN_CUDA_ARCHS ("80;90", "8.0,9.0" and "sm_90" all work)."""
    raw = os.environ.get("FASTRNN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = []
    for tok in re.split(r"[;,\s]+", raw.strip()):
        tok = tok.lower().removeprefix("sm_").replace(".", "")
        if tok:
            if not re.fullmatch(r"\d+[af]?", tok):
                raise ValueError(f"FASTRNN_CUDA_ARCHS: cannot parse {tok!r} in {raw!r}")
            if int(tok.rstrip("af")) < MIN_CUDA_ARCH:
                raise ValueError(f"FASTRNN_CUDA_ARCHS: sm_{tok} in {raw!r} is below sm_{MIN_CUDA_ARCH}, the oldest "
                                 f"the CUDA kernels build for (the persistent engine reads its launch's arguments "
                                 f"in place: __grid_constant__); build for {MIN_CUDA_ARCH} or later, or set "
                                 f"FASTRNN_SKIP_CUDA_BUILD=1 for the CPU kernels only")
            archs.append(tok)
    return archs


def ptx_arch(archs: List[str]) -> Optional[str]:
    """The arch whose PTX is embedded for GPUs newer than every cubin (JIT-compiled by the driver): the highest
    portable one; arch-specific targets (90a, 100f) have no forward-compatible PTX."""
    portable = [a for a in archs if a.isdigit()]
    return max(portable, key=int) if portable else None


def gencode_flags(archs: List[str], ptx: bool = True) -> List[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    p = ptx_arch(archs) if ptx else None
    return flags + ([f"-gencode=arch=compute_{p},code=compute_{p}"] if p else [])


def runs_on(archs: List[str], capability: Tuple[int, int], ptx: Optional[str]) -> bool:
    """Whether a binary with these cubins and the PTX of arch ``ptx`` (``ptx_arch(archs)`` for a build of
    ``archs``; None: no PTX) runs on a GPU of `capability` (major, minor): a cubin runs on its own major version from
    its minor up, PTX on anything at least as new."""
    major, minor = capability
    for a in archs:
        if a.isdigit() and int(a) // 10 == major and int(a) % 10 <= minor:
            return True
        if a.rstrip("af") == f"{major}{minor}":
            return True
    return ptx is not None and (int(ptx) // 10, int(ptx) % 10) <= (major, minor)


def _is_cuda_home(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root. An nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc), whose parent
    torch would take for the toolkit, so candidates are checked for bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_cuda_home(c)), None)


def nvcc_path() -> Optional[str]:
    home = find_cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def nvcc_version() -> Optional[str]:
    """The release of the nvcc the build and ``ptxas_report`` use ("13.0"), None without one."""
    nvcc = nvcc_path()
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_include_dirs() -> List[str]:
    """The CUDA builds' header dirs after CSRC and torch's: the toolkit's own first, then the pip `nvidia`
    packages' for what a bare toolkit lacks. A torch built for a newer CUDA than the local nvcc brings that
    CUDA's headers in `nvidia/cu13/include`; found first, they mixed with the toolkit's and nvcc refused them
    ("CUDA compiler and CUDA toolkit headers are incompatible": torch 2.15 for CUDA 13.2 under nvcc 13.0)."""
    return [os.path.join(find_cuda_home(), "include")] + nvidia_include_dirs()


def nvidia_include_dirs() -> List[str]:
    """Header dirs of the pip `nvidia` packages (cublas, cusparse, ...) that torch's CUDA headers include but a
    bare toolkit may lack; found from the interpreter's own site dirs, never from a hand-set variable."""
    sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    sites.update(p for p in sys.path if p.endswith("site-packages"))
    dirs = []
    for site_dir in sorted(sites):
        dirs += sorted(d for d in glob.glob(os.path.join(site_dir, "nvidia", "*", "include")) if os.path.isdir(d))
    return dirs


def max_jobs() -> int:
    """Parallel compile jobs: MAX_JOBS if set, else bounded by cores and by RAM (~3 GiB per nvcc/cc1plus job on
    torch headers)."""
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        avail_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        by_ram = max(1, avail_kib // (3 * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_ram = cores
    return max(1, min(cores, by_ram))


def _torch_include_dirs() -> List[str]:
    # what torch.utils.cpp_extension.include_paths() returns for a CPU/CUDA build, without importing that
    # module, which logs a warning about CUDA_HOME on every machine without a GPU driver
    import torch

    include = os.path.join(os.path.dirname(torch.__file__), "include")
    return [include, os.path.join(include, "torch", "csrc", "api", "include")]


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(.*)")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> Dict[str, Dict[str, Dict[str, int]]]:
    """`nvcc -Xptxas -v` output as {arch ("80"): {kernel (mangled): {registers, stack, spill_stores,
    spill_loads, smem}}}."""
    out: Dict[str, Dict[str, Dict[str, int]]] = {}
    current = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            stats = {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}
            current = out.setdefault(m.group(2).removeprefix("sm_"), {}).setdefault(m.group(1), stats)
            continue
        if current is None:
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _PTXAS_USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _PTXAS_SMEM.search(m.group(2))
            current["smem"] = int(s.group(1)) if s else 0
    return out


def ptxas_report(archs: Optional[List[str]] = None, sources: Optional[List[str]] = None,
                 timeout: float = 900, objects: Optional[str] = None) -> Dict[str, Dict[str, Dict[str, int]]]:
    """Compiles the CUDA sources for `archs` (default: cuda_archs()) in one nvcc call with `-Xptxas -v` and the
    build's flags, but no --threads so that each kernel's report lines stay together; returns parse_ptxas of
    the output. `objects`: a folder to keep each source's object in (its basename with .o), for its SASS
    (cuobjdump_path). Raises FileNotFoundError without nvcc and CalledProcessError (carrying nvcc's output)
    when compilation fails."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (no CUDA toolkit with bin/nvcc and include/cuda_runtime.h)")
    archs = archs or cuda_archs()
    includes = [CSRC] + _torch_include_dirs() + [os.path.join(find_cuda_home(), "include")] + nvidia_include_dirs()
    report: Dict[str, Dict[str, Dict[str, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources or CUDA_SOURCES:
            obj = os.path.join(objects or tmp, os.path.splitext(os.path.basename(src))[0] + ".o")
            cmd = [nvcc, "-c", os.path.join(ROOT, src), "-o", obj, "-Xptxas", "-v",
                   *gencode_flags(archs, ptx=False), *NVCC_FLAGS, *TORCH_NVCC_DEFINES,
                   "-DFASTRNN_WITH_CUDA", *(f"-I{d}" for d in includes)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
            for arch, kernels in parse_ptxas(proc.stdout + proc.stderr).items():
                report.setdefault(arch, {}).update(kernels)
    return report


def cuobjdump_path() -> Optional[str]:
    """cuobjdump beside nvcc, else the one Triton bundles (the pip CUDA wheels have none), else None."""
    nvcc = nvcc_path()
    found = [os.path.join(os.path.dirname(nvcc), "cuobjdump")] if nvcc else []
    try:
        import triton

        found.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((p for p in found if os.access(p, os.X_OK)), None)


_RES_SECTION = re.compile(r"^Fatbin (elf|ptx) code:", re.M)
_RES_ARCH = re.compile(r"^arch = sm_(\w+)", re.M)
_RES_FUNCTION = re.compile(r"^\s*Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", re.M)


def parse_res_usage(text: str) -> Dict[str, Dict[str, Dict[str, int]]]:
    """`cuobjdump -res-usage` output as {arch ("80"): {kernel (mangled): {registers, stack, smem, local}}}, from
    the binary's machine code (its PTX has no resources). A kernel spills into its stack frame, so stack 0 means
    no spills."""
    out: Dict[str, Dict[str, Dict[str, int]]] = {}
    parts = _RES_SECTION.split(text)
    for kind, body in zip(parts[1::2], parts[2::2]):
        arch = _RES_ARCH.search(body)
        if kind != "elf" or arch is None:
            continue
        kernels = out.setdefault(arch.group(1), {})
        for m in _RES_FUNCTION.finditer(body):
            kernels[m.group(1)] = {"registers": int(m.group(2)), "stack": int(m.group(3)), "smem": int(m.group(4)),
                                   "local": int(m.group(5))}
    return out


def binary_report(path: str) -> Dict[str, Dict[str, Dict[str, int]]]:
    """parse_res_usage of a built library's (fastrnn._C's) CUDA kernels: what the build compiled, read back in a
    fraction of a second where ptxas_report compiles the sources again. Raises FileNotFoundError without
    cuobjdump."""
    tool = cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (beside nvcc, or Triton's)")
    proc = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True, timeout=300)
    return parse_res_usage(proc.stdout)


_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
# an instruction line: its address, its opcode (after a predicate such as @!P0), the last hex operand (a branch's target)
_SASS_INSTRUCTION = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*?(?:\b0x([0-9a-f]+))?\s*;")


def sass_loops(text: str) -> Dict[str, List[Dict[str, int]]]:
    """The innermost loops of each function in cuobjdump -sass output: per loop (a branch back to an address at
    or before its own, innermost when no other such branch lies inside it), its count of each opcode (without
    modifiers: FFMA, LDS, HMMA, ...) and "n", its instructions."""
    out: Dict[str, List[Dict[str, int]]] = {}
    parts = _SASS_FUNCTION.split(text)
    for name, body in zip(parts[1::2], parts[2::2]):
        ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_INSTRUCTION.finditer(body)]
        spans = [(int(target, 16), addr) for addr, op, target in ins
                 if op == "BRA" and target is not None and int(target, 16) <= addr]
        inner = [(lo, hi) for lo, hi in spans if not any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi)
                                                          for l2, h2 in spans)]
        loops = []
        for lo, hi in inner:
            counts: Dict[str, int] = {"n": 0}
            for addr, op, _ in ins:
                if lo <= addr <= hi:
                    counts[op] = counts.get(op, 0) + 1
                    counts["n"] += 1
            loops.append(counts)
        out[name] = loops
    return out


def persist_loop_costs(loops: List[Dict[str, int]]) -> Dict[str, Optional[float]]:
    """What a persistent-engine kernel's innermost loops (sass_loops) issue: "k_step", the SIMT K loop's
    instructions per K step (16 FFMA and 8 LDS a step; of its unrolled body where the compiler unrolled it);
    "mma", the most instructions per HMMA of its tensor-core loops, and "mma_per_pass", the fewest HMMA any of them
    issues per pass (2: accumulate_mma's two accumulators); None where the kernel has no such loop."""
    simt = [lp for lp in loops
            if lp.get("FFMA", 0) >= 16 and lp["FFMA"] % 16 == 0 and 2 * lp.get("LDS", 0) == lp["FFMA"]]
    body = max(simt, key=lambda lp: lp["FFMA"], default=None)
    mma = [lp for lp in loops if lp.get("HMMA")]
    return {"k_step": body["n"] * 16 / body["FFMA"] if body else None,
            "mma": max((lp["n"] / lp["HMMA"] for lp in mma), default=None),
            "mma_per_pass": min((lp["HMMA"] for lp in mma), default=None)}

