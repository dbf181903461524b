"""The benchmark harness end to end on a tiny case: files written and well-formed (not speed)."""

import contextlib
import csv
import dataclasses
import io
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_rnn.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import torch  # noqa: E402
from rnnbench import cases, cli, report, runner, timing  # noqa: E402

from conftest import assert_close, nn_lstm_autocast_error  # noqa: E402

IMPLS = ["fastrnn-reference", "torch.nn", "loop-eager"]
# On a CPU (the runs below ask for it, also where a GPU is present) the Triton backend never counts as runnable,
# so it always exercises the "unavailable" path.
ABSENT = "fastrnn-triton"
ALL_CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def _run(tmp_path, cells, extra, in_process):
    """The CLI's stdout; in a subprocess, or in this process where a second torch import would cost most of
    the test's time."""
    argv = [
        "--device", "cpu", "--config", "3,2,4,5,1", "--passes", "2", "--repeats", "2", "--warmup", "1", "--min-time", "0.001", "--threads", "1",
        "--gemm-size", "128", "--cells", ",".join(cells), "--impls", ",".join(IMPLS + [ABSENT]), "--out", str(tmp_path), *extra,
    ]  # fmt: skip
    if not in_process:
        proc = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout
    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


def _table_rows(md: str, header_start: str):
    """Data rows of the markdown table whose header line starts with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    assert set(lines[start + 1].replace("|", "").split()) == {"---"}
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return lines[start], rows


@pytest.mark.parametrize(
    "cells, extra, in_process",
    [(ALL_CELLS, (), False), (["lstm", "gru"], ("--packed", "--bidirectional"), True)],
    ids=["dense", "packed-bidir"],
)
def test_cli_writes_csv_markdown_png(tmp_path, cells, extra, in_process):
    stdout = _run(tmp_path, cells, extra, in_process)
    assert "torch threads: 1 intra-op" in stdout

    with open(tmp_path / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.CSV_FIELDS
        rows = list(reader)
    assert len(rows) == len(cells) * 2 * (len(IMPLS) + 1)
    assert {(r["cell"], r["mode"], r["impl"]) for r in rows} == {
        (c, m, i) for c in cells for m in ("fwd", "fwd+bwd") for i in IMPLS + [ABSENT]
    }
    absent = [r for r in rows if r["impl"] == ABSENT]
    assert all(r["status"] == "unavailable" and r["note"] and r["tokens_per_s"] == "" for r in absent)
    for r in rows:
        if r["impl"] == ABSENT:
            continue
        assert r["status"] == "ok", r
        assert (r["T"], r["B"], r["I"], r["H"], r["L"]) == ("3", "2", "4", "5", "1")
        assert int(r["repeats"]) == 2 * 2 and int(r["calls_per_repeat"]) >= 1  # rounds of both passes
        assert float(r["time_q1_s"]) <= float(r["time_median_s"]) <= float(r["time_q3_s"])
        assert float(r["tokens_per_s"]) == pytest.approx(int(r["tokens"]) / float(r["time_median_s"]), rel=1e-4)
        assert int(r["peak_mem_bytes"]) > 0
        if r["impl"] == "torch.nn":
            assert r["ratio_vs_torch_nn"] == "1"
        else:
            assert float(r["ratio_q1"]) <= float(r["ratio_vs_torch_nn"]) <= float(r["ratio_q3"])
            assert float(r["ratio_ci_lo"]) <= float(r["ratio_q1"]) and float(r["ratio_q3"]) <= float(r["ratio_ci_hi"])
            times = [float(t) for t in r["round_times_s"].split()]
            ratios = [float(x) for x in r["round_ratios"].split()]
            assert len(times) == len(ratios) == 4 and min(times) == pytest.approx(float(r["time_min_s"]), rel=1e-4)
            assert float(r["max_err"]) < 1e-3
    dirs = 2 if "--bidirectional" in extra else 1
    gates = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
    for r in rows:  # I=4, H=5: input projection and recurrent GEMM, forward; 3x that with backward
        forward = 2 * int(r["tokens"]) * gates[r["cell"]] * 5 * (4 + 5) * dirs
        assert int(r["gemm_flops"]) == forward * (3 if r["mode"] == "fwd+bwd" else 1), r
        assert float(r["peak_gflops_per_s"]) > 0
        if r["status"] == "ok":
            gflops = int(r["gemm_flops"]) / float(r["time_median_s"]) / 1e9
            assert float(r["gflops_per_s"]) == pytest.approx(gflops, rel=1e-3)
            assert float(r["peak_fraction"]) == pytest.approx(gflops / float(r["peak_gflops_per_s"]), rel=2e-3)
            # T = 3 steps per layer and direction, twice with the backward; floor / step = the peak fraction
            assert int(r["steps"]) == 3 * dirs * (2 if r["mode"] == "fwd+bwd" else 1)
            assert float(r["step_us"]) == pytest.approx(float(r["time_median_s"]) * 1e6 / int(r["steps"]), rel=1e-3)
            assert float(r["step_floor_us"]) / float(r["step_us"]) == pytest.approx(float(r["peak_fraction"]), rel=5e-3)
    if "--packed" in extra:
        assert all(3 <= int(r["tokens"]) <= 6 for r in rows)
    else:
        assert all(int(r["tokens"]) == 6 for r in rows)

    md = (tmp_path / "results.md").read_text()
    assert f"python benchmarks/bench_rnn.py --device cpu --config 3,2,4,5,1" in md and f" --out {tmp_path.name} " in md
    assert str(tmp_path.parent) not in md
    assert "| GEMM peak | float32 " in md
    assert "| CPU |" in md and "| torch |" in md and "| triton |" in md
    for mode_title in ("## forward (no_grad)", "## forward + backward"):
        assert mode_title in md
    header, table = _table_rows(md, "| cell | T,B,I,H,L | fastrnn-reference")
    assert header.count("|") - 1 == 2 + len(IMPLS)
    assert len(table) == len(cells)
    for cells in table:
        assert cells[1] == "3,2,4,5,1"
        assert "×" in cells[2] and "×" not in cells[3]
    _, details = _table_rows(md, "| cell | T,B,I,H,L | mode | impl")
    assert len(details) == len(rows) - len(absent)
    assert f"- `{ABSENT}`: " in md

    _, summary = _table_rows(report.summary_table(str(tmp_path / "results.csv"), "fastrnn-reference"), "| T,B,I,H,L")
    ran = [c for c in cases.CELLS if any(r["cell"] == c for r in rows)]
    assert len(summary) == 1 and summary[0][0] == "3,2,4,5,1" and len(summary[0]) == 1 + 2 * len(ran)
    by_col = {(r["mode"], r["cell"]): r for r in rows if r["impl"] == "fastrnn-reference"}
    for (mode, cell), text in zip([(m, c) for m in ("fwd+bwd", "fwd") for c in ran], summary[0][1:]):
        assert text == f"{float(by_col[mode, cell]['ratio_vs_torch_nn']):.2f} " + (
            f"({float(by_col[mode, cell]['ratio_ci_lo']):.2f}–{float(by_col[mode, cell]['ratio_ci_hi']):.2f})"
        )

    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000


def test_loop_matches_torch_nn_packed_bidirectional():
    """The eager-loop baseline computes what torch.nn computes, states of finished sequences included."""

    def results(impl, case):
        step = cases.make_step(cases.make_runner(impl, case), case, "fwd+bwd")
        return runner.results_of(step, case, "fwd+bwd")

    for cell in ALL_CELLS:
        cfg = cases.Config(7, 4, 3, 5, 2)
        case = cases.build_case(cell, cfg, True, True, torch.device("cpu"), torch.float64, 1)
        assert runner.max_err(results("loop-eager", case), results("torch.nn", case)) < 1e-10, cell


def test_quick_skips_only_costly_cases():
    big, small = cases.STANDARD_CONFIGS[1], cases.STANDARD_CONFIGS[0]
    assert cases.quick_skip("fastrnn-reference", "lstm", big, False, "fwd")
    assert cases.quick_skip("torch.nn", "lstm", big, False, "fwd+bwd") is None
    assert cases.quick_skip("loop-eager", "lstm", big, False, "fwd+bwd") is None
    assert cases.quick_skip("fastrnn-reference", "rnn_tanh", small, False, "fwd+bwd") is None
    assert cases.quick_skip("loop-compiled", "lstm", small, False, "fwd") is None
    assert cases.quick_skip("loop-compiled", "lstm", small, False, "fwd+bwd")


@pytest.mark.parametrize("n, k", [(1, 1), (5, 1), (6, 1), (8, 1), (9, 2), (15, 4), (40, 14)])
def test_median_ci_is_the_widest_95_percent_order_statistic_pair(n, k):
    """Checked against the coverage of the order statistics computed by brute force over all sign patterns."""
    xs = torch.randn(n).tolist()
    lo, hi = timing.median_ci(xs)
    ordered = sorted(xs)
    assert (lo, hi) == (ordered[k - 1], ordered[n - k])
    if n <= 15:
        import itertools

        def coverage(j):  # P(x(j) <= median <= x(n+1-j)) = P(j <= #below <= n - j)
            hits = sum(j <= sum(bits) <= n - j for bits in itertools.product((0, 1), repeat=n))
            return hits / 2**n

        assert k == 1 or coverage(k) >= 0.95
        assert 2 * (k + 1) > n + 1 or coverage(k + 1) < 0.95


def test_compare_flags_disjoint_ratios(tmp_path, capsys):
    def write(name, ratio, lo, hi):
        row = {k: "" for k in report.CSV_FIELDS}
        row.update(cell="lstm", T=1, B=1, I=1, H=1, L=1, mode="fwd", impl="loop-eager",
                   ratio_vs_torch_nn=ratio, ratio_ci_lo=lo, ratio_ci_hi=hi)  # fmt: skip
        report.write_csv(str(tmp_path / name), [row])
        return str(tmp_path / name)

    a = write("a.csv", 1.0, 0.95, 1.05)
    assert report.compare(a, write("b.csv", 1.02, 1.0, 1.1)) == 0
    assert report.compare(a, write("c.csv", 1.3, 1.2, 1.4)) == 1
    assert "DISAGREE" in capsys.readouterr().out


def test_mismatch_is_reported_instead_of_a_speed(monkeypatch):
    honest = cases.make_runner

    def skewed(impl, case):
        run = honest(impl, case)
        if impl != "loop-eager":
            return run
        return lambda: tuple(None if t is None else t * 1.01 for t in run())

    monkeypatch.setattr(runner, "make_runner", skewed)
    cfg = cases.Config(3, 2, 4, 5, 1)
    case = cases.build_case("gru", cfg, False, False, torch.device("cpu"), torch.float32, 0)
    opts = cli.parse_args(["--repeats", "2", "--warmup", "1", "--min-time", "0.001", "--no-memory"])
    entries = runner.new_entries(["torch.nn", "loop-eager", "fastrnn-reference"], {})
    runner.run_case(case, "fwd", entries, opts)
    rows = {r["impl"]: r for r in report.summarize(case, "fwd", entries)}
    assert rows["loop-eager"]["status"] == "mismatch" and "differs from torch.nn" in rows["loop-eager"]["note"]
    assert rows["loop-eager"]["tokens_per_s"] == "" and rows["loop-eager"]["ratio_vs_torch_nn"] == ""
    assert float(rows["loop-eager"]["max_err"]) > 5e-3
    assert rows["fastrnn-reference"]["status"] == "ok" and rows["fastrnn-reference"]["ratio_vs_torch_nn"]


def test_ill_conditioned_case_is_judged_against_float64(monkeypatch):
    """When torch.nn itself is far from the float64 answer, an implementation as close to it is no mismatch."""
    honest = cases.make_runner
    scale = {"torch.nn": 1.01, "fastrnn-reference": 0.95}

    def skewed(impl, case):
        run = honest(impl, case)
        if case.dtype == torch.float64 or impl not in scale:
            return run  # the float64 yardstick stays exact
        return lambda: tuple(None if t is None else t * scale[impl] for t in run())

    monkeypatch.setattr(runner, "make_runner", skewed)
    case = cases.build_case("lstm", cases.Config(4, 3, 5, 6, 1), False, False, torch.device("cpu"),
                                torch.float32, 0)  # fmt: skip
    opts = cli.parse_args(["--repeats", "1", "--warmup", "1", "--min-time", "0.001", "--no-memory"])
    entries = runner.new_entries(["torch.nn", "loop-eager", "fastrnn-reference"], {})
    runner.run_case(case, "fwd", entries, opts)
    rows = {r["impl"]: r for r in report.summarize(case, "fwd", entries)}
    assert rows["loop-eager"]["status"] == "ok" and "ill-conditioned" in rows["loop-eager"]["note"]
    assert float(rows["loop-eager"]["max_err"]) > 5e-3 and rows["loop-eager"]["ratio_vs_torch_nn"]
    assert rows["fastrnn-reference"]["status"] == "mismatch", rows["fastrnn-reference"]
    assert "vs float64" in rows["fastrnn-reference"]["note"]


def test_quick_adds_the_issue_11_cases_to_the_standard_table():
    quick = cli.plan(cli.parse_args(["--quick"]), torch.float32)
    extras = {(s.cell, s.variant): s for s in quick if s.variant}
    assert len(quick) == len(cases.STANDARD_CONFIGS) * 4 * 2 + len(extras)
    assert all(s.cfg == cases.Config(100, 64, 256, 256, 1) and s.mode == "fwd+bwd" for s in extras.values())
    for cell in ("lstm", "gru", "rnn_tanh"):
        assert extras[cell, "bf16"].dtype == torch.bfloat16 and extras[cell, "bf16"].autocast is None
        s = extras[cell, "autocast bf16"]
        assert s.dtype == torch.float32 and s.autocast == torch.bfloat16
    assert extras["lstm", "packed"].packed and extras["lstm", "proj 128"].proj_size == 128
    assert {c for c, v in extras if v == cases.CELL_LOOP} == {"lstm", "gru", "rnn_tanh"}
    assert not any(s.variant for s in cli.plan(cli.parse_args(["--quick", "--config", "3,2,4,5,1"]), torch.float32))
    assert not any(s.variant for s in cli.plan(cli.parse_args([]), torch.float32))
    assert [s.cell for s in cli.plan(cli.parse_args(["--quick", "--cells", "gru"]), torch.float32) if s.variant] == [
        "gru", "gru", "gru"
    ]  # fmt: skip
    looped = cli.plan(cli.parse_args(["--cell-loop", "--config", "3,2,4,5,2"]), torch.float32)
    assert len(looped) == 8 and all(s.variant == cases.CELL_LOOP for s in looped)
    for bad in ("--bidirectional", "--packed"):
        with pytest.raises(SystemExit):
            cli.parse_args(["--cell-loop", bad])


@pytest.mark.parametrize("variant", ["bf16", "autocast bf16", "packed", "proj 128", cases.CELL_LOOP])
def test_quick_extra_cases_run_and_match_torch_nn(variant):
    """Each kind of extra case, shrunk, runs every implementation that can run it and matches torch.nn."""
    args = cli.parse_args(["--quick", "--passes", "1", "--repeats", "1", "--min-time", "0.001", "--no-memory",
                           "--impls", "fastrnn-reference,torch.nn,loop-eager,loop-compiled"])  # fmt: skip
    spec = next(s for s in cli.plan(args, torch.float32) if s.variant == variant)
    small = dataclasses.replace(spec, cfg=cases.Config(5, 3, 8, 6, 1), proj_size=4 if spec.proj_size else 0)
    case = cases.build_case(small.cell, small.cfg, False, small.packed, torch.device("cpu"), small.dtype, 0,
                            proj_size=small.proj_size, autocast=small.autocast, variant=variant)  # fmt: skip
    entries = runner.new_entries(args.impls, cli.skips(small, args, torch.device("cpu"), {}))
    runner.run_case(case, small.mode, entries, args)
    rows = {r["impl"]: r for r in report.summarize(case, small.mode, entries)}
    no_loop = bool(small.proj_size) or variant == cases.CELL_LOOP  # cell loops: torch.nn's and fastrnn's cells
    assert rows["loop-compiled"]["status"] == ("unavailable" if no_loop else "skipped")
    assert rows["loop-eager"]["status"] == ("unavailable" if no_loop else "ok")
    nn_fails = small.autocast and small.cell == "lstm" and nn_lstm_autocast_error()
    if nn_fails:
        # torch.nn cannot run it on this CPU: a row saying why, and fastrnn checked against float64 instead
        assert rows["torch.nn"]["status"] == "error" and rows["torch.nn"]["note"], rows["torch.nn"]
        assert rows["fastrnn-reference"]["status"] == "ok" and "float64" in rows["fastrnn-reference"]["note"]
    else:
        assert rows["fastrnn-reference"]["status"] == "ok" and rows["fastrnn-reference"]["ratio_vs_torch_nn"]
    assert rows["torch.nn"]["variant"] == variant and rows["torch.nn"]["autocast"] == (
        "bfloat16" if small.autocast else ""
    )  # fmt: skip
    out = case.module(case.inp)[0]
    assert (out.data if small.packed else out).shape[-1] == (small.proj_size or small.cfg.H)


def test_recorded_command_has_no_path_of_this_machine():
    inside = os.path.join(REPO, "benchmarks", "results", "x")
    assert cli.pasteable_command(["--quick", "--out", inside], env={}) == (
        "python benchmarks/bench_rnn.py --quick --out benchmarks/results/x"
    )  # fmt: skip
    assert cli.pasteable_command([f"--out={inside}", "--note", "a b"], env={"HOME": "/x"}) == (
        "python benchmarks/bench_rnn.py --out=benchmarks/results/x --note 'a b'"
    )  # fmt: skip
    outside = os.path.join(os.path.dirname(REPO), "elsewhere", "run1")
    assert cli.pasteable_command(["--out", outside, "--name", "n"], env={}) == (
        "python benchmarks/bench_rnn.py --out run1 --name n"
    )  # fmt: skip


def test_recorded_command_carries_the_isa_caps():
    """A run capped to a smaller ISA (README, "CPU") records the caps, MKL's too, so its command reproduces the
    run; a run under some caps but not all is flagged, naming what is missing."""
    env = {"ATEN_CPU_CAPABILITY": "avx2", "FASTRNN_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OTHER": "1"}
    assert cli.pasteable_command(["--quick"], env=env) == (
        "FASTRNN_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 "
        "python benchmarks/bench_rnn.py --quick"
    )  # fmt: skip
    assert cli.pasteable_command(["--quick"], env={"FASTRNN_CPU_ISA": ""}) == "python benchmarks/bench_rnn.py --quick"
    assert cli.isa_cap_warning(env) is None and cli.isa_cap_warning({"OTHER": "1"}) is None
    partial = cli.isa_cap_warning({k: v for k, v in env.items() if k != "MKL_ENABLE_INSTRUCTIONS"})
    assert "not by MKL_ENABLE_INSTRUCTIONS:" in partial and "capped by FASTRNN_CPU_ISA, ONEDNN_MAX_CPU_ISA" in partial


def test_gemm_peaks_cover_every_dtype_the_cases_compute_in():
    peaks = timing.gemm_peaks(torch.device("cpu"), 64, rounds=1)
    assert set(peaks) == {"float32", "bfloat16"}
    assert all(rate > 0 and engine in ("torch.mm", "oneDNN linear") for rate, engine in peaks.values())


def test_no_nanobind_leak_reports_at_exit(tmp_path):
    """With triton imported before the run (as on a GPU machine), the objects the run froze are released."""
    pytest.importorskip("triton")
    argv = ["--config", "3,2,4,5,1", "--passes", "1", "--repeats", "1", "--warmup", "1", "--min-time", "0.001",
            "--threads", "1", "--cells", "lstm", "--modes", "fwd", "--impls", "torch.nn", "--no-memory",
            "--gemm-size", "32", "--out", str(tmp_path)]  # fmt: skip
    code = f"import runpy, sys, triton; sys.argv = {[SCRIPT] + argv!r}; runpy.run_path({SCRIPT!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nanobind" not in proc.stderr, proc.stderr[-3000:]


def test_layernorm_benchmark_table_and_agreement_check(tmp_path, monkeypatch):
    import bench_layernorm

    out = tmp_path / "ln.md"
    text = bench_layernorm.main(["--config", "4,3,5,6,1", "--rounds", "2", "--min-time", "0.001", "--threads", "1",
                                 "--out", str(out)])
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "implementation" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["fastrnn", *bench_layernorm.BASELINES]
    assert rows[0].rstrip().endswith("| 1.00 |")
    assert "python benchmarks/bench_layernorm.py --config 4,3,5,6,1" in text

    # named backends: one row each, the first the ratios' base, each checked against the float64 reference
    text = bench_layernorm.main(["--config", "4,3,5,6,1", "--rounds", "1", "--min-time", "0.001", "--threads", "1",
                                 "--backend", "cpp", "--backend", "reference"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "implementation" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["fastrnn-cpp", "fastrnn-reference", *bench_layernorm.BASELINES]
    assert "fastrnn-cpp ran on the 'cpp' backend; fastrnn-reference ran on the 'reference' backend" in text
    assert "time ÷ fastrnn-cpp's" in text

    # a loop that computes something else is refused before anything is timed
    right = bench_layernorm.ln_lstm_step
    wrong = lambda *args: tuple(1.01 * t for t in right(*args))  # noqa: E731
    monkeypatch.setattr(bench_layernorm, "ln_lstm_step", wrong)
    with pytest.raises(SystemExit, match="loop-eager disagrees with the float64 reference in output"):
        bench_layernorm.main(["--config", "4,3,5,6,1", "--rounds", "1", "--min-time", "0.001", "--threads", "1"])


def test_roofline_uses_fp32_where_16bit_gemms_are_emulated():
    """A CPU without bf16 arithmetic runs bf16 GEMMs far below fp32: a bf16 case is bounded by the fp32 peak
    (that is how fastrnn computes it there), and says so; with bf16 hardware its own peak bounds it."""
    emulated = {"float32": (69.0, "torch.mm"), "bfloat16": (0.17, "torch.mm")}
    native = {"float32": (220.0, "torch.mm"), "bfloat16": (440.0, "oneDNN linear")}
    assert report.roofline_peak(emulated, torch.bfloat16) == (69.0, "float32")
    assert report.roofline_peak(native, torch.bfloat16) == (440.0, "bfloat16")
    assert report.roofline_peak(emulated, torch.float32) == (69.0, "float32")
    assert report.roofline_peak({}, torch.float32) is None


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_cell_loop_runs_the_cells_of_each_layer(cell):
    """The cell-loop runners call torch.nn's and fastrnn's *Cell modules on the case module's own parameters:
    two layers' outputs and final states are the module's (fastrnn's cells within the fp32 tolerance)."""
    spec = cli.plan(cli.parse_args(["--cell-loop", "--cells", cell, "--config", "4,3,5,6,2"]), torch.float32)[0]
    case = cases.build_case(spec.cell, spec.cfg, False, False, torch.device("cpu"), torch.float32, 0,
                            variant=spec.variant)  # fmt: skip
    want = cases._module_runner(case.module, case)()
    impls = ["torch.nn"] + [i for i in ("fastrnn-cpp", "fastrnn-reference")
                            if cases.unavailable_reason(i, torch.device("cpu"), torch.float32) is None]  # fmt: skip
    for impl in impls:
        got = cases.make_runner(impl, case)()
        for name, g, w in zip(("rows", "h_n", "c_n"), got, want):
            assert (g is None) == (w is None), (impl, name)
            if w is not None:
                assert_close(g, w, f"{impl} {name}")
