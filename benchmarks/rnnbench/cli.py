"""The command line of ``benchmarks/bench_rnn.py``: options, the passes over all cases, and the files written."""

import argparse
import gc
import os
import shlex
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from rnnbench import REPO
from rnnbench.cases import (
    CELL_LOOP, CELLS, DTYPES, IMPLS, MODES, STANDARD_CONFIGS, Case, Config, Spec, build_case, case_unsupported,
    quick_extras, quick_skip, unavailable_reason,
)  # fmt: skip
from rnnbench.plot import write_plot
from rnnbench.report import (
    compare, describe_peaks, machine_info, summarize, summary_table, usable_cores, write_csv, write_markdown,
)  # fmt: skip
from rnnbench.runner import Entry, new_entries, run_case
from rnnbench.timing import gemm_peaks

# after rnnbench.cases, which imports fastrnn with its missing-extension warning silenced
from fastrnn._ext import ISA_CAPS, isa_cap_warning  # noqa: E402

SCRIPT = "benchmarks/bench_rnn.py"
PATH_OPTIONS = ("--out",)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark fastrnn's backends against torch.nn, an eager cell loop and torch.compile.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {','.join(CELLS)}")
    p.add_argument("--config", action="append", type=Config.parse, metavar="T,B,I,H,L",
                   help="a configuration (repeatable); default: the five standard ones")  # fmt: skip
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,fwd+bwd")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--bidirectional", action="store_true", help="bidirectional layers")
    p.add_argument("--packed", action="store_true", help="variable-length PackedSequence input (lengths T/2..T)")
    p.add_argument("--cell-loop", action="store_true",
                   help="each implementation's *Cell modules called per step and layer in a Python loop (torch.nn's "
                   "and fastrnn's; unidirectional, dense)")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--passes", type=int, help="sweeps over all cases; rounds add up over them (default 5, --quick 3)")
    p.add_argument("--repeats", type=int, help="timed rounds per case in each pass (default 3, --quick 2)")
    p.add_argument("--warmup", type=int, help="untimed calls before the rounds (default 3, --quick 1)")
    p.add_argument("--min-time", type=float,
                   help="seconds each timed repeat lasts at least, by repeating the call (default 0.2, --quick 0.05)")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds; skip fastrnn-reference and torch.compile where they cost most; with the "
                   "standard configurations, add bf16, autocast, packed and proj_size cases")  # fmt: skip
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    p.add_argument("--gemm-size", type=int, default=2048,
                   help="size of the square GEMMs that measure the machine's peak (0: no roofline columns)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (off: fp32 is fp32 everywhere)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"), help="output folder")
    p.add_argument("--name", default="results", help="basename of the .csv/.md/.png written to --out")
    p.add_argument("--note", default="", help="a line shown in bold at the top of the report (e.g. PRELIMINARY ...)")
    p.add_argument("--list", action="store_true", help="print which implementations can run here and exit")
    p.add_argument("--compare", nargs=2, metavar="CSV", help="check that two result CSVs agree on every ratio and exit")
    p.add_argument("--summary", metavar="CSV", help="print fastrnn-cpp's ratios in a result CSV as a compact table and exit")
    args = p.parse_args(argv)
    args.cells = _subset(p, "--cells", args.cells, CELLS)
    args.modes = _subset(p, "--modes", args.modes, MODES)
    args.impls = _subset(p, "--impls", args.impls, IMPLS)
    args.configs = args.config or list(STANDARD_CONFIGS)
    args.passes = args.passes if args.passes is not None else (3 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.2)
    if min(args.passes, args.repeats, args.warmup, args.threads) < 1:
        p.error("--passes, --repeats, --warmup and --threads must be at least 1")
    if args.gemm_size < 0:
        p.error("--gemm-size must be 0 or more")
    if args.cell_loop and (args.bidirectional or args.packed):
        p.error("--cell-loop runs unidirectional cells over dense input: not with --bidirectional or --packed")
    return args


def _subset(p: argparse.ArgumentParser, flag: str, text: str, allowed: Sequence[str]) -> List[str]:
    chosen = [s for s in text.split(",") if s]
    unknown = [s for s in chosen if s not in allowed]
    if unknown or not chosen:
        p.error(f"{flag}: {unknown or 'nothing chosen'} not in {','.join(allowed)}")
    return [a for a in allowed if a in chosen]


def pasteable_command(argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> str:
    """The command line as one runs it from the repository root on any machine: the ISA caps set in ``env``
    (default: this process's environment) first, the script by its path in the repository, an ``--out`` inside
    the repository relative to its root, and one outside it by its last component, so that no path of this
    machine gets into a committed report."""
    env = os.environ if env is None else env
    caps = [f"{k}={shlex.quote(env[k])}" for k in ISA_CAPS if env.get(k)]

    def portable(path: str) -> str:
        full = os.path.abspath(path)
        inside = os.path.commonpath([full, REPO]) == REPO
        return os.path.relpath(full, REPO) if inside else os.path.basename(full.rstrip(os.sep)) or "."

    out: List[str] = []
    pending = False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if pending:
            out.append(portable(arg))
        elif eq and flag in PATH_OPTIONS:
            out.append(f"{flag}={portable(value)}")
        else:
            out.append(arg)
        pending = not pending and arg in PATH_OPTIONS
    return " ".join(caps + ["python " + shlex.join([SCRIPT] + out)])


def _configure_compiler() -> None:
    try:
        import torch._dynamo.config as dynamo_config
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config
    except ImportError:
        return
    # every case compiles the same loop_forward for other shapes, and every later pass reuses those graphs;
    # past the default limit dynamo would quietly run the loop eagerly, so raise it and fail loudly instead
    dynamo_config.recompile_limit = dynamo_config.accumulated_recompile_limit = 4096
    dynamo_config.fail_on_recompile_limit_hit = True
    inductor_config.compile_threads = 1  # keep compile workers off the cores being measured
    # on-disk caches would make compile_s depend on what an earlier run left behind
    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False


def plan(args: argparse.Namespace, dtype: torch.dtype) -> List[Spec]:
    """Every case of the run, in sweep order: the chosen table, then ``--quick``'s extra cases, which need
    the standard configurations (a run with ``--config`` times exactly what it names)."""
    specs = [
        Spec(cell, cfg, mode, args.bidirectional, args.packed, dtype, variant=CELL_LOOP if args.cell_loop else "")
        for cfg in args.configs
        for cell in args.cells
        for mode in args.modes
    ]
    if args.quick and args.config is None:
        specs += quick_extras(args.cells, args.modes)
    return specs


def skips(spec: Spec, args: argparse.Namespace, device: torch.device, absent: Dict[str, str]) -> Dict[str, str]:
    """Why each implementation stays out of ``spec``: not runnable here, not for this case, or ``--quick``."""
    out = {}
    for impl in args.impls:
        if impl in absent and spec.dtype == DTYPES[args.dtype]:
            why = absent[impl]
        else:
            why = unavailable_reason(impl, device, spec.dtype) or case_unsupported(impl, spec)
        if why is None and args.quick:
            why = quick_skip(impl, spec.cell, spec.cfg, spec.bidirectional, spec.mode)
        if why:
            out[impl] = why
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.summary:
        print(summary_table(args.summary))
        return 0
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)  # only the intra-op pool is used; a second one would only compete
    except RuntimeError:
        pass  # already fixed by earlier parallel work in this process (e.g. under pytest)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    absent = {i: why for i in args.impls if (why := unavailable_reason(i, device, dtype)) is not None}
    if "loop-compiled" in args.impls and "loop-compiled" not in absent:
        _configure_compiler()
    if args.list:
        for i in IMPLS:
            why = unavailable_reason(i, device, dtype)
            print(f"{i}: {'available' if why is None else 'unavailable: ' + why}")
        return 0
    command = pasteable_command(list(sys.argv[1:] if argv is None else argv))
    info = machine_info(device)
    specs = plan(args, dtype)
    skipped = {spec: skips(spec, args, device, absent) for spec in specs}
    quick_notes = {why.replace("--quick: ", "") for s in skipped.values() for why in s.values() if why.startswith("--quick")}
    peaks = gemm_peaks(device, args.gemm_size) if args.gemm_size else {}
    info["GEMM peak"] = describe_peaks(peaks, args.gemm_size)
    settings = {
        "command": command + "  # from the repository root",
        "note": args.note,
        "device / dtype": f"{device} / {args.dtype}"
        + (f", TF32 {'on' if args.tf32 else 'off'}" if device.type == "cuda" else ""),
        "layers": ("bidirectional" if args.bidirectional else "unidirectional")
        + (", packed variable-length input" if args.packed else ", dense input"),
        "timing": (
            f"{args.passes} passes over all cases; in each, a case is rebuilt, gets {args.warmup} warm-up call(s) "
            f"per implementation, then {args.repeats} rounds; each round times every implementation once "
            f"(rotating order) over enough calls to last ≥ {args.min_time:g} s; "
            + ("CUDA events" if device.type == "cuda" else "time.perf_counter with the garbage collector off")
        ),
        "peak memory": "not measured" if not args.memory else (
            "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "torch.profiler allocation events (c10 CPU allocator)"
        ),
        "quick": "; ".join(["yes"] + sorted(quick_notes)) if args.quick else "no",
        "extra cases": ", ".join(sorted({f"{s.variant} ({s.cell})" for s in specs if s.variant})) or "none",
        "seed": str(args.seed),
    }  # fmt: skip
    partial_cap = isa_cap_warning() if device.type == "cpu" else None
    if partial_cap:
        settings["note"] = " ".join(filter(None, [settings["note"], partial_cap]))
    print("\n".join(f"{k}: {v}" for k, v in list(info.items()) + list(settings.items()) if v), flush=True)
    for impl, why in absent.items():
        print(f"{impl}: not run ({why})", flush=True)

    gc.collect()
    # torch's import leaves ~1e6 long-lived objects; frozen, they drop out of the collections that
    # time_calls runs before every timed repeat, which would otherwise take ~0.2 s each
    gc.freeze()
    try:
        return _sweep(args, device, specs, skipped, peaks, info, settings, absent)
    finally:
        # frozen objects are never collected, not even at exit, where nanobind (Triton's bindings, once
        # anything imported triton) would then report every object of theirs caught in a cycle as leaked
        gc.unfreeze()


def _sweep(args, device, specs: List[Spec], skipped, peaks, info: Dict[str, str], settings: Dict[str, str],
           absent: Dict[str, str]) -> int:  # fmt: skip
    """The passes over all cases, then the files; 130 when interrupted."""
    from tqdm import tqdm

    started = time.perf_counter()
    peak_load = os.getloadavg()[0]
    # every case stays built from the first pass to the last (about 1 GB in all for the standard table)
    done: Dict[Spec, Tuple[Case, List[Entry]]] = {}

    def rows_so_far() -> List[dict]:
        return [row for spec, (case_, entries) in done.items() for row in summarize(case_, spec.mode, entries, peaks)]

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    # SIGTERM (e.g. from `timeout`) ends the run like Ctrl-C: with the rounds done so far written out
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    interrupted = False
    try:
        with tqdm(total=args.passes * len(specs), desc="cases", unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
            # whole sweeps, not all rounds of a case at once: on the development VM the speed of some calls
            # changed by 2x for tens of seconds at a time, so each case's rounds are spread over the whole run
            for pass_index in range(args.passes):
                for spec in specs:
                    label = f"{spec.cell}{' ' + spec.variant if spec.variant else ''} {spec.cfg.label} {spec.mode}"
                    bar.set_postfix_str(f"pass {pass_index + 1}/{args.passes} {label}")
                    if pass_index == 0:
                        case = build_case(
                            spec.cell, spec.cfg, spec.bidirectional, spec.packed, device, spec.dtype, args.seed,
                            proj_size=spec.proj_size, autocast=spec.autocast, variant=spec.variant,
                        )  # fmt: skip
                        done[spec] = (case, new_entries(args.impls, skipped[spec]))
                    case, entries = done[spec]
                    run_case(case, spec.mode, entries, args, pass_index)
                    del case
                    write_csv(base + ".csv", rows_so_far())
                    peak_load = max(peak_load, os.getloadavg()[0])
                    bar.update()
    except KeyboardInterrupt:
        settings["note"] = " ".join(
            filter(None, [args.note, f"INTERRUPTED in pass {pass_index + 1} of {args.passes}: fewer rounds than asked."])
        )
        print("interrupted; writing the rounds done so far", file=sys.stderr)
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    rows = rows_so_far()
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["highest 1-min load average seen"] = f"{peak_load:.2f}"
    if device.type == "cpu" and peak_load > usable_cores() + 0.5:
        # more runnable threads than cores: torch's OpenMP threads wait on descheduled siblings at every
        # parallel region, which slowed calls 3-20x, unevenly, on the 2-core dev machine
        warning = (
            f"WARNING: the load average reached {peak_load:.1f} on {usable_cores()} cores: other processes "
            "competed with the benchmark's threads, so these numbers may not reproduce."
        )
        settings["note"] = " ".join(filter(None, [settings["note"], warning]))
        print(warning, file=sys.stderr)
    info["benchmark wall time"] = f"{(time.perf_counter() - started) / 60:.1f} min"

    write_csv(base + ".csv", rows)
    write_markdown(base + ".md", rows, info, settings, absent, args.impls)
    title = f"{info['device'] if device.type == 'cuda' else info['CPU']}, torch threads={args.threads}, {args.dtype}"
    write_plot(base + ".png", rows, [i for i in args.impls if i not in absent], title)
    print(f"wrote {base}.csv, {base}.md, {base}.png")
    return 130 if interrupted else 0
