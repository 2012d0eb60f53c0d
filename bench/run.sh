#!/usr/bin/env bash
# Run the benchmark suites (bench/suites/) and write the report: RESULTS.md, results.png and the
# raw pytest-benchmark JSON (CUDA: the real numbers; CPU: eager vs compile).
#
#   bash bench/run.sh                   # the whole suite for this machine → results.json (see below)
#   bash bench/run.sh --bench-smoke     # tiny shapes, one round: proves the suite runs (CI does this)
#   bash bench/run.sh -k logprobs       # other arguments go to pytest
#   bash bench/run.sh --part ops -k "not step"; bash bench/run.sh --part step -k step
#                                       # a run split in parts (e.g. 10-minute slots on a GPU):
#                                       # results-<part>.json each; the report merges every part
#
# Where it writes: on a CUDA machine the JSON and results.png go to bench/results/gpu/ and the page
# to bench/RESULTS.md; otherwise all three go to bench/results/cpu/. FASTPPO_BENCH_OUT=DIR puts
# all three in DIR instead (a scratch run that leaves the committed reports alone). The report
# appends the hand-kept measurements.md of that results folder when there is one (bench/report.py).
#
# Environment: PYTHON (default python), FASTPPO_BENCH_OUT (output directory, see above),
# FASTPPO_BENCH_THREADS (CPU threads, default 1), FASTPPO_BENCH_SMOKE_COMPILE=1 (compile in smoke mode).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
if [ -n "${FASTPPO_BENCH_OUT:-}" ]; then
    out=$FASTPPO_BENCH_OUT page=$FASTPPO_BENCH_OUT
elif "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    out=bench/results/gpu page=bench
else
    out=bench/results/cpu page=bench/results/cpu
fi
mkdir -p "$out"
part=""
if [ "${1:-}" = "--part" ]; then
    part=$2
    shift 2
fi
json="$out/results${part:+-$part}.json"
# Written beside the committed JSON and moved over it at the end: the tracked files stay untouched
# while pytest-benchmark records the commit, so a clean checkout is not reported as dirty.
rm -f "$json.partial"
"$python" -m pytest bench/suites --benchmark-json "$json.partial" "$@"
status=$?
if [ -s "$json.partial" ]; then  # no new JSON (pytest failed to start, an empty file): no report from an old one
    mv "$json.partial" "$json"
    if [ -n "$part" ]; then reports=("$out"/results-*.json); else reports=("$json"); fi
    "$python" bench/report.py "${reports[@]}" --out "$page" --results-dir "$out" || status=$?
fi
rm -f "$json.partial"
exit $status
