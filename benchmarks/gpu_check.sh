#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA GPU:
#   1. build fastrnn._C in place for the present GPU's architecture only (FASTRNN_CUDA_ARCHS overrides);
#   2. the tests that carry the `cuda` marker (python -m pytest -m cuda; in parallel with pytest-xdist), once on
#      the per-step path and once with the persistent engine on (FASTRNN_PERSISTENT=1); those that read the SMs'
#      clocks (marker `sm_clocks`) after them, alone on the GPU;
#   3. compute-sanitizer's memcheck, racecheck and synccheck over benchmarks/gpu_smoke.py (every kernel once,
#      fwd+bwd), with the persistent engine on (memcheck also without, and with clusters off), and memcheck over
#      its CUDA-graph cases with torch's caching allocator on (graphs need it);
#   4. the persistent engine's cost model measured: its barriers and block GEMMs timed with its own code and the
#      constants of csrc/persist.h they imply (python benchmarks/persist_calibrate.py, about 20 s by estimate);
#   5. the benchmark on CUDA against cuDNN with the persistent engine on (python benchmarks/bench_rnn.py --quick
#      --device cuda).
# That is the check, expected to take about five minutes on an H200 from the parts of it measured there on the
# per-step path (build 37 s, the CUDA tests alone on 10 workers 62 s, the benchmark 99 s); the sanitizer runs,
# side by side with the tests, were never timed there, nor the whole. With
# --extra (or --only extra, without the check's steps), the measurements after it:
#   6. the persistent engine's phases: the SM cycles per step of each phase of its launches and of the barrier after
#      it, at every standard configuration and cell, fp32 and bf16 (python benchmarks/persist_phases.py), then
#      the LayerNorm LSTM on the cpp and Triton backends against the hand-written loop (python
#      benchmarks/bench_layernorm.py --device cuda), Triton's alone with its "seq" and its "persist" kernels
#      for fastrnn's cells, then the host's time per step of every implementation's calls (python
#      benchmarks/host_time.py), then two configurations again with the persistent engine's
#      split plans at the grid barrier instead of a cluster's (FASTRNN_PERSISTENT_CLUSTER=0), two with the grid
#      plans' barrier over the whole grid instead of per batch tile (FASTRNN_PERSISTENT_GROUP_SYNC=0), then bf16 modules
#      at every standard configuration against cuDNN's bf16, and two of them again with the engine's GEMMs off
#      the tensor cores (FASTRNN_PERSISTENT_MMA=0), two in fp32 with TF32 allowed on both sides, and two with
#      bidirectional layers (the engine's two directions in one launch);
#   7. Nsight Compute's count of shared-memory bank conflicts in the persistent engine's forward and backward
#      kernels at (100,64,256,256,1), LSTM and GRU, with the SIMT loop's padded strides and without
#      (FASTRNN_PERSISTENT_PAD=0), and two configurations timed without them.
# Each step has a time limit (seconds, in STEPS below), so a hang costs one step, not the session. The
# correctness checks of 2. and 3. run side by side, each its own process on the one GPU (--serial: one after
# another); the benchmarks run alone after them.
# Everything goes to benchmarks/results/gpu/ (or --out DIR): one log per step and summary.md.
#
#   bash benchmarks/gpu_check.sh             # run it
#   bash benchmarks/gpu_check.sh --dry-run   # print the plan; needs no GPU
#   bash benchmarks/gpu_check.sh --only build,cuda-tests-persistent,benchmark   # a few steps, in plan order
#   bash benchmarks/gpu_check.sh --no-build --only extra   # the measurements alone (--only core: the check's)
#   bash benchmarks/gpu_check.sh --extra --budget 540   # the check, then as many measurements as 9 minutes allow
#   options: --out DIR (inside the repository), --no-build, --no-bench, --extra, --only STEP[,STEP...], --serial,
#            --budget SECONDS
# --budget: the whole run ends within SECONDS of its start, for a GPU lent by the minute: a step starts only with
# 30 s (or its own limit, if less) left to it, and its limit is cut to what is left; the steps not started are named
# in summary.md with the --only that runs them next.
#
# Exit status: 0 every step passed; 1 a step failed (summary.md says which); 2 no CUDA GPU visible to torch
# (nothing run) or a usage error; 3 every step run passed, and --budget left some out.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=benchmarks/results/gpu
DRY=0
BUILD=1
BENCH=1
EXTRA=0
ONLY=""
SERIAL=0
BUDGET=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --no-build) BUILD=0 ;;
        --no-bench) BENCH=0 ;;
        --extra) EXTRA=1 ;;
        --serial) SERIAL=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --only) ONLY="${2:?--only needs step names (see --dry-run)}"; shift ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift
                  [[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget takes whole seconds, got $BUDGET" >&2; exit 2; } ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python}

find_sanitizer() {
    local dir
    for dir in "" "${CUDA_HOME:-}/bin/" /usr/local/cuda/bin/; do
        if command -v "${dir}compute-sanitizer" >/dev/null 2>&1; then
            echo "${dir}compute-sanitizer"
            return 0
        fi
    done
    return 1
}
SANITIZER=$(find_sanitizer || echo compute-sanitizer)
NCU=$(command -v ncu || { [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" ] && echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu"; } \
      || echo ncu)

# the present GPU's compute capability ("90"), for a build of that architecture alone
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
# two test steps side by side with the sanitizers: 4 workers each on a 16-core machine
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n $([ $SERIAL = 1 ] && echo 10 || echo 4)")
ON="FASTRNN_PERSISTENT=1"
# PYTORCH_NO_CUDA_MEMORY_CACHING: every tensor its own allocation, so memcheck sees overruns into
# neighbouring tensors that the caching allocator would hide inside one block
SAN="PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SANITIZER --error-exitcode 3"

# name | time limit (s) | command [| side]: the steps, in order; consecutive steps marked "side" run side by side
# (so a command holds no "|")
STEPS=()
[ $BUILD = 1 ] && STEPS+=("build|300|FASTRNN_CUDA_ARCHS=${FASTRNN_CUDA_ARCHS:-${ARCH:-90}} MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace")
STEPS+=("backends|60|$ON $PY -m fastrnn")
STEPS+=("cuda-tests|240|$PY -m pytest -m 'cuda and not sm_clocks' -q -p no:cacheprovider $XDIST|side")
STEPS+=("cuda-tests-persistent|240|$ON $PY -m pytest -m 'cuda and not sm_clocks' -q -p no:cacheprovider $XDIST|side")
STEPS+=("memcheck|240|$SAN --tool memcheck $PY benchmarks/gpu_smoke.py|side")
for tool in memcheck racecheck synccheck; do
    STEPS+=("$tool-persistent|300|$ON $SAN --tool $tool $PY benchmarks/gpu_smoke.py|side")
done
# the split plans again at the grid barrier: on sm_90 the steps above take clusters
STEPS+=("memcheck-grid|300|$ON FASTRNN_PERSISTENT_CLUSTER=0 $SAN --tool memcheck $PY benchmarks/gpu_smoke.py|side")
# the CUDA-graph cases, which the uncached allocator above refuses to capture (gpu_smoke skips them under it)
STEPS+=("memcheck-graphs|120|$ON $SANITIZER --error-exitcode 3 --tool memcheck $PY benchmarks/gpu_smoke.py --graphs|side")
# the tests that read the SMs' clocks per block, alone on the GPU: beside other processes a block may be preempted
# and resumed on another SM, whose clock is another count
STEPS+=("cuda-clock-tests|120|$ON $PY -m pytest -m 'cuda and sm_clocks' -q -p no:cacheprovider")
[ $BENCH = 1 ] && STEPS+=("calibrate|90|$PY benchmarks/persist_calibrate.py --out $OUT/calibration.md")
[ $BENCH = 1 ] && STEPS+=("benchmark|300|$ON $PY benchmarks/bench_rnn.py --quick --device cuda --out $OUT")
CORE=${#STEPS[@]}  # the check's steps; the measurements (--extra) follow
# where the persistent engine's time goes: each phase and barrier of a step, per launch, from the SM's clock
[ $BENCH = 1 ] && STEPS+=("phases|120|$PY benchmarks/persist_phases.py --out $OUT/phases.md")
[ $BENCH = 1 ] && STEPS+=("layernorm|120|$ON $PY benchmarks/bench_layernorm.py --device cuda --rounds 5 --min-time 0.1 \
--backend cpp --backend triton --out $OUT/layernorm.md")
# Triton's whole-sequence kernels for fastrnn's cells, one program per batch tile against the tile split over hidden
# slices (ext.pick_variant's rule between them is unmeasured)
for v in seq persist; do
  [ $BENCH = 1 ] && STEPS+=("layernorm-triton-$v|90|$ON $PY benchmarks/bench_layernorm.py --device cuda --rounds 5 \
--min-time 0.1 --backend triton --triton-variant $v --out $OUT/layernorm-triton-$v.md")
done
# the host's time per step of each implementation's calls (Python, dispatch, launches), beside the GPU's
[ $BENCH = 1 ] && STEPS+=("host-time|300|$ON $PY benchmarks/host_time.py --out $OUT/host-time.md")
[ $BENCH = 1 ] && STEPS+=("grid-barrier|120|$ON FASTRNN_PERSISTENT_CLUSTER=0 $PY benchmarks/bench_rnn.py --device cuda \
--config 512,16,128,128,1 --config 100,64,256,256,1 --impls fastrnn-cpp,torch.nn --quick --out $OUT/grid-barrier")
# the grid plans' barrier over the whole grid (cooperative groups) instead of each batch tile's slices apart, at two
# configurations whose fp32 grid plans have several tiles on an H200 (the LSTM's 2 and the GRU's 4 at H = 512, the
# tanh RNN's 4 at H = 1024)
[ $BENCH = 1 ] && STEPS+=("whole-grid-sync|120|$ON FASTRNN_PERSISTENT_GROUP_SYNC=0 $PY benchmarks/bench_rnn.py \
--device cuda --config 100,64,512,512,1 --config 100,64,256,1024,1 --impls fastrnn-cpp,torch.nn --quick \
--out $OUT/whole-grid-sync")
# bf16 modules against cuDNN's bf16 at every standard configuration (the engine's tensor cores), then two of them
# with the engine's GEMMs on the SIMT loop instead (FASTRNN_PERSISTENT_MMA=0)
[ $BENCH = 1 ] && STEPS+=("bf16|150|$ON $PY benchmarks/bench_rnn.py --device cuda --dtype bfloat16 \
--impls fastrnn-cpp,torch.nn --quick --out $OUT/bf16")
[ $BENCH = 1 ] && STEPS+=("bf16-simt|90|$ON FASTRNN_PERSISTENT_MMA=0 $PY benchmarks/bench_rnn.py --device cuda \
--dtype bfloat16 --config 512,16,128,128,1 --config 100,64,256,256,1 --impls fastrnn-cpp,torch.nn --quick \
--out $OUT/bf16-simt")
# fp32 with TF32 allowed on both sides (cuDNN's default): the engine's GEMMs on tensor cores in TF32
[ $BENCH = 1 ] && STEPS+=("tf32|90|$ON $PY benchmarks/bench_rnn.py --device cuda --tf32 --config 512,16,128,128,1 \
--config 100,64,256,256,1 --impls fastrnn-cpp,torch.nn --quick --out $OUT/tf32")
# bidirectional layers: the persistent engine's two directions in one launch, each on half the SMs
[ $BENCH = 1 ] && STEPS+=("bidirectional|90|$ON $PY benchmarks/bench_rnn.py --device cuda --bidirectional \
--config 512,16,128,128,1 --config 100,64,256,256,1 --impls fastrnn-cpp,torch.nn --quick --out $OUT/bidirectional")
# the SIMT loop's bank conflicts, padded and not: wavefronts and conflicts of shared loads and stores in the first
# forward and backward launch of each cell (its check call), one ncu run per cell since the benchmark finishes one
# cell's case, timed rounds and all, before the next; then two configurations timed without the pads
BANKS="l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,\
l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,gpu__time_duration.sum"
for pad in 1 0; do
    [ $BENCH = 1 ] && STEPS+=("bank-conflicts-pad$pad|180|set -e; for cell in lstm gru; do $ON FASTRNN_PERSISTENT_PAD=$pad $NCU \
--kernel-name regex:persist_kernel --launch-count 2 --metrics $BANKS $PY benchmarks/bench_rnn.py --device cuda \
--config 100,64,256,256,1 --cells \$cell --modes fwd+bwd --impls fastrnn-cpp --warmup 1 --repeats 1 --passes 1 \
--no-memory --out $OUT/bank-conflicts-pad$pad-\$cell; done")
done
[ $BENCH = 1 ] && STEPS+=("unpadded|90|$ON FASTRNN_PERSISTENT_PAD=0 $PY benchmarks/bench_rnn.py --device cuda \
--config 512,16,128,128,1 --config 100,64,256,256,1 --impls fastrnn-cpp,torch.nn --quick --out $OUT/unpadded")

# --only: the named steps alone, in the plan's order ("core" and "extra" stand for the check's steps and the
# measurements); a name the plan lacks is a usage error. Without it: the check, and the measurements with --extra.
names() { local step; for step in "$@"; do printf '%s,' "${step%%|*}"; done; }
ASKED=$ONLY
ONLY=""
for want in ${ASKED//,/ }; do
    case $want in
        core) ONLY+=$(names "${STEPS[@]:0:$CORE}") ;;
        extra) ONLY+=$(names "${STEPS[@]:$CORE}") ;;
        *) ONLY+="$want," ;;
    esac
done
ONLY=${ONLY%,}
if [ -n "$ASKED" ] && [ -z "$ONLY" ]; then
    echo "gpu_check: --only $ASKED names no step of this plan$([ $BENCH = 0 ] && echo ' (--no-bench leaves out the benchmark and the measurements)')" >&2
    exit 2
fi
[ -z "$ONLY" ] && [ $EXTRA = 0 ] && STEPS=("${STEPS[@]:0:$CORE}")
if [ -n "$ONLY" ]; then
    KEPT=()
    for want in ${ONLY//,/ }; do
        found=0
        for step in "${STEPS[@]}"; do [ "${step%%|*}" = "$want" ] && found=1; done
        if [ $found = 0 ]; then
            echo "gpu_check: --only names an unknown step $want (see --dry-run)" >&2
            exit 2
        fi
    done
    for step in "${STEPS[@]}"; do
        [[ ",$ONLY," == *",${step%%|*},"* ]] && KEPT+=("$step")
    done
    STEPS=("${KEPT[@]}")
fi

if [ $DRY = 1 ]; then
    echo "gpu_check plan (from the repository root; logs and summary.md in $OUT/)$([ -n "$BUDGET" ] && echo ", in order while the budget of $BUDGET s lasts"):"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit cmd side <<< "$step"
        echo "  $name: $cmd  > $OUT/$name.log (limit ${limit} s)$([ -n "$side" ] && [ $SERIAL = 0 ] && echo ', side by side')"
    done
    exit 0
fi

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch here, so nothing was run (--dry-run prints the plan)." >&2
    exit 2
fi

mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
touch "$SUMMARY.start"  # what the benchmarks write after this is this run's
{
    echo "# GPU check"
    echo
    echo '```'
    echo "bash benchmarks/gpu_check.sh $([ $BUILD = 0 ] && echo '--no-build ')$([ $BENCH = 0 ] && echo '--no-bench ')$([ $EXTRA = 1 ] && echo '--extra ')$([ -n "$ONLY" ] && echo "--only $ONLY ")$([ -n "$BUDGET" ] && echo "--budget $BUDGET ")--out $OUT"
    echo '```'
    echo
    echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M')"
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo "- git: $(git describe --always --dirty 2>/dev/null)"
    echo
    echo "| step | result | log |"
    echo "| --- | --- | --- |"
} > "$SUMMARY"

GRACE=10  # seconds timeout gives a step after its limit before it kills it
# One step: its log, and its summary row in $OUT/.row.NAME; exit status 1 when it failed.
run_step() {
    local name=$1 limit=$2 cmd=$3 start=$SECONDS rc result bad=1
    { echo "\$ $cmd"; timeout -k $GRACE "$limit" bash -c "$cmd"; } > "$OUT/$name.log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then
        result="passed"
        bad=0
    elif [ $rc = 124 ] || [ $rc = 137 ]; then
        result="**TIMED OUT** after ${limit} s$([ -n "${4:-}" ] && echo ' (its limit cut to the budget)')"
    elif [ "${name%-persistent}" = cuda-tests ] && [ $rc = 5 ]; then
        # pytest's "no tests collected": no test carries the marker yet, which is no failure of the GPU
        result="no tests carry the \`cuda\` marker yet"
        bad=0
    elif [[ "$name" == *check* ]] && ! command -v "$SANITIZER" >/dev/null 2>&1; then
        result="**FAILED**: compute-sanitizer not found (CUDA toolkit's bin/ on PATH, or CUDA_HOME)"
    else
        result="**FAILED** (exit status $rc)"
    fi
    echo "| $name | $result ($((SECONDS - start)) s) | [$name.log]($name.log) |" > "$OUT/.row.$name"
    return $bad
}

failed=0
left_out=""
i=0
while [ $i -lt ${#STEPS[@]} ]; do
    # the run of consecutive "side" steps from i (or step i alone)
    group=()
    IFS='|' read -r _ _ _ side <<< "${STEPS[$i]}"
    while [ $i -lt ${#STEPS[@]} ]; do
        IFS='|' read -r _ _ _ s2 <<< "${STEPS[$i]}"
        if [ ${#group[@]} -gt 0 ] && { [ -z "$side" ] || [ -z "$s2" ] || [ $SERIAL = 1 ]; }; then break; fi
        group+=("${STEPS[$i]}")
        i=$((i + 1))
    done
    pids=()
    for step in "${group[@]}"; do
        IFS='|' read -r name limit cmd _ <<< "$step"
        cut=""
        if [ -n "$BUDGET" ]; then
            left=$((BUDGET - SECONDS - GRACE))
            if [ $left -lt $((limit < 30 ? limit : 30)) ]; then
                echo "| $name | not run: $((left > 0 ? left : 0)) s of the budget ($BUDGET s) left | |" > "$OUT/.row.$name"
                left_out+="${left_out:+,}$name"
                continue
            fi
            [ $left -lt $limit ] && { limit=$left; cut=1; }
        fi
        echo "== $name: $cmd"
        run_step "$name" "$limit" "$cmd" $cut &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    for step in "${group[@]}"; do
        name=${step%%|*}
        echo "   $name: $(cut -d'|' -f3 "$OUT/.row.$name" | sed 's/^ *//; s/ *$//')"
        cat "$OUT/.row.$name" >> "$SUMMARY"
        rm -f "$OUT/.row.$name"
    done
done
# the benchmark reports this run wrote
reports=""
for f in results.md calibration.md phases.md layernorm.md layernorm-triton-seq.md layernorm-triton-persist.md \
    host-time.md grid-barrier/results.md whole-grid-sync/results.md bf16/results.md bf16-simt/results.md \
    tf32/results.md bidirectional/results.md unpadded/results.md; do
    [ -f "$OUT/$f" ] && [ "$OUT/$f" -nt "$SUMMARY.start" ] && reports+="${reports:+, }[$f]($f)"
done
rm -f "$SUMMARY.start"
[ -n "$reports" ] && echo -e "\nBenchmark reports: $reports" >> "$SUMMARY"
if [ -n "$left_out" ]; then
    echo -e "\nNot run for the budget: $left_out. Next: \`bash benchmarks/gpu_check.sh --no-build --only $left_out\`" \
        >> "$SUMMARY"
    echo "not run for the budget: $left_out"
fi
echo "wrote $SUMMARY"
[ $failed = 0 ] && [ -n "$left_out" ] && exit 3
exit $failed
