"""What a run writes: CSV rows, the markdown report and the machine it ran on; ``--compare`` and ``--summary``."""

import csv
import datetime
import os
import platform
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from rnnbench import REPO
from rnnbench.cases import BASELINE, CELLS, MODE_TITLE, MODES, Case, gemm_flops
from rnnbench.runner import Entry
from rnnbench.timing import CI_LEVEL, median_ci, quartiles

CSV_FIELDS = (
    "cell", "T", "B", "I", "H", "L", "bidirectional", "packed", "dtype", "device", "mode", "impl",
    "status", "note", "tokens", "repeats", "calls_per_repeat",
    "time_median_s", "time_q1_s", "time_q3_s", "time_min_s", "time_max_s",
    "tokens_per_s", "tokens_per_s_q1", "tokens_per_s_q3",
    "ratio_vs_torch_nn", "ratio_ci_lo", "ratio_ci_hi", "ratio_q1", "ratio_q3",
    "compile_s", "peak_mem_bytes", "max_err", "round_times_s", "round_ratios",
    "variant", "proj_size", "autocast", "gemm_flops", "gflops_per_s", "peak_gflops_per_s", "peak_dtype", "peak_fraction",
    "steps", "step_us", "step_floor_us",
)  # fmt: skip
# what identifies a result across runs; "variant" came later, so older CSVs read as its empty default
KEY_FIELDS = CSV_FIELDS[:12] + ("variant",)
Peaks = Dict[str, Tuple[float, str]]


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "" if dtype is None else str(dtype).replace("torch.", "")


def roofline_peak(peaks: Optional[Peaks], dtype: Optional[torch.dtype]) -> Optional[Tuple[float, str]]:
    """(GF/s, dtype name) of the GEMM peak that bounds a case computing in ``dtype``: its own, except where a
    16-bit GEMM runs slower than fp32 (a CPU without bf16/fp16 arithmetic emulates it), where the fastest way to
    compute the case is in fp32 (fastrnn's 16-bit path does so) and the fp32 peak bounds it."""
    own, fp32 = (peaks or {}).get(_dtype_name(dtype)), (peaks or {}).get("float32")
    if own is None:
        return None
    if dtype in (torch.bfloat16, torch.float16) and fp32 is not None and fp32[0] > own[0]:
        return fp32[0], "float32"
    return own[0], _dtype_name(dtype)


def sequential_steps(case: Case, mode: str) -> int:
    """Recurrent steps one after another in a call, one direction at a time: T per layer and direction, twice
    with the backward's recurrence."""
    return case.cfg.T * case.cfg.L * (2 if case.bidirectional else 1) * (2 if mode == "fwd+bwd" else 1)


def summarize(case: Case, mode: str, entries: List[Entry], peaks: Optional[Peaks] = None) -> List[dict]:
    base = next((e for e in entries if e.impl == BASELINE and e.times), None)
    flops = gemm_flops(case, mode)
    peak = roofline_peak(peaks, case.compute_dtype)
    steps = sequential_steps(case, mode)
    rows = []
    for e in entries:
        row = dict(
            cell=case.cell, T=case.cfg.T, B=case.cfg.B, I=case.cfg.I, H=case.cfg.H, L=case.cfg.L,
            bidirectional=int(case.bidirectional), packed=int(case.packed),
            dtype=_dtype_name(case.dtype), device=case.device.type, mode=mode, impl=e.impl,
            status=e.status, note=e.note, tokens=case.tokens, repeats=len(e.times),
            calls_per_repeat=e.calls if e.times else "", variant=case.variant, proj_size=case.proj_size,
            autocast=_dtype_name(case.autocast), gemm_flops=flops,
            peak_gflops_per_s=f"{peak[0]:.4g}" if peak else "", peak_dtype=peak[1] if peak else "", steps=steps,
            step_floor_us=f"{flops / steps / (peak[0] * 1e9) * 1e6:.4g}" if peak else "",
        )  # fmt: skip
        row.update({k: "" for k in CSV_FIELDS if k not in row})
        if e.err is not None:
            row["max_err"] = f"{e.err:.3g}"
        if e.times:
            q1, med, q3 = quartiles(e.times)
            row.update(
                time_median_s=f"{med:.6g}", time_q1_s=f"{q1:.6g}", time_q3_s=f"{q3:.6g}",
                time_min_s=f"{min(e.times):.6g}", time_max_s=f"{max(e.times):.6g}",
                tokens_per_s=f"{case.tokens / med:.6g}",
                tokens_per_s_q1=f"{case.tokens / q3:.6g}", tokens_per_s_q3=f"{case.tokens / q1:.6g}",
                gflops_per_s=f"{flops / med / 1e9:.4g}", step_us=f"{med / steps * 1e6:.4g}",
            )  # fmt: skip
            if peak:
                row["peak_fraction"] = f"{flops / med / 1e9 / peak[0]:.4g}"
            row["round_times_s"] = " ".join(f"{t:.6g}" for t in e.times)
            if e.impl == "loop-compiled":
                row["compile_s"] = f"{max(0.0, e.first_call_s - med):.3g}"
            if e.peak is not None:
                row["peak_mem_bytes"] = e.peak
            if base is not None:
                # per-round ratios: both sides of a ratio were timed seconds apart, under the same load
                ratios = [tb / ti for tb, ti in zip(base.times, e.times)]
                r1, rm, r3 = quartiles(ratios)
                lo, hi = median_ci(ratios)
                row.update(
                    ratio_vs_torch_nn=f"{rm:.4g}", ratio_ci_lo=f"{lo:.4g}", ratio_ci_hi=f"{hi:.4g}",
                    ratio_q1=f"{r1:.4g}", ratio_q3=f"{r3:.4g}", round_ratios=" ".join(f"{x:.4g}" for x in ratios),
                )  # fmt: skip
        rows.append(row)
    return rows


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_description() -> str:
    """The CPU's model name with its family/model numbers and vector ISA: a VM may name every generation of a
    vendor's server CPUs alike ("AMD EPYC"), and what the figures mean depends on AVX-512 and its bf16 part."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ":" in ln:
                    key, value = (x.strip() for x in ln.split(":", 1))
                    fields.setdefault(key, value)
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = ("AVX-512" + (" with AVX512-BF16" if "avx512_bf16" in flags else ", no AVX512-BF16") if "avx512f" in flags
           else "AVX2+FMA, no AVX-512" if {"avx2", "fma"} <= flags else "no AVX2")
    name = fields.get("model name", platform.processor() or platform.machine())
    family = f"family {fields['cpu family']} model {fields['model']}, " if "cpu family" in fields else ""
    return f"{name} ({family}{isa})"


def machine_info(device: torch.device) -> Dict[str, str]:
    import fastrnn
    from fastrnn import _ext
    from importlib import metadata

    cpu = cpu_description()
    try:
        # the installed distribution's version: importing triton would load a GPU compiler stack (and its
        # nanobind bindings) into runs that never use it
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = "not installed"
    try:
        git = subprocess.run(
            ["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    info = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, {usable_cores()} usable by this process",
        "torch threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"oneDNN: {torch.backends.mkldnn.is_available()})",
        "triton": triton_version,
        "fastrnn": f"{fastrnn.__version__}, extension fastrnn._C {'loaded' if _ext._C is not None else 'missing'}"
        + (f"; its CPU code at {_ext._C.build_info()['cpu_isa']}" if _ext._C is not None else ""),
        "git": git or "no commit yet",
        "device": "CPU",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        info["cuDNN"] = str(torch.backends.cudnn.version())
    return info


def describe_peaks(peaks: Peaks, size: int) -> str:
    if not peaks:
        return "not measured"
    best = ", ".join(f"{k} {rate:.4g} GF/s ({engine})" for k, (rate, engine) in peaks.items())
    return f"{best}; best of {size}³ products on this run's threads"


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def fmt_rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def fmt_percent(fraction: str) -> str:
    return f"{float(fraction) * 100:.0f} %" if fraction else ""


def _summary_cell(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}¹" if row["status"] in ("skipped", "unavailable") else f"**{row['status'].upper()}**²"
    text = fmt_rate(float(row["tokens_per_s"]))
    if row["ratio_vs_torch_nn"] and row["impl"] != BASELINE:
        ratio, lo, hi = (float(row[k]) for k in ("ratio_vs_torch_nn", "ratio_ci_lo", "ratio_ci_hi"))
        text += f" ×{ratio:.2f} ({lo:.2f}–{hi:.2f})"
    if row.get("peak_fraction"):
        text += f" [{fmt_percent(row['peak_fraction'])}]"
    return text


def case_key(row: dict) -> Tuple[str, str]:
    """(cell, "T,B,I,H,L") naming a case in tables and plots; a variant of ``--quick`` rides on the cell."""
    variant = row.get("variant") or ""
    cell = f"{row['cell']} ({variant})" if variant else str(row["cell"])
    return cell, ",".join(str(row[k]) for k in ("T", "B", "I", "H", "L"))


def publish(text: str, out: Optional[str]) -> None:
    """A report printed, and written to ``out`` (its folder made) where given: the GPU check's measurement scripts'
    ending."""
    print(text, end="")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)


def write_markdown(
    path: str,
    rows: List[dict],
    info: Dict[str, str],
    settings: Dict[str, str],
    absent: Dict[str, str],
    impls: Sequence[str],
) -> None:
    shown = [i for i in impls if i not in absent]
    lines = ["# fastrnn recurrent-layer benchmark", ""]
    if settings.get("note"):
        lines += [f"> **{settings['note']}**", ""]
    lines += ["```", settings["command"], "```", "", "## Machine", ""]
    lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in settings.items() if k not in ("command", "note")]
    if absent:
        lines += ["", "Not run on this machine:"] + [f"- `{i}`: {why}" for i, why in absent.items()]
    lines += [
        "",
        "Each cell: median tokens/s (T·B per second; packed runs count real tokens) and, for every "
        "implementation but torch.nn, the median of the per-round ratio tokens/s ÷ torch.nn's tokens/s "
        f"(above 1: faster than torch.nn) with the {CI_LEVEL:.0%} confidence interval of that median; in "
        "brackets, the model's GEMM FLOPs per second as a fraction of the GEMM peak measured in this run "
        "for the dtype the case computes in, or fp32's where a 16-bit GEMM runs slower than fp32 here (no "
        "16-bit arithmetic on this CPU; the `peak_dtype` column of the CSV says which) (benchmarks/README.md, "
        "\"Roofline\").",
    ]
    by_case: Dict[Tuple, Dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault((row["mode"],) + case_key(row), {})[row["impl"]] = row
    for mode in MODES:
        keys = [k for k in by_case if k[0] == mode]
        if not keys:
            continue
        lines += ["", f"## {MODE_TITLE[mode]}", "", "| cell | T,B,I,H,L | " + " | ".join(shown) + " |"]
        lines.append("| --- | --- |" + " --- |" * len(shown))
        for key in keys:
            cells = [_summary_cell(by_case[key][i]) if i in by_case[key] else "" for i in shown]
            lines.append(f"| {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    notes = sorted({(r["impl"], r["status"], r["note"]) for r in rows if r["status"] != "ok"} - {
        (r["impl"], r["status"], r["note"]) for r in rows if r["impl"] in absent
    })
    if notes:
        lines += ["", "¹ ² Not timed:"] + [f"- `{i}` {s}: {n}" for i, s, n in notes]
    lines += [
        "",
        "## Details",
        "",
        "Times are per call; their spread is the interquartile range over rounds, the ratio's is the "
        f"{CI_LEVEL:.0%} confidence interval of its median. Peak memory: bytes allocated "
        "during one call above what was allocated before it. Compile time is the first call's time minus "
        "the median call time and is not part of the throughput. GFLOP: the model's GEMM FLOPs per call; "
        "GF/s: those over the median time; % peak: GF/s over the measured GEMM peak of the case's compute "
        "dtype (fp32's where that runs 16-bit GEMMs faster). µs/step: the median time per sequential "
        "recurrent step (T per layer and direction, twice with the backward); floor: the call's GEMM FLOPs per "
        "such step at that peak, before any per-step synchronisation. Implementations not run on this machine "
        "are left out.",
        "",
        "| cell | T,B,I,H,L | mode | impl | status | median ms | IQR ms | tokens/s | ratio (CI) | GFLOP | GF/s "
        "| % peak | µs/step (floor) | peak memory | compile s | calls × rounds | note |",
        "| --- " * 17 + "|",
    ]
    for r in (r for r in rows if r["impl"] not in absent):
        cell, cfg = case_key(r)
        if r["time_median_s"]:
            med = f"{float(r['time_median_s']) * 1e3:.4g}"
            iqr = f"{float(r['time_q1_s']) * 1e3:.4g}–{float(r['time_q3_s']) * 1e3:.4g}"
            rate = fmt_rate(float(r["tokens_per_s"]))
        else:
            med = iqr = rate = ""
        ratio = f"{r['ratio_vs_torch_nn']} ({r['ratio_ci_lo']}–{r['ratio_ci_hi']})" if r["ratio_vs_torch_nn"] else ""
        mem = fmt_bytes(int(r["peak_mem_bytes"])) if r["peak_mem_bytes"] != "" else ""
        runs = f"{r['calls_per_repeat']} × {r['repeats']}" if r["repeats"] else ""
        gflop = f"{int(r['gemm_flops']) / 1e9:.3g}"
        step = r.get("step_us", "")
        if step and r.get("step_floor_us"):
            step += f" ({r['step_floor_us']})"
        lines.append(
            f"| {cell} | {cfg} | {r['mode']} | {r['impl']} | {r['status']} | {med} | {iqr} | {rate} | {ratio} | "
            f"{gflop} | {r['gflops_per_s']} | {fmt_percent(r['peak_fraction'])} | {step} | {mem} | "
            f"{r['compile_s']} | {runs} | {r['note']} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_csv(path: str, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def compare(path_a: str, path_b: str) -> int:
    """Prints every ratio on which two result CSVs disagree (confidence intervals that do not overlap); 1 if any did."""

    def load(path):
        with open(path, newline="") as f:
            return {tuple(r.get(k) or "" for k in KEY_FIELDS): r for r in csv.DictReader(f) if r["ratio_vs_torch_nn"]}

    a, b = load(path_a), load(path_b)
    common = [k for k in a if k in b and k[11] != BASELINE]
    bad = 0
    for k in common:
        ra, rb = a[k], b[k]
        if float(ra["ratio_ci_hi"]) < float(rb["ratio_ci_lo"]) or float(rb["ratio_ci_hi"]) < float(ra["ratio_ci_lo"]):
            bad += 1
            cell, cfg = case_key(ra)
            print(
                f"DISAGREE {cell} {cfg} {k[10]} {k[11]}: "
                f"{ra['ratio_vs_torch_nn']} ({ra['ratio_ci_lo']}–{ra['ratio_ci_hi']}) vs "
                f"{rb['ratio_vs_torch_nn']} ({rb['ratio_ci_lo']}–{rb['ratio_ci_hi']})"
            )
    print(f"{len(common) - bad} of {len(common)} ratios agree within their {CI_LEVEL:.0%} confidence intervals")
    return 1 if bad or not common else 0


def summary_table(path: str, impl: str = "fastrnn-cpp") -> str:
    """One implementation's ratios from a result CSV: a row per configuration, a column per mode and cell
    (the run's own cases; ``--quick``'s variants are in the full report)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["impl"] == impl and not r.get("variant")]
    titles = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN-tanh", "rnn_relu": "RNN-relu"}
    cols = [(m, c) for m in reversed(MODES) for c in CELLS if any(r["mode"] == m and r["cell"] == c for r in rows)]
    by_key = {(r["mode"], r["cell"], case_key(r)[1]): r for r in rows}
    lines = ["| T,B,I,H,L | " + " | ".join(f"{titles[c]} {m}" for m, c in cols) + " |", "| --- " * (len(cols) + 1) + "|"]
    for cfg in dict.fromkeys(case_key(r)[1] for r in rows):
        cells = []
        for m, c in cols:
            r = by_key.get((m, c, cfg))
            if r is None:
                cells.append("")
            elif r["ratio_vs_torch_nn"]:
                cells.append(f"{float(r['ratio_vs_torch_nn']):.2f} ({float(r['ratio_ci_lo']):.2f}–{float(r['ratio_ci_hi']):.2f})")
            else:
                cells.append(r["status"])
        lines.append(f"| {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
