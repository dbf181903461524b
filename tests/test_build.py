"""The build: its CUDA kernels, as built for each configured arch, without register spills, the extension says what
it was built for, and CUDA calls on a machine without a usable GPU fail with a Python error, not a crash."""

import os
import subprocess
import sys
import textwrap

import pytest

from fastrnn import _buildcfg

NVCC = _buildcfg.nvcc_path()
# one kernel per (op, dtype): forward and backward of LSTM, GRU, RNN_TANH, RNN_RELU in fp32/fp64/fp16/bf16
N_CELL_KERNELS = 8 * 4
# fastrnn's own cells (csrc/cuda/cell_ln_cuda.cu): forward and backward of the four modes, and the input LayerNorm, in
# fp32/fp64
N_EXT_KERNELS = (8 + 1) * 2
# the persistent engine (csrc/cuda/persist_cuda.cu): forward and backward of the four modes in fp32/fp16/bf16, and of
# fastrnn's own cells in fp32; its cost model's probe in fp32 and bf16 (benchmarks/persist_calibrate.py)
N_PERSIST_KERNELS = 8 * 3 + 8 + 2


@pytest.fixture(scope="module")
def built():
    """The built extension's path and its CUDA kernels' resources per arch (cuobjdump reads what the build compiled:
    the kernels users run, without compiling them again)."""
    lib = _C()
    if not lib.build_info()["with_cuda"]:
        pytest.skip("fastrnn._C was built without CUDA (test_build_info_reports_archs says whether it should have been)")
    if _buildcfg.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found (beside nvcc, or Triton's)")
    return lib.__file__, _buildcfg.binary_report(lib.__file__)


def _kernels_for(built, arch):
    path, report = built
    archs = _C().build_info()["cuda_archs"]
    if int(arch) not in archs:
        pytest.skip(f"fastrnn._C was built for {', '.join(f'sm_{a}' for a in archs)} only (FASTRNN_CUDA_ARCHS), "
                    f"not sm_{arch}")
    # an arch-specific build (sm_90a) has that arch's machine code, which build_info counts as its base arch
    found = {k.rstrip("af"): v for k, v in report.items()}
    assert arch in found, f"{path}: build_info says sm_{arch}, its fatbin has machine code for {sorted(report)}"
    return found[arch]


@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile_without_spills(built, arch):
    kernels = _kernels_for(built, arch)
    cell = {k: v for k, v in kernels.items() if "cell_kernel" in k}
    assert len(cell) == N_CELL_KERNELS, f"sm_{arch}: expected {N_CELL_KERNELS} cell kernels, got {sorted(cell)}"
    ext = {k: v for k, v in kernels.items() if "cell_ln_cuda" in k}
    assert len(ext) == N_EXT_KERNELS, f"sm_{arch}: expected {N_EXT_KERNELS} kernels of the cells, got {sorted(ext)}"
    persist = [k for k in kernels if "persist_cuda" in k]
    assert len(persist) == N_PERSIST_KERNELS, f"sm_{arch}: expected {N_PERSIST_KERNELS} persistent kernels, got {persist}"
    cell.update(ext)
    spilling = {k: v for k, v in kernels.items() if v["stack"] or v["local"]}
    assert not spilling, f"sm_{arch}: kernels spill to local memory: {spilling}"
    # 256 threads per block (launch bounds) allow up to 255 registers; staying well below keeps occupancy
    worst = max(v["registers"] for v in cell.values())
    assert 0 < worst <= 128, f"sm_{arch}: a cell kernel uses {worst} registers"
    # the engine's kernels take over 128 registers a thread: a block per SM whatever its shared memory, as the plan's
    # count of the clusters a GPU holds at once assumes (csrc/persist.h Limits::clusters_at_once; the probe asks
    # for a whole SM's shared memory instead)
    engine = {k: v["registers"] for k, v in kernels.items() if "persist_kernel" in k}
    assert len(engine) == N_PERSIST_KERNELS - 2 and min(engine.values()) > 128, f"sm_{arch}: {engine}"


# The persistent engine's inner loops as compiled, in instructions a warp issues: a SIMT K step is 16 FMAs and 8 shared
# loads a thread, and a block's 8 warps on an SM's 4 schedulers then issue for 2 x k_step cycles per step against 64
# cycles of shared-memory wavefronts, so about 32 is the bound; with the bounds tested and the 64-bit addresses
# worked out per element it was 63-89. A tensor-core loop passes two mma.sync (two accumulators in flight; one
# before, each waiting for the last), with their fragment loads and addresses: 10-12.5 instructions each.
MAX_K_STEP = 40
MAX_PER_MMA = 14


@pytest.mark.parametrize("arch", ["80", "90"])
def test_persistent_inner_loops_issue_few_instructions(built, arch):
    _kernels_for(built, arch)
    sass = subprocess.run([_buildcfg.cuobjdump_path(), "-sass", "-arch", f"sm_{arch}", built[0]],
                          capture_output=True, text=True, check=True).stdout
    costs = {name: _buildcfg.persist_loop_costs(loops) for name, loops in _buildcfg.sass_loops(sass).items()
             if "persist_cuda" in name}
    assert len(costs) == N_PERSIST_KERNELS, sorted(costs)
    for name, c in costs.items():
        assert c["k_step"] is not None and c["k_step"] <= MAX_K_STEP, (name, c)
        # every kernel but those of fastrnn's own cells (SIMT only) has a tensor-core loop
        assert (c["mma"] is None) == ("Ext" in name), (name, c)
        assert c["mma"] is None or (c["mma"] <= MAX_PER_MMA and c["mma_per_pass"] >= 2), (name, c)


def test_sass_loops_finds_innermost_loops():
    text = textwrap.dedent(
        """                Function : _Z1kv
                /*0000*/                   MOV R1, c[0x0][0x28] ;
                /*0010*/                   LDS R2, [R3] ;
                /*0020*/                   FFMA R4, R2, R2, R4 ;
                /*0030*/              @!P0 BRA 0x10 ;
                /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
                /*0050*/               @P1 BRA 0x0 ;
                /*0060*/                   BRA 0x60;
        """
    )
    loops = _buildcfg.sass_loops(text)["_Z1kv"]
    # the inner loop 0x10-0x30; the outer one holds it, and the last branch to itself is a loop of its own
    assert loops == [{"n": 3, "LDS": 1, "FFMA": 1, "BRA": 1}, {"n": 1, "BRA": 1}]


def test_parse_res_usage_reads_machine_code_only():
    text = textwrap.dedent(
        """\

        Fatbin elf code:
        ================
        arch = sm_80
        code version = [1,8]

        Resource usage:
         Common:
          GLOBAL:0
         Function _Z1kv:
          REG:40 STACK:0 SHARED:2048 LOCAL:0 CONSTANT[0]:368 TEXTURE:0 SURFACE:0 SAMPLER:0
         Function _Z1jv:
          REG:255 STACK:24 SHARED:0 LOCAL:0 CONSTANT[0]:368 TEXTURE:0 SURFACE:0 SAMPLER:0

        Fatbin ptx code:
        ================
        arch = sm_90
        code version = [9,0]

        Fatbin elf code:
        ================
        arch = sm_90
        code version = [1,8]

        Resource usage:
         Function _Z1kv:
          REG:38 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:368 TEXTURE:0 SURFACE:0 SAMPLER:0
        """
    )
    assert _buildcfg.parse_res_usage(text) == {
        "80": {"_Z1kv": {"registers": 40, "stack": 0, "smem": 2048, "local": 0},
               "_Z1jv": {"registers": 255, "stack": 24, "smem": 0, "local": 0}},
        "90": {"_Z1kv": {"registers": 38, "stack": 0, "smem": 0, "local": 8}},
    }


def test_parse_ptxas_reads_spills_and_smem():
    text = textwrap.dedent(
        """\
        ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'
        ptxas info    : Function properties for _Z1kv
            8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 368 bytes cmem[0]
        ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
        ptxas info    : Function properties for _Z1kv
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 38 registers, used 0 barriers, 368 bytes cmem[0]
        """
    )
    report = _buildcfg.parse_ptxas(text)
    assert report["80"]["_Z1kv"] == {"registers": 40, "stack": 8, "spill_stores": 4, "spill_loads": 12, "smem": 2048}
    assert report["90"]["_Z1kv"] == {"registers": 38, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}


@pytest.mark.parametrize(
    "raw, expected",
    [("80;90", ["80", "90"]), ("8.0, 9.0", ["80", "90"]), ("sm_90a", ["90a"]), ("86", ["86"])],
)
def test_cuda_archs_parsing(monkeypatch, raw, expected):
    monkeypatch.setenv("FASTRNN_CUDA_ARCHS", raw)
    assert _buildcfg.cuda_archs() == expected


def test_cuda_archs_below_the_oldest_supported_are_refused(monkeypatch):
    monkeypatch.setenv("FASTRNN_CUDA_ARCHS", "61;80")
    with pytest.raises(ValueError, match=r"sm_61 in '61;80' is below sm_70.*FASTRNN_SKIP_CUDA_BUILD=1"):
        _buildcfg.cuda_archs()


def test_default_archs_and_gencode(monkeypatch):
    monkeypatch.delenv("FASTRNN_CUDA_ARCHS", raising=False)
    assert _buildcfg.cuda_archs() == ["80", "90"]
    assert _buildcfg.gencode_flags(["80", "90"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert _buildcfg.gencode_flags(["90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]


@pytest.mark.parametrize(
    "capability, runs",
    [((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((12, 0), True), ((7, 5), False)],
)
def test_runs_on_default_archs(capability, runs):
    """sm_80 cubins cover 8.x, sm_90 covers 9.0, compute_90 PTX is JIT-compiled on newer GPUs, nothing runs
    on older ones."""
    assert _buildcfg.runs_on(["80", "90"], capability, _buildcfg.ptx_arch(["80", "90"])) is runs
    assert _buildcfg.ptx_arch(["90a"]) is None
    assert _buildcfg.runs_on(["90a"], (9, 0), None) and not _buildcfg.runs_on(["90a"], (10, 0), None)


@pytest.mark.parametrize("archs, ptx, capability, runs", [
    ([80, 90], 90, (10, 0), True), ([80, 90], 90, (7, 5), False), ([90], None, (9, 0), True),
    ([90], None, (10, 0), False), ([80], 80, (9, 0), True)])
def test_cpp_takes_a_gpu_its_build_runs_on(monkeypatch, archs, ptx, capability, runs):
    """The cpp backend takes a GPU only where the build's cubins or PTX (``build_info``) run on it, and otherwise
    says why: an sm_90a-only build (``cuda_archs`` [90], no PTX) refuses a newer GPU by name rather than failing at
    its first launch."""
    import torch
    from fastrnn.ops import cpp

    monkeypatch.setattr(cpp, "_build_info", lambda: dict(with_cuda=True, cuda_archs=archs, cuda_ptx=ptx))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    why = cpp._arch_mismatch(torch.device("cuda"))
    assert (why is None) == runs, why
    if not runs:
        assert f"sm_{capability[0]}{capability[1]} GPU" in why and ("no PTX" if ptx is None else f"compute_{ptx}") in why


def test_max_jobs_respects_env_and_bounds(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "3")
    assert _buildcfg.max_jobs() == 3
    monkeypatch.delenv("MAX_JOBS")
    jobs = _buildcfg.max_jobs()
    assert 1 <= jobs <= (os.cpu_count() or 1)


def test_nvidia_headers_are_found_without_env():
    """torch's CUDA headers include cublas_v2.h/cusparse.h; when the pip nvidia packages provide them, the
    build finds them from the interpreter's site dirs."""
    import torch

    if torch.version.cuda is None:
        pytest.skip("CPU build of torch: no nvidia pip packages expected")
    dirs = _buildcfg.nvidia_include_dirs()
    toolkit = [os.path.join(_buildcfg.find_cuda_home() or "/nonexistent", "include")]
    for header in ("cublas_v2.h", "cusparse.h"):
        assert any(os.path.isfile(os.path.join(d, header)) for d in dirs + toolkit), f"{header} not found in {dirs}"


def test_toolkit_headers_come_before_the_pip_packages(tmp_path):
    """A torch built for a newer CUDA than the local nvcc ships that CUDA's headers in its pip packages; the
    toolkit's must be found first, or nvcc mixes the two and refuses them (torch 2.15 for CUDA 13.2 under
    nvcc 13.0 did)."""
    home = _buildcfg.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit")
    dirs = _buildcfg.cuda_include_dirs()
    assert dirs[0] == os.path.join(home, "include"), dirs
    assert dirs[1:] == _buildcfg.nvidia_include_dirs(), dirs
    # what nvcc resolves with them: the toolkit's copy of a header the pip packages may carry too
    src = tmp_path / "k.cu"
    src.write_text("#include <cooperative_groups.h>\n")
    proc = subprocess.run([_buildcfg.nvcc_path(), "-M", str(src), *(f"-I{d}" for d in dirs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = [ln.strip(" \\") for ln in proc.stdout.splitlines() if ln.strip(" \\").endswith("/cooperative_groups.h")]
    assert found and all(f.startswith(dirs[0]) for f in found), found


def _C():
    from fastrnn._ext import _C

    if _C is None:
        pytest.fail("fastrnn._C is not built: run `pip install -e . --no-build-isolation`")
    return _C


def test_build_info_reports_archs():
    import torch

    info = _C().build_info()
    assert {"with_cuda", "cuda_archs", "cuda_ptx", "cuda_version", "cpu_isa", "compiler"} <= set(info)
    if not info["with_cuda"]:
        if NVCC is not None and torch.version.cuda is not None and not os.environ.get("FASTRNN_SKIP_CUDA_BUILD"):
            pytest.fail("nvcc and a CUDA torch are present but fastrnn._C was built without CUDA")
        assert info["cuda_archs"] == [] and info["cuda_ptx"] is None
        return
    # what the build was asked for: known here only if FASTRNN_CUDA_ARCHS is set now as it was then
    if os.environ.get("FASTRNN_CUDA_ARCHS"):
        assert info["cuda_archs"] == [int(a.rstrip("af")) for a in _buildcfg.cuda_archs()]
        ptx = _buildcfg.ptx_arch(_buildcfg.cuda_archs())
        assert info["cuda_ptx"] == (None if ptx is None else int(ptx))
    assert info["cuda_archs"] and all(isinstance(a, int) and a >= 50 for a in info["cuda_archs"])
    assert info["cuda_ptx"] is None or info["cuda_ptx"] in info["cuda_archs"]
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        ptx = None if info["cuda_ptx"] is None else str(info["cuda_ptx"])
        assert _buildcfg.runs_on([str(a) for a in info["cuda_archs"]], capability, ptx), (info, capability)
    assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]


def test_cuda_call_fails_cleanly_in_subprocess():
    """Without a usable GPU, touching the CUDA runtime raises RuntimeError; a crash would show as a signal or a
    non-zero exit status of the child."""
    _C()
    code = textwrap.dedent(
        """\
        import torch
        from fastrnn._ext import _C
        try:
            print("devices", _C.cuda_probe())
        except RuntimeError as exc:
            print("RuntimeError", str(exc).splitlines()[0])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"child exited with {proc.returncode}: {proc.stderr[-2000:]}"
    import torch

    if torch.cuda.is_available():
        assert proc.stdout.startswith("devices"), proc.stdout
    else:
        assert proc.stdout.startswith("RuntimeError"), proc.stdout
