"""The parts of the GPU check that need no GPU: its plan, its refusal without a GPU, and the smoke script's
cases on the CPU kernels."""

import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_smoke  # noqa: E402


def _check(*args):
    return subprocess.run(["bash", CHECK, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


CORE = ["backends", "cuda-tests", "cuda-tests-persistent", "memcheck", "memcheck-persistent", "racecheck-persistent",
        "synccheck-persistent", "memcheck-grid", "memcheck-graphs", "cuda-clock-tests", "calibrate", "benchmark"]
EXTRA = ["phases", "layernorm", "layernorm-triton-seq", "layernorm-triton-persist", "host-time", "grid-barrier",
         "whole-grid-sync", "bf16", "bf16-simt", "tf32", "bidirectional", "bank-conflicts-pad1", "bank-conflicts-pad0",
         "unpadded"]


def _steps(proc) -> list:
    return [ln.split(":")[0].strip() for ln in proc.stdout.splitlines()[1:]]


def test_the_check_is_its_core_and_the_measurements_come_with_extra():
    """Unasked, the check is the build, the tests, the sanitizers and the benchmark last (issue: five minutes);
    --extra appends the measurements, --only extra runs them alone, --only core the check's own."""
    assert _steps(_check("--dry-run", "--no-build")) == CORE
    assert _steps(_check("--dry-run")) == ["build"] + CORE
    assert _steps(_check("--dry-run", "--no-build", "--extra")) == CORE + EXTRA
    assert _steps(_check("--dry-run", "--no-build", "--only", "extra")) == EXTRA
    assert _steps(_check("--dry-run", "--only", "tf32,core")) == ["build"] + CORE + ["tf32"]
    assert _steps(_check("--dry-run", "--only", "core,tf32,core")) == ["build"] + CORE + ["tf32"]
    bad = _check("--dry-run", "--no-bench", "--only", "extra")
    assert bad.returncode == 2 and "names no step" in bad.stderr and "--no-bench leaves out" in bad.stderr


def test_graph_cases_are_checked_with_the_caching_allocator(monkeypatch):
    """torch's uncached allocator (the other sanitizer steps') refuses allocations during a capture: the smoke's
    graph cases skip under it, with the reason, and get a memcheck step of their own without it."""
    line = _check("--dry-run", "--only", "memcheck-graphs").stdout.splitlines()[1]
    assert "--tool memcheck" in line and "gpu_smoke.py --graphs" in line
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING" not in line and "FASTRNN_PERSISTENT=1" in line
    graph = next(c for c in gpu_smoke.CASES if c.graph)
    monkeypatch.setenv("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
    assert "caching allocator" in gpu_smoke.why_not(graph, torch.device("cuda"))


def test_dry_run_prints_every_step_with_its_log():
    proc = _check("--dry-run", "--no-build", "--extra")
    assert proc.returncode == 0, proc.stderr
    assert _steps(proc) == CORE + EXTRA
    assert "--tool racecheck" in proc.stdout and "--tool synccheck" in proc.stdout
    # the tests that read the SMs' clocks apart from the others, alone on the GPU
    for name in ("cuda-tests", "cuda-tests-persistent"):
        assert "pytest -m 'cuda and not sm_clocks'" in proc.stdout.split(f"{name}:")[1].splitlines()[0]
    assert "pytest -m 'cuda and sm_clocks'" in proc.stdout.split("cuda-clock-tests:")[1].splitlines()[0]
    assert "FASTRNN_PERSISTENT=1" in proc.stdout.split("cuda-tests-persistent:")[1].splitlines()[0]
    assert all("(limit " in ln for ln in proc.stdout.splitlines()[1:])
    assert "bench_rnn.py --quick --device cuda --out benchmarks/results/gpu" in proc.stdout
    assert "bench_layernorm.py --device cuda" in proc.stdout and "--out benchmarks/results/gpu/layernorm.md" in proc.stdout
    assert "> benchmarks/results/gpu/memcheck.log" in proc.stdout
    assert "FASTRNN_PERSISTENT_CLUSTER=0" in proc.stdout.split("grid-barrier:")[1].splitlines()[0]
    whole = proc.stdout.split("whole-grid-sync:")[1].splitlines()[0]
    assert "FASTRNN_PERSISTENT_GROUP_SYNC=0" in whole and "FASTRNN_PERSISTENT=1" in whole
    assert "--dtype bfloat16" in proc.stdout.split("bf16:")[1].splitlines()[0]
    assert "FASTRNN_PERSISTENT_MMA=0" in proc.stdout.split("bf16-simt:")[1].splitlines()[0]
    assert "FASTRNN_PERSISTENT=1" in proc.stdout.split("bidirectional:")[1].splitlines()[0]
    assert "--bidirectional" in proc.stdout.split("bidirectional:")[1].splitlines()[0]
    for pad in (1, 0):
        line = proc.stdout.split(f"bank-conflicts-pad{pad}:")[1].splitlines()[0]
        assert f"FASTRNN_PERSISTENT_PAD={pad}" in line and "l1tex__data_bank_conflicts_pipe_lsu_mem_shared" in line
        # each cell's first forward and backward launch: one ncu run per cell
        assert "for cell in lstm gru;" in line and "--launch-count 2" in line and "--cells $cell" in line
    # the correctness checks alone side by side (a "|" in a command would split its step)
    side = [ln.split(":")[0].strip() for ln in proc.stdout.splitlines()[1:] if ln.endswith(", side by side")]
    assert side == CORE[1:9], side
    assert "FASTRNN_PERSISTENT_PAD=0" in proc.stdout.split("unpadded:")[1].splitlines()[0]
    assert "persist_phases.py --out benchmarks/results/gpu/phases.md" in proc.stdout.split("phases:")[1].splitlines()[0]
    assert REPO not in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu"
    proc = _check("--out", str(out))
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    assert not out.exists()


# What a one-GPU machine reports (an H200's figures), for collecting the CUDA cases where there is none.
FAKE_GPU = """
import sys, types, torch, pytest
props = types.SimpleNamespace(name="NVIDIA H200 (faked)", major=9, minor=0, multi_processor_count=132,
                              total_memory=141 << 30, shared_memory_per_block_optin=232448, L2_cache_size=60 << 20,
                              max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536, warp_size=32)
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_capability = lambda *a, **k: (props.major, props.minor)
torch.cuda.get_device_properties = lambda *a, **k: props
torch.cuda.get_device_name = lambda *a, **k: props.name
sys.exit(pytest.main(["--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider"]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU collects its CUDA cases itself")
def test_cuda_cases_collect_where_a_gpu_would_be():
    """The GPU session's first minutes must not go to a collection error: its `pytest -m cuda` collects here
    with the device queries answered as an H200 would, and every kernel family has CUDA cases."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", FAKE_GPU], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = {ln.split("::")[0] for ln in proc.stdout.splitlines() if "::" in ln}
    families = ["backends", "modules", "persist", "cells_ext", "cpp_ext", "triton_ext", "deterministic", "export"]
    assert {f"tests/test_{name}.py" for name in families} <= files, files


def test_only_keeps_the_named_steps_in_plan_order():
    proc = _check("--dry-run", "--only", "tf32,cuda-tests,memcheck")
    assert proc.returncode == 0, proc.stderr
    assert _steps(proc) == ["cuda-tests", "memcheck", "tf32"]
    assert "--tf32" in proc.stdout.split("tf32:")[1]
    bad = _check("--dry-run", "--only", "cuda-tests,nonesuch")
    assert bad.returncode == 2 and "unknown step nonesuch" in bad.stderr


def test_unknown_option_is_a_usage_error():
    proc = _check("--bogus")
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def test_smoke_covers_every_kernel_of_both_backends():
    names = {c.name for c in gpu_smoke.CASES}
    for mode in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        assert {f"cpp-{mode}", f"triton-step-{mode}", f"triton-seq-{mode}",
                f"triton-persist-{mode}-h{gpu_smoke.H_SLICES}"} <= names
    assert {"cpp-lstm-proj", "triton-step-lstm-proj"} <= names


def test_smoke_persist_cases_split_the_hidden_units():
    """The sanitizer's racecheck and synccheck see the persist kernels' barrier only with several slices."""
    from fastrnn.ops.triton import persist

    cfg = persist.persist_config(gpu_smoke.B, gpu_smoke.H_SLICES, None)
    assert persist.grid(gpu_smoke.B, gpu_smoke.H_SLICES, cfg)[1] >= 2


def test_smoke_graph_cases_replay_a_capture(emulated_cuda_graphs):
    """The smoke's CUDA-graph cases (Triton's step loops, plain with a projection and fastrnn's cells) call the
    layer until a captured graph has replayed, here with the capture emulated on the CPU (conftest)."""
    from fastrnn import backend

    why = backend.reason_unavailable("triton", torch.device("cpu"), torch.float32)
    if why is not None:
        pytest.skip(f"Triton on the CPU: {why}")
    cases = [c for c in gpu_smoke.CASES if c.graph]
    assert {c.cells for c in cases} == {False, True} and any(c.proj for c in cases)
    for case in cases:
        assert gpu_smoke.run(case, torch.device("cpu")) <= gpu_smoke.TOLERANCE[case.dtype], case.name
    assert sorted(k[0][0] for k in emulated_cuda_graphs) == ["bwd", "ext_bwd", "ext_fwd", "fwd"]


def test_smoke_runs_on_cpu(capsys):
    """Every case the CPU can run passes there: the cpp ones on the CPU kernels and the emulated persistent engine's
    plans, the Triton ones (but the CUDA graphs') under the interpreter."""
    from fastrnn import backend

    assert gpu_smoke.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for mode in ("lstm", "gru", "rnn_tanh", "rnn_relu", "lstm-proj"):
        assert f"ok   cpp-{mode}:" in out
    if backend.reason_unavailable("triton", torch.device("cpu"), torch.float32) is None:
        for case in gpu_smoke.CASES:
            if case.backend == "triton" and not case.graph:
                assert f"ok   {case.name}:" in out


def test_smoke_reports_a_kernel_that_differs(monkeypatch, capsys):
    """A backend whose gradients are off by 1 % fails the case and the exit status."""
    from fastrnn.ops import cpp

    honest = cpp.layer

    def skewed(*args, **kwargs):
        return tuple(None if t is None else t * 1.01 for t in honest(*args, **kwargs))

    monkeypatch.setattr(cpp, "layer", skewed)
    # the Triton cases (a minute and a half under the interpreter) are test_smoke_runs_on_cpu's
    monkeypatch.setattr(gpu_smoke, "CASES", [c for c in gpu_smoke.CASES if c.backend == "cpp"])
    assert gpu_smoke.main(["--device", "cpu"]) == 1
    assert "FAIL cpp-gru: max relative difference from the reference 1.0" in capsys.readouterr().out


def test_smoke_bf16_cases_take_the_tensor_cores_and_pass_with_their_numerics():
    """On an H200's limits the bf16 cases plan the persistent engine on tensor cores, in one block at H and split
    over blocks at H_GRID; under the emulator (the GPU's storage rounding and fragment layout) each is within the
    smoke's bf16 tolerance, so a GPU failure there is the GPU's, not the inputs'."""
    from fastrnn.ops import cpp

    bf16 = [c for c in gpu_smoke.CASES if c.dtype == "bf16"]
    limits = dict(sms=132, smem=232448, cooperative=True, cluster=8, mma=True)
    plans = {c.name: cpp.persistent_plan(c.mode, gpu_smoke.B, c.hidden, torch.bfloat16, limits=limits) for c in bf16}
    assert all(p["mma"] for p in plans.values())
    assert any(p["slices"] == 1 for p in plans.values()) and any(p["slices"] > 1 for p in plans.values())
    cpp._lib()._set_persist_emulation(limits["sms"], limits["smem"], limits["cluster"], True)
    try:
        for c in bf16:
            assert gpu_smoke.run(c, torch.device("cpu")) <= gpu_smoke.TOLERANCE["bf16"], c.name
    finally:
        cpp._lib()._set_persist_emulation(0, 0)


@pytest.mark.parametrize("gpu", ["h200", "h100-pcie"])
def test_smoke_says_which_schemes_it_reaches(gpu, monkeypatch):
    """With FASTRNN_PERSISTENT=1 each cpp case's line names its plan; on an H200's limits (an H100 SXM's too) and on
    an H100 PCIe's fewer SMs the cases reach one block, a cluster and tensor cores, and with clusters off (the
    memcheck-grid step) the grid barrier; a pair launch says so, and the projection's case says the engine leaves it
    to the per-step path. Without the switch, or for Triton, nothing is added."""
    from fastrnn.ops import cpp

    hopper = {"h200": H200_LIMITS, "h100-pcie": H100_PCIE_LIMITS}[gpu]
    cpp_cases = [c for c in gpu_smoke.CASES if c.backend == "cpp"]
    monkeypatch.delenv("FASTRNN_PERSISTENT", raising=False)
    assert all(gpu_smoke.case_plan(c, hopper) is None for c in cpp_cases)
    monkeypatch.setenv("FASTRNN_PERSISTENT", "1")
    # per-step: the projection's case, which the engine does not take
    for limits, want in ((hopper, {"block", "cluster", "per-step"}), (dict(hopper, cluster=0),
                                                                       {"block", "grid", "per-step"})):
        plans = {c: gpu_smoke.case_plan(c, limits) for c in cpp_cases}
        assert {p["scheme"] for p in plans.values()} == want, limits
        for c, p in plans.items():
            assert p == cpp.persistent_plan(c.mode, c.batch, c.hidden, gpu_smoke.DTYPES[c.dtype], cells=c.cells,
                                            proj_size=gpu_smoke.PROJ if c.proj else 0, bidirectional=c.pair,
                                            limits=limits)
            text = gpu_smoke.describe(p)
            assert text.startswith(f" [{p['scheme']}") and (", mma" in text) == p["mma"], (c.name, text)
            split = p["scheme"] in ("grid", "cluster")
            assert (f" x{p['slices']}" in text) == split and (", 2 dirs" in text) == (p["dirs"] == 2), (c.name, text)
        assert any(p["mma"] for p in plans.values()) and any(p["dirs"] == 2 for p in plans.values())
    assert all(gpu_smoke.case_plan(c, hopper) is None for c in gpu_smoke.CASES if c.backend == "triton")
    assert gpu_smoke.describe(None) == ""


def test_smoke_bidirectional_cases_run_both_directions_in_one_launch():
    """The sanitizers see the pair launch (each direction on half the SMs) at both hidden sizes and dtypes."""
    from fastrnn.ops import cpp

    pairs = [c for c in gpu_smoke.CASES if c.pair]
    assert {(c.hidden, c.dtype) for c in pairs} == {(h, d) for h in (gpu_smoke.H, gpu_smoke.H_GRID)
                                                    for d in ("fp32", "bf16")}
    limits = dict(sms=132, smem=232448, cooperative=True, cluster=8, mma=True)
    for c in pairs:
        plan = cpp.persistent_plan(c.mode, gpu_smoke.B, c.hidden, gpu_smoke.DTYPES[c.dtype], limits=limits,
                                   bidirectional=True)
        assert plan["dirs"] == 2, (c.name, plan)


def test_smoke_tile_cases_split_the_batch_and_the_units():
    """The sanitizers see plans of several batch tiles, each over several blocks (a cluster each, or at the grid
    scheme's per-tile barrier with clusters off); emulated there (tiles run one after another), they pass."""
    from fastrnn.ops import cpp

    tiled = [c for c in gpu_smoke.CASES if c.batch != gpu_smoke.B]
    assert {c.mode for c in tiled} == {"LSTM", "GRU"}
    for cluster, scheme in ((8, "cluster"), (0, "grid")):
        limits = dict(sms=132, smem=232448, cooperative=True, cluster=cluster, mma=True)
        for c in tiled:
            p = cpp.persistent_plan(c.mode, c.batch, c.hidden, torch.float32, limits=limits)
            assert p["scheme"] == scheme and p["tiles"] > 1 and p["slices"] > 1, (c.name, p)
    cpp._lib()._set_persist_emulation(132, 232448, 0, True)
    try:
        for c in tiled:
            assert gpu_smoke.run(c, torch.device("cpu")) <= gpu_smoke.TOLERANCE["fp32"], c.name
    finally:
        cpp._lib()._set_persist_emulation(0, 0)


def _stand_in_gpu_tools(tmp_path, steps: str) -> dict:
    """The environment for gpu_check.sh with a stand-in python (CUDA present, ``python -m fastrnn`` at once, else
    the bash lines ``steps``) and compute-sanitizer (runs its program)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_py = bin_dir / "python"
    fake_py.write_text("#!/bin/bash\n[ \"$1\" = -c ] && exit 0\n[ \"$1\" = -m ] && [ \"$2\" = fastrnn ] && exit 0\n"
                       + steps)
    sanitizer = bin_dir / "compute-sanitizer"
    sanitizer.write_text("#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift 2; done\nexec \"$@\"\n")
    for f in (fake_py, sanitizer):
        f.chmod(0o755)
    return dict(os.environ, PYTHON=str(fake_py), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_side_by_side_steps_run_at_once_and_report_in_plan_order(tmp_path):
    """The correctness steps as concurrent processes: with a stand-in python (each check 3 s), the eight
    side-by-side steps take about one step's time, every row of summary.md says passed, in the plan's order; one
    failing check fails the run and only its row."""
    env = _stand_in_gpu_tools(tmp_path, "sleep 3\n[ -n \"$FAIL_ONE\" ] && [ \"$FASTRNN_PERSISTENT_CLUSTER\" = 0 ] "
                                        "&& exit 7\nexit 0\n")
    out = tmp_path / "gpu"
    start = __import__("time").monotonic()
    proc = subprocess.run(["bash", CHECK, "--no-build", "--no-bench", "--out", str(out)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)
    took = __import__("time").monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert took < 12, took  # eight 3 s steps one after another would take 24 s
    rows = [ln for ln in (out / "summary.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "backends", "cuda-tests", "cuda-tests-persistent", "memcheck", "memcheck-persistent", "racecheck-persistent",
        "synccheck-persistent", "memcheck-grid", "memcheck-graphs", "cuda-clock-tests"]
    assert all("passed" in r for r in rows) and not list(out.glob(".row.*"))
    env["FAIL_ONE"] = "1"
    proc = subprocess.run(["bash", CHECK, "--no-build", "--no-bench", "--out", str(out)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 1
    failed = [ln for ln in (out / "summary.md").read_text().splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and "memcheck-grid" in failed[0] and "exit status 7" in failed[0]


def test_budget_runs_what_fits_and_names_the_rest(tmp_path):
    """--budget: with a stand-in python (each check 3 s, the calibration 7 s), 50 s hold the correctness steps and the
    calibration (each starts with its 30 s left, after the 10 s of timeout's grace) but not the benchmark, whose row
    says so, as does the summary with the --only that runs it next; exit status 3. With no budget at all no step
    starts."""
    env = _stand_in_gpu_tools(tmp_path, "[[ \"$*\" == *persist_calibrate* ]] && { sleep 7; exit 0; }\n"
                                        "sleep 3\nexit 0\n")
    out = tmp_path / "gpu"

    def rows():
        lines = (out / "summary.md").read_text().splitlines()
        return {r.split("|")[1].strip(): r.split("|")[2] for r in lines if r.startswith("| ") and "---" not in r
                and not r.startswith("| step ")}

    proc = subprocess.run(["bash", CHECK, "--no-build", "--budget", "50", "--out", str(out)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    got = rows()
    assert list(got)[-2:] == ["calibrate", "benchmark"] and len(got) == 12, got
    assert all("passed" in r for name, r in got.items() if name != "benchmark"), got
    assert "not run" in got["benchmark"] and not (out / "benchmark.log").exists(), got
    assert "--no-build --only benchmark`" in (out / "summary.md").read_text()
    proc = subprocess.run(["bash", CHECK, "--no-build", "--no-bench", "--budget", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    got = rows()
    assert len(got) == 10 and all("not run" in r for r in got.values()), got
    assert f"--only {','.join(got)}`" in (out / "summary.md").read_text()


# The calibration of the persistent engine's cost model (benchmarks/persist_calibrate.py, the check's
# "calibrate" step): its measurements and fit on a stand-in GPU whose pieces cost what the test says.
import persist_calibrate  # noqa: E402
import fastrnn  # noqa: E402
from fastrnn.ops import cpp as _cpp  # noqa: E402

# clusters held at once, a block per SM, by a stand-in's 8 GPCs of 18 and 14 SMs (a GPC's leftover SMs host none):
# of 4 and 8 fewer than the SMs allow
H200_GPCS = (18,) * 5 + (14,) * 3
H200_LIMITS = dict(sms=132, smem=232448, cooperative=True, cluster=8, mma=True, pad=True,
                   clusters_at_once={n: sum(g // n for g in H200_GPCS) for n in range(2, 9)})
# The device tool's default GPU is an H100 (80 GB): an SXM one has an H200's SMs and shared memory, a PCIe one 114
# SMs (here in 6 GPCs of 16 and one of 18, a stand-in split)
H100_PCIE_LIMITS = dict(H200_LIMITS, sms=114,
                        clusters_at_once={n: sum(g // n for g in (16,) * 6 + (18,)) for n in range(2, 9)})
A100_LIMITS = dict(sms=108, smem=166912, cooperative=True, cluster=0, mma=True, pad=True)
# cycles of the stand-in: a model unit, a chunk staged from L2 and one exchanged in shared memory, a GEMM call's fixed
# part, a warp's mma round per kind, barriers (the grid's: a fixed part and one per member)
TRUE = dict(unit=3.0, stage=900.0, exchange=130.0, fixed=250.0, mma={2: 50.0, 4: 70.0}, block=40.0,
            grid=(1800.0, 6.0), cluster={2: 500.0, 4: 650.0})


def _stand_in_probe(limits, calls):
    """A GPU of ``limits`` whose pieces cost what TRUE says, at 1.8 GHz; it refuses what the real probe refuses for
    shared memory, and places no cluster of 8 nor more clusters than ``clusters_at_once`` (the launch then takes the
    grid barrier)."""
    def probe(scheme, blocks, cluster=0, K=0, R=0, bt=0, mma=False, es=4, kc=64, pad=True, rows=1, iters=1,
              exchange=False):
        calls.append((scheme, blocks, cluster, K))
        assert 1 <= blocks <= limits["sms"] and (scheme != "cluster" or cluster <= limits["cluster"])
        held = limits.get("clusters_at_once", {}).get(cluster, limits["sms"] // max(cluster, 1))
        placed = cluster in TRUE["cluster"] and blocks // cluster <= held
        ran = "grid" if scheme == "cluster" and not placed else scheme
        step = {"block": TRUE["block"], "grid": TRUE["grid"][0] + TRUE["grid"][1] * blocks}.get(ran) \
            or TRUE["cluster"][cluster]
        if K:
            assert 1 <= rows <= blocks
            p = fastrnn._C._persist_gemm_price(K, R, bt, mma, es, kc, pad, exchange=exchange)
            assert p["fits"] and p["smem"] <= limits["smem"], (K, R, bt, mma, es, kc, pad, p)
            step += (p["steps"] * TRUE["mma"][es] if mma else p["units"] * TRUE["unit"]) + p["chunks"] * TRUE["stage"]
            step += p["exchanged"] * TRUE["exchange"]
            step += TRUE["fixed"]
        # blocks differ a little, symmetrically about the median
        cycles = [step * iters * (1 + 0.01 * (b - (blocks - 1) / 2) / blocks) for b in range(blocks)]
        return {"cycles": cycles, "ns": [c / 1.8 for c in cycles], "scheme": ran}
    return probe


def test_calibration_recovers_the_costs_of_the_pieces():
    """Given pieces that cost what TRUE says, the fits find the model's unit, the price of a chunk staged from L2 and
    of one exchanged in shared memory, the mma rounds' and the barriers' in it (the grid's, fixed and per member,
    from its sizes); a cluster that does not fit (8 here)
    ran at the grid barrier and is not taken for a cluster's; the plans' GEMMs of both loops (fp32 planned without
    TF32 and with it, bf16) and the sweeps are timed, each also in the smallest chunks and, of one chunk, also
    exchanged."""
    calls = []
    samples = persist_calibrate.measure(_stand_in_probe(H200_LIMITS, calls), H200_LIMITS)
    got = persist_calibrate.fit(samples)
    imp, u = got["implied"], TRUE["unit"]
    assert all(got[k].worst < 1e-3 for k in ("simt", "mma-bf16", "mma-tf32"))
    assert imp["unit_cycles"] == pytest.approx(u, rel=1e-3)
    assert imp["stage"] == pytest.approx(TRUE["stage"] / u, rel=1e-3)
    for kind in ("", "mma-bf16 ", "mma-tf32 "):
        assert imp[f"{kind}exchange"] == pytest.approx(TRUE["exchange"] / u, rel=1e-2)
    assert imp["mma-bf16"] == pytest.approx(TRUE["mma"][2] / u, rel=1e-3)
    assert imp["mma-tf32"] == pytest.approx(TRUE["mma"][4] / u, rel=1e-3)
    assert imp["unpriced"] == pytest.approx(TRUE["fixed"] / u, rel=1e-2)
    assert imp["grid_sync"] == pytest.approx(TRUE["grid"][0] / u, rel=1e-2)
    assert imp["grid_sync_member"] == pytest.approx(TRUE["grid"][1] / u, rel=1e-2)
    assert imp["cluster_sync"] == pytest.approx(max(TRUE["cluster"].values()) / u, rel=1e-2)
    assert persist_calibrate.clock_ghz(samples) == pytest.approx(1.8)
    eights = [s for s in samples if s.scheme == "cluster" and "of 8" in s.label]
    assert [s.blocks for s in eights] == [104, 8] and all(s.ran == "grid" for s in eights)
    # clusters of 2 and 4: as many as the GPU holds at once (66 and 29), all placed
    held = {(s.label.split(" of ")[1].split(",")[0], s.blocks) for s in samples if s.ran == "cluster"}
    assert held == {("2", 132), ("2", 2), ("4", 116), ("4", 4)}, held
    simt = [s for s in samples if s.kind == "simt"]
    assert len({s.units for s in simt}) >= 3 and len({s.chunks for s in simt}) >= 3
    assert {s.kind for s in samples} == {"barrier", "simt", "mma-bf16", "mma-tf32"}
    for kind, unit in (("simt", 64), ("mma-bf16", 128), ("mma-tf32", 128)):
        gemms = [s for s in samples if s.kind == kind]
        assert any(f"kc {unit})" in s.label for s in gemms) and any(s.chunks > 1 for s in gemms)
        kept = [s for s in gemms if s.exchanged]
        assert kept and all(s.chunks == 0 and s.label.endswith(", exchanged)") for s in kept)
        assert {s.label.replace(", exchanged", "") for s in kept} <= {s.label for s in gemms if not s.exchanged}
        assert any(s.label.startswith("sweep") for s in gemms) and any(" B=" in s.label for s in gemms)
    model = dict(fastrnn._C._persist_gemm_price(64, 1, 1)["model"])
    text = persist_calibrate.markdown(samples, got, model, "a stand-in")
    assert f"| kGridSyncCycles | {model['grid_sync']} | {TRUE['grid'][0] / u:.0f} |" in text
    assert f"| kGridSyncMemberCycles | {model['grid_sync_member']} | {TRUE['grid'][1] / u:.0f} |" in text
    assert f"| kMmaCycles (bf16) | {model['mma']} | {TRUE['mma'][2] / u:.0f} |" in text
    assert f"| kExchangeCycles | {model['exchange']} | {TRUE['exchange'] / u:.0f} |" in text
    assert text.count("\n| ") == (2 + len(samples)) + (2 + 12)  # the samples' table and the constants', headed
    # the clusters held at once, and whether the runtime said so or the plans assume SMs ÷ size
    for measured, source in ((True, "(`cudaOccupancyMaxActiveClusters`;"), (False, "(the runtime did not say,")):
        text = persist_calibrate.markdown(samples, got, model, "a stand-in", None, H200_LIMITS["clusters_at_once"],
                                          measured)
        assert source in text and "the plans take these): 66 of 2, 42 of 3, 29 of 4" in text, text[:900]


def test_calibration_shows_the_plans_measured_prices_would_give():
    """With the prices a calibration measured (the stand-in's: barriers and chunks cheaper than persist.h's), the
    plans are made again through persistent_plan's ``costs``: persist.h's own prices change nothing, cheaper
    barriers split some layers that a block held whole, and the report lists each change; an unknown price is
    refused by name."""
    samples = persist_calibrate.measure(_stand_in_probe(H200_LIMITS, []), H200_LIMITS)
    got = persist_calibrate.fit(samples)
    costs = persist_calibrate.measured_costs(got["implied"])
    u = TRUE["unit"]
    assert costs == {"grid_sync": round(TRUE["grid"][0] / u), "grid_sync_member": round(TRUE["grid"][1] / u),
                     "cluster_sync": round(max(TRUE["cluster"].values()) / u),
                     "stage": round(TRUE["stage"] / u), "mma": round(TRUE["mma"][2] / u),
                     "exchange": round(TRUE["exchange"] / u)}
    model = dict(fastrnn._C._persist_gemm_price(64, 1, 1)["model"])
    same = {k: model[k] for k in ("grid_sync", "grid_sync_member", "cluster_sync", "stage", "mma", "exchange")}
    assert persist_calibrate.plan_changes(H200_LIMITS, same) == []
    changes = persist_calibrate.plan_changes(H200_LIMITS, costs)
    assert any(now["scheme"] == "block" and then["scheme"] in ("cluster", "grid") for _, now, then in changes)
    text = persist_calibrate.markdown(samples, got, model, "a stand-in", changes)
    assert all(f"| {name} | {persist_calibrate._plan_text(now)} | {persist_calibrate._plan_text(then)} |" in text
               for name, now, then in changes)
    with pytest.raises(RuntimeError, match="known prices are grid_sync, grid_sync_member, cluster_sync, stage, mma "
                                           "and exchange, got sync"):
        _cpp.persistent_plan("LSTM", 64, 256, torch.float32, limits=dict(H200_LIMITS, costs={"sync": 1}))


def test_calibration_follows_the_plans_on_another_gpu():
    """An A100's limits (108 SMs, 163 KiB of shared memory per block, no clusters): the plans there leave some
    SIMT loops unpadded, and the probe gets each plan's padding (padded, they would not fit a block); no cluster
    is asked for."""
    calls = []
    samples = persist_calibrate.measure(_stand_in_probe(A100_LIMITS, calls), A100_LIMITS)
    assert not any(c[0] == "cluster" for c in calls)
    unpadded = [p for p in persist_calibrate.plan_gemms(A100_LIMITS) if not p[8]]
    assert unpadded, "expected plans with unpadded strides on an A100's limits"
    got = persist_calibrate.fit(samples)
    assert got["implied"]["unit_cycles"] == pytest.approx(TRUE["unit"], rel=1e-3)


def test_calibration_prices_a_grid_barrier_that_does_not_grow_flat():
    """Grid barriers that cost no more over more blocks (or a line through a negative fixed part) give a price per
    member of 0, which the measured costs keep (persist.h's would otherwise add to the flat price): the barrier over
    the most blocks, flat; one size alone likewise."""
    def grid(n, cycles):
        return persist_calibrate.Sample("barrier", f"grid barrier, {n} blocks", "grid", "grid", n, cycles, cycles / 2)
    for cycles in ({132: 2000.0, 66: 2100.0, 16: 2300.0}, {132: 2000.0, 66: 900.0, 16: 100.0}, {132: 2000.0}):
        got = persist_calibrate.grid_barrier([grid(n, c) for n, c in cycles.items()], 2.0)
        assert got == {"grid_sync": cycles[132] / 2.0, "grid_sync_member": 0.0}
        assert persist_calibrate.measured_costs(got) == {"grid_sync": round(cycles[132] / 2.0), "grid_sync_member": 0}
    rising = persist_calibrate.grid_barrier([grid(n, 1000.0 + 5 * n) for n in (132, 66, 16)], 2.0)
    assert rising == pytest.approx({"grid_sync": 500.0, "grid_sync_member": 2.5})
    # a price that rounds to 0 is not measured as free: persist.h's stays (but for the price per member)
    assert persist_calibrate.measured_costs({"stage": 0.3, "exchange": 5.2, "grid_sync": 100.0,
                                             "grid_sync_member": 0.2}) == {"exchange": 5, "grid_sync": 100,
                                                                            "grid_sync_member": 0}


def test_calibration_says_what_it_cannot_fit():
    """Three GEMMs, or GEMMs of one chunk count, do not identify three terms: no fit, and the report says so."""
    one = persist_calibrate.Sample("simt", "g", "block", "block", 1, 100.0, 50.0, units=64, steps=4, chunks=1)
    same = [persist_calibrate.Sample(**{**one.__dict__, "units": u, "cycles": 100.0 + u}) for u in (64, 128, 256, 512)]
    assert persist_calibrate.fit(same)["simt"] is None
    assert persist_calibrate.fit(same[:3])["simt"] is None
    text = persist_calibrate.markdown(same, persist_calibrate.fit(same), {}, "a stand-in")
    assert "4 GEMMs do not identify" in text and "no constants implied" in text


@pytest.mark.parametrize("costs", [{}, {"grid_sync": 1500, "grid_sync_member": 9}], ids=["persist.h", "per-member"])
def test_gemm_price_is_what_the_plan_pays(costs):
    """The calibration fits the prices the plan uses: a plan's cost is its forward and backward GEMMs' prices,
    their chunks staged from L2 at kStageCycles, or their one chunk at kExchangeCycles where the cells put the
    operand in shared memory (a block holding every unit over a K of one chunk, a cluster pushing), and the barriers
    at the scheme's price (the grid's: fixed, plus per member of its sync group, a batch tile's slices)."""
    model = dict(fastrnn._C._persist_gemm_price(64, 1, 1)["model"], **costs)
    checked = pushed = kept = grids = 0
    for mode, G in (("LSTM", 4), ("GRU", 3), ("RNN_TANH", 1)):
        for B, H in ((64, 256), (64, 1024), (1, 512), (16, 128), (64, 512)):
            for dtype, es in ((torch.float32, 4), (torch.bfloat16, 2)):
                p = _cpp.persistent_plan(mode, B, H, dtype, limits=dict(H200_LIMITS, costs=costs))
                if p["scheme"] == "per-step":
                    continue
                U, bt, mma = p["units"], p["batch_tile"], p["mma"]
                # a GEMM whose operand the cluster's blocks push keeps two staged operands
                prices = []
                for i, (K, R) in enumerate(((H, G * U), (G * H, U))):
                    kc, push = p["chunks"][i], p["push"][i]
                    own = p["slices"] == 1 and kc >= K
                    prices.append(fastrnn._C._persist_gemm_price(K, R, bt, mma, es, kc, p["padded"], 2 if push else 1,
                                                                 exchange=own or push))
                    kept += own or push
                f, b = prices
                assert f["fits"] and b["fits"] and max(f["smem"], b["smem"]) == p["smem"], p
                sync = {"block": 0, "cluster": model["cluster_sync"],
                        "grid": model["grid_sync"] + model["grid_sync_member"] * p["slices"]}[p["scheme"]]
                cost = (f["units"] + b["units"] + (f["chunks"] + b["chunks"]) * model["stage"] +
                        (f["exchanged"] + b["exchanged"]) * model["exchange"] + 2 * sync)
                assert cost == p["cost"], (mode, B, H, dtype, p)
                checked += 1
                pushed += any(p["push"])
                grids += p["scheme"] == "grid"
    assert checked >= 20 and pushed >= 5 and kept >= 10 and grids >= 3


def test_whole_grid_sync_is_timed_where_grid_plans_have_tiles():
    """gpu_check's whole-grid-sync step times configurations whose fp32 grid plans on an H200's limits (and an H100
    PCIe's) split the batch into tiles, whose blocks the per-group barrier lets run apart."""
    line = _check("--dry-run", "--only", "whole-grid-sync").stdout.splitlines()[1]
    configs = [tuple(map(int, c.split(","))) for c in re.findall(r"--config ([\d,]+)", line)]
    for limits in (H200_LIMITS, H100_PCIE_LIMITS):
        tiled = set()
        for _, B, _, H, _ in configs:
            for mode in ("LSTM", "GRU", "RNN_TANH"):
                p = _cpp.persistent_plan(mode, B, H, torch.float32, limits=limits)
                if p["scheme"] == "grid" and p["tiles"] > 1:
                    tiled.add((B, H))
        assert len(configs) == 2 and len(tiled) == 2, (configs, tiled, limits["sms"])


def test_gemm_price_names_a_bad_chunk():
    with pytest.raises(RuntimeError, match="kc must be a multiple of 64, got 96"):
        fastrnn._C._persist_gemm_price(256, 64, 4, False, 4, 96)
    with pytest.raises(RuntimeError, match="kc must be a multiple of 128, got 64"):
        fastrnn._C._persist_gemm_price(256, 64, 4, True, 2, 64)
    with pytest.raises(RuntimeError, match=r"kc must be at least K \(256\), got 128"):
        fastrnn._C._persist_gemm_price(256, 64, 4, False, 4, 128, exchange=True)


def test_probe_names_a_bad_argument():
    """The probe checks what needs no GPU before it asks for one."""
    probe = fastrnn._C._persist_probe
    for kw, message in ((dict(scheme="ring"), 'scheme must be "block", "grid" or "cluster", got "ring"'),
                        (dict(iters=0), "iters must be 1 to 10000000, got 0"),
                        (dict(K=-4), "K must be 0 .the barrier alone. or positive, got -4"),
                        (dict(K=256, R=32, bt=4, rows=9), r"rows .the operand's batch tiles. must be 1 to blocks .8., "
                                                          "got 9"),
                        (dict(K=256, R=32, bt=4, es=8), "es must be 2 .16-bit. or 4 .fp32., got 8"),
                        (dict(K=256, R=0, bt=4), "needs positive K, R and bt, got 256, 0, 4"),
                        (dict(K=256, R=32, bt=4, kc=128, exchange=True), "exchange needs a GEMM of one chunk .K > 0, "
                                                                         "kc >= K., got K 256, kc 128"),
                        (dict(exchange=True), "exchange needs a GEMM of one chunk .K > 0, kc >= K., got K 0")):
        args = dict(dict(device=0, scheme="block", blocks=8), **kw)
        with pytest.raises(RuntimeError, match=message):
            probe(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where there is no GPU")
def test_calibration_without_a_gpu_says_so(capsys):
    assert persist_calibrate.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    if fastrnn._C.build_info().get("cuda_archs"):
        with pytest.raises(RuntimeError, match="device must be a CUDA device index below 0, got 0"):
            fastrnn._C._persist_probe(0, "grid", 1)


if torch.cuda.is_available():  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.sm_clocks
    def test_cuda_calibration_runs_and_fits():
        """A quick calibration on the GPU (few steps per launch: not a measurement): every piece ran, blocks
        meeting at a grid barrier took longer than at their own, and the SIMT fit has a positive unit."""
        limits = dict(fastrnn._C.cuda_limits(0))
        samples = persist_calibrate.measure(persist_calibrate.gpu_probe(0), limits, quick=True)
        block = next(s for s in samples if s.label.startswith("block barrier") and s.blocks > 1)
        grid = [s for s in samples if s.ran == "grid"]
        assert grid and all(s.cycles > block.cycles for s in grid)
        # a GEMM step costs more than the barrier after it, and a GPU's SM clock is between 0.5 and 3 GHz
        assert all(s.cycles > block.cycles for s in samples if s.kind != "barrier")
        assert 0.5 < persist_calibrate.clock_ghz(samples) < 3.0
        got = persist_calibrate.fit(samples)
        assert got["simt"] is not None and got["implied"]["unit_cycles"] > 0

    @pytest.mark.cuda
    def test_cuda_clusters_at_once_are_what_a_launch_places():
        """cuda_limits' clusters of each size held at once (what the plans take): within the SMs, no more for a
        larger size, and what the launch's own check (clusters_fit) places as clusters for the probe, a kernel
        other than the one asked, at a block per SM: that many run as clusters, one more at the grid barrier."""
        limits = dict(fastrnn._C.cuda_limits(0))
        at_once = {int(n): held for n, held in limits["clusters_at_once"].items()}
        assert sorted(at_once) == list(range(2, limits["cluster"] + 1)), at_once
        assert limits["clusters_measured"] or not at_once, "cudaOccupancyMaxActiveClusters did not answer"
        held = [at_once[n] for n in sorted(at_once)]
        assert all(0 <= at_once[n] <= limits["sms"] // n for n in at_once) and held == sorted(held, reverse=True)
        for n, most in at_once.items():
            if most:
                assert fastrnn._C._persist_probe(0, "cluster", most * n, cluster=n, iters=1)["scheme"] == "cluster"
            if (most + 1) * n <= limits["sms"]:
                assert fastrnn._C._persist_probe(0, "cluster", (most + 1) * n, cluster=n, iters=1)["scheme"] == "grid"


# Host time per step of the CUDA calls (benchmarks/host_time.py, the measurements' "host-time" step).
import host_time  # noqa: E402


def test_host_time_counts_steps_as_the_benchmark_does_and_says_what_did_not_run():
    """µs per step: a call's host time over T per layer (twice with the backward); a call that waited for the GPU,
    and an implementation that did not run, say so."""
    cfg = host_time.Config(512, 16, 128, 128, 2)
    rows = [host_time.Row(cfg, "lstm", "fwd+bwd", "fastrnn-cpp", host_us=2048.0, gpu_us=9000.0),
            host_time.Row(cfg, "lstm", "fwd", "triton-step", host_us=5000.0, gpu_us=5100.0, note="returned after"),
            host_time.Row(cfg, "gru", "fwd", "triton-persist", note="not run: needs H >= 128")]
    assert [r.steps for r in rows] == [2048, 1024, 1024]
    text = host_time.markdown(rows, ["# title"])
    assert "| lstm | 512,16,128,128,2 | fwd+bwd | fastrnn-cpp | 1 | 4.39 | 2048 |  |" in text
    assert "| lstm | 512,16,128,128,2 | fwd | triton-step | 4.88 | 4.98 | 5000 | returned after |" in text
    assert "| gru | 512,16,128,128,2 | fwd | triton-persist |  |  |  | not run: needs H >= 128 |" in text


def test_host_time_measure_notes_a_wait_and_a_shape_a_variant_does_not_take(monkeypatch):
    """measure(): a call that returned after the GPU began is marked; a variant's ValueError (a shape it does not
    take) leaves a note; gradients are cleared before each call; any other error propagates."""
    cfg = host_time.Config(3, 2, 4, 5, 1)
    module = torch.nn.LSTM(4, 5)
    monkeypatch.setattr(host_time, "build", lambda impl, cell, c, device: module)
    seen = []

    def fake_time(call, reset, calls, warmup):
        module.weight_hh_l0.grad = torch.ones_like(module.weight_hh_l0)
        reset()
        seen.append(module.weight_hh_l0.grad)
        call()
        return 5000.0, 5100.0, True

    monkeypatch.setattr(host_time, "time_calls", fake_time)
    row = host_time.measure(host_time.Row(cfg, "lstm", "fwd+bwd", "torch.nn"), torch.device("cpu"), 1, 2)
    assert (row.host_us, row.gpu_us) == (5000.0, 5100.0) and row.note.startswith("returned after the GPU began")
    assert seen == [None] and module.weight_hh_l0.grad is not None  # cleared, then the call's backward ran

    def refuse(call, reset, calls, warmup):
        raise ValueError("the 'persist' variant needs no projection")

    monkeypatch.setattr(host_time, "time_calls", refuse)
    row = host_time.measure(host_time.Row(cfg, "lstm", "fwd", "triton-persist"), torch.device("cpu"), 1, 2)
    assert row.host_us == 0 and row.note == "not run: the 'persist' variant needs no projection"

    def crash(call, reset, calls, warmup):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(host_time, "time_calls", crash)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        host_time.measure(host_time.Row(cfg, "lstm", "fwd", "triton-step"), torch.device("cpu"), 1, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where there is no GPU")
def test_host_time_without_a_gpu_says_so(capsys):
    assert host_time.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        host_time.main(["--impls", "fastrnn-cpp,cudnn"])
    assert "unknown ['cudnn']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        host_time.main(["--warmup", "2"])
    assert "--warmup must be at least 3" in capsys.readouterr().err


def test_host_time_holds_the_gpu_for_the_calls_after_compiling_and_capturing():
    """The sleep before a call is twice the longest host time since the compile (1st call) and the capture (2nd),
    plus a millisecond: a 14 s compile must not hold the GPU 28 s before every later call."""
    assert host_time.sleep_seconds([]) == host_time.sleep_seconds([14.0, 2.0]) == pytest.approx(1e-3)
    assert host_time.sleep_seconds([14.0, 2.0, 0.004, 0.01, 0.002]) == pytest.approx(0.021)


if torch.cuda.is_available():  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.parametrize("mode", host_time.MODES)
    def test_cuda_host_time_runs(mode):
        """Two timed calls of each implementation at a shape every one takes: each ran, its host time positive
        and below a second, and the GPU's time positive."""
        for impl in host_time.IMPLS:
            r = host_time.measure(host_time.Row(host_time.Config(20, 4, 8, 128, 1), "lstm", mode, impl),
                                  torch.device("cuda"), calls=2, warmup=3)
            assert 0 < r.host_us < 1e6 and r.gpu_us > 0, r


# The persistent engine's phase clocks (fastrnn._C._persist_clocks, benchmarks/persist_phases.py, the
# measurements' "phases" step).
import persist_phases  # noqa: E402


def _clock_record(launch, T, blocks):
    """A timed launch as _persist_clocks returns it: block b's cycles per step in phase/barrier slot s are
    100 * (s + 1) + 10 * b, W_hh's load 1,000 + b, the launch's cycles their sum and its nanoseconds at 1.5 GHz."""
    rows = []
    for b in range(blocks):
        slots = [1000 + b] + [T * (100 * (s + 1) + 10 * b) for s in range(4)]
        slots += [sum(slots), sum(slots) / 1.5]
        rows.append(slots)
    plan = dict(scheme="cluster", blocks=blocks, units=32, batch_tile=4, mma=False)
    return dict(launch=launch, mode="LSTM", T=T, plan=plan, clocks=torch.tensor(rows, dtype=torch.int64))


def test_phases_are_cycles_per_step_over_the_blocks():
    s = persist_phases.summarize(_clock_record("ext_bwd", 10, 3))
    # slot s of block b: 100 (s + 1) + 10 b per step; mean over b = 0, 1, 2 adds 10, the slowest 20
    assert [name for name, _, _ in s["parts"]] == ["rows backward", "step barrier", "dh GEMM", "step barrier"]
    assert [v for _, mean, worst in s["parts"] for v in (mean, worst)] == pytest.approx(
        [110, 120, 210, 220, 310, 320, 410, 420], abs=0.5)
    assert s["load"] == pytest.approx(1001, abs=0.5)
    assert s["cycles_per_step"] == pytest.approx(1040 + 1001 / 10, abs=0.5)
    assert s["ghz"] == pytest.approx(1.5, rel=1e-3) and s["us_per_step"] == pytest.approx(s["cycles_per_step"] / 1500,
                                                                                          rel=1e-3)
    fwd = persist_phases.summarize(_clock_record("fwd", 4, 1))
    assert [name for name, _, _ in fwd["parts"]] == ["GEMM + cell", "step barrier"]
    bwd = persist_phases.summarize(_clock_record("bwd", 4, 1))
    assert [name for name, _, _ in bwd["parts"]] == ["dh GEMM + cell backward", "step barrier"]
    text = persist_phases.markdown([{"config": "4,1,8,128,1", "cell": "LSTM", "dtype": "fp32", "summary": fwd}],
                                   "a stand-in")
    assert "| 4,1,8,128,1 | LSTM | fp32 | fwd layer 0 | cluster, 1 blocks of 32 units x 4 rows |" in text
    assert "GEMM + cell 100 (100); step barrier 200 (200)" in text
    # a forward's launches run layer 0 first, a backward's the last layer first
    launches = [{"launch": k} for k in ("fwd", "fwd", "bwd", "bwd")]
    assert [layer for _, layer in persist_phases.zip_layers(launches, 2)] == [0, 1, 1, 0]


def test_phase_clock_slots_are_the_kernels():
    """The slots persist_phases reads are the extension's (persist.h's ClockSlot): W_hh's load first, a phase and its
    barrier side by side per phase, the launch's cycles and nanoseconds last."""
    slots = fastrnn._C._PERSIST_CLOCK_SLOTS
    assert slots["load"] == 0 and slots["barrier"] == slots["phase"] + 1
    assert slots["launch"] == slots["phase"] + 2 * slots["phases"] and slots["ns"] == slots["launch"] + 1
    assert slots["slots"] == slots["ns"] + 1 == 7 and persist_phases.SLOTS == slots


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where there is no GPU")
def test_phases_without_a_gpu_say_so(capsys, monkeypatch):
    monkeypatch.setenv("FASTRNN_PERSISTENT", "1")
    assert persist_phases.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    # the CPU's calls (the emulator's too) are not timed: clocks on and off leave no record
    fastrnn._C._persist_clocks(True)
    try:
        fastrnn._C._set_persist_emulation(132, 232448)
        m, x = fastrnn.LSTM(8, 16), torch.randn(3, 2, 8)
        assert "persistent engine" in fastrnn.explain(m, x)
        m(x)[0].sum().backward()
    finally:
        fastrnn._C._set_persist_emulation(0, 0)
        assert fastrnn._C._persist_clocks(False) == []


if torch.cuda.is_available():  # collected only where a GPU is present
    @pytest.mark.cuda
    @pytest.mark.sm_clocks
    @pytest.mark.parametrize("cell, kw", [("LSTM", {}), ("GRU", {}), ("LSTM", {"layer_norm": True})])
    def test_cuda_phase_clocks_add_up(monkeypatch, cell, kw):
        """A timed forward and backward on the persistent engine: a record per launch, every slot written, the
        slots of each block summing exactly to its launch's cycles (contiguous laps), a positive duration."""
        monkeypatch.setenv("FASTRNN_PERSISTENT", "1")
        records = persist_phases.timed_records(cell, persist_phases.Config(6, 3, 8, 128, 1), torch.float32,
                                               torch.device("cuda"), **kw)
        prefix = "ext_" if kw else ""
        assert [r["launch"] for r in records] == [prefix + "fwd", prefix + "bwd"], records
        for r in records:
            assert r["plan"]["scheme"] in ("block", "grid", "cluster"), r["plan"]
            c = r["clocks"].cpu()
            assert c.shape == (r["plan"]["blocks"], 7) and r["T"] == 6
            assert bool((c[:, :5] >= 0).all()) and bool((c[:, 6] > 0).all())
            assert torch.equal(c[:, :5].sum(1), c[:, 5]), c
            s = persist_phases.summarize(r)
            assert s["cycles_per_step"] > 0 and 0.3 < s["ghz"] < 3.5
