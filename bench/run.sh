#!/usr/bin/env bash
# Run the benchmark suite and write bench/RESULTS.md, bench/results.png and the raw
# pytest-benchmark JSON next to them (CUDA: the real numbers; CPU: eager vs compile).
#
#   bash bench/run.sh                   # the whole suite for this machine → bench/results.json
#   bash bench/run.sh --bench-smoke     # tiny shapes, one round: proves the suite runs (CI does this)
#   bash bench/run.sh -k logprobs       # other arguments go to pytest
#   bash bench/run.sh --part ops -k "not step"; bash bench/run.sh --part step -k step
#                                       # a run split in parts (e.g. 10-minute slots on a GPU):
#                                       # bench/results-<part>.json each; the report merges every part
#
# Environment: PYTHON (default python), FASTPPO_BENCH_OUT (output directory, default bench),
# FASTPPO_BENCH_THREADS (CPU threads, default 1), FASTPPO_BENCH_SMOKE_COMPILE=1 (compile in smoke mode).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=${FASTPPO_BENCH_OUT:-bench}
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
"$python" -m pytest bench --benchmark-json "$json.partial" "$@"
status=$?
if [ -s "$json.partial" ]; then  # no new JSON (pytest failed to start, an empty file): no report from an old one
    mv "$json.partial" "$json"
    if [ -n "$part" ]; then reports=("$out"/results-*.json); else reports=("$json"); fi
    "$python" bench/report.py "${reports[@]}" --out "$out" || status=$?
fi
rm -f "$json.partial"
exit $status
