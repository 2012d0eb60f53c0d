#!/usr/bin/env bash
# Every GPU check that fits one short lease, in one command (a lease is ~15 minutes of device
# time, machine start included): tests, the launch-knob sweep, then the benchmark slices without
# torch.compile's warm-up. Each stage runs under its own time cap, taken from what is left of
# the total; a stage cut off gets SIGINT, so pytest-benchmark still writes what it timed and the
# sweep has already printed its rows. Everything lands in one archive under $OUT (the device tool
# returns at most 8 files), and the summary and sweep table are printed last.
#
#   bash scripts/gpu_lease.sh [total_seconds]      # default 540: inside a 600 s command limit
#   STAGES="tests-gpu bench-ragged" bash scripts/gpu_lease.sh   # chosen stages, in this order
#
# Then, on the machine you commit from: unpack lease.tgz, copy results-*.json into bench/results/gpu/ and run
# `python bench/report.py bench/results/gpu/results-*.json --out bench --results-dir bench/results/gpu`;
# set kernels/_launch.py from sweep.json.
set -uo pipefail
cd "$(dirname "$0")/.."
total=${1:-540}
python=${PYTHON:-python3}
out=${OUT:-/tmp/gpu-lease-out}
work=${TMPDIR:-/tmp}/gpu-lease
rm -rf "$work" && mkdir -p "$work" "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
began=$(date +%s)
# fastppo itself (pyproject maps fastppo.kernels onto kernels/), leaving the machine's torch alone
"$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$work/install.log" 2>&1 ||
    { cat "$work/install.log"; exit 1; }

pack() {
    tar czf "$out/lease.tgz" -C "$work" . 2>/dev/null
    cp "$work/summary.txt" "$out/" 2>/dev/null
}
trap pack EXIT

# stage NAME CAP_SECONDS COMMAND...: run with min(CAP, time left) seconds, log to $work/NAME.log
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((total - ($(date +%s) - began) - 10))
    ((cap > left)) && cap=$left
    if ((cap < 15)); then
        echo "$name: skipped, ${left}s left" | tee -a "$work/summary.txt"
        return
    fi
    local start
    start=$(date +%s)
    timeout -s INT -k 15 "$cap" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    local tail_line
    tail_line=$(grep -E "passed|failed|error" "$work/$name.log" | tail -1)
    echo "$name: rc $rc, $(($(date +%s) - start))s of ${cap}s; ${tail_line}" | tee -a "$work/summary.txt"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    "$python" -c "import torch, triton, transformers; p = torch.cuda.get_device_properties(0); \
print(p.name, p.multi_processor_count, 'SMs; torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
    git log -1 --format='commit %H' 2>/dev/null
} >"$work/env.txt" 2>&1
cat "$work/env.txt"

pytest=("$python" -m pytest -q -p no:cacheprovider)
bench=("${pytest[@]}" bench/suites -k)
not_compile="not compile and not reference and not liger"
# STAGES picks and orders the stages (default: the standing checks); the follow-ups are opt-in:
# bench-ragged (padded vs padding_free step), bench-step-long (the R8192 step rows), tests-all (the whole
# tests/ on CUDA but the slow multi-process ones), profile-step (per-phase host/device time and MFU at
# R512/R2048), profile-ppo-loss (the loss's host path), bench-liger (Liger-Kernel's rows: carry its wheel
# in .whl/, e.g. `pip download --no-deps liger-kernel -d .whl`, and pass carry=[".whl"]).
stages=${STAGES:-tests-gpu tests-kernels sweep bench-logprobs bench-tokens bench-linear bench-step}
for name in $stages; do
    case $name in
        tests-gpu) stage "$name" 75 "${pytest[@]}" -m gpu tests ;;
        tests-kernels) stage "$name" 110 "${pytest[@]}" -n 8 -m "not gpu" tests/kernels \
            tests/ops/test_head_paths.py tests/ops/test_backends.py ;;
        sweep) stage "$name" 120 "$python" bench/tools/sweep.py --out "$work/sweep.json" ;;
        bench-logprobs) stage "$name" 80 "${bench[@]}" "bench_logprobs and $not_compile" \
            --benchmark-json "$work/results-logprobs.json" ;;
        bench-tokens) stage "$name" 60 "${bench[@]}" "(full_kl or kl_reward or gae or ppo_loss) and $not_compile" \
            --benchmark-json "$work/results-tokens.json" ;;
        bench-linear) stage "$name" 50 "${bench[@]}" "linear_logprobs and $not_compile" \
            --benchmark-json "$work/results-linear.json" ;;
        bench-step) stage "$name" 80 "${bench[@]}" "bench_step and not longest and not 8192" \
            --benchmark-json "$work/results-step.json" ;;
        bench-step-long) stage "$name" 150 "${bench[@]}" "bench_step and not longest and 8192" \
            --benchmark-json "$work/results-step-long.json" ;;
        bench-ragged) stage "$name" 150 "${bench[@]}" "bench_ragged" --benchmark-json "$work/results-ragged.json" ;;
        tests-all) stage "$name" 240 "${pytest[@]}" -n 8 -m "not slow" tests --ignore=tests/rollout/test_vllm_rollouts.py ;;
        profile-step) stage "$name" 150 "$python" bench/tools/profile_step.py --lengths 512,2048 --steps 3 \
            --json "$work/profile-step.json" ;;
        profile-ppo-loss) stage "$name" 60 "$python" bench/tools/profile_ppo_loss.py ;;
        bench-liger) "$python" -m pip install -q --no-index --no-deps .whl/liger_kernel-*.whl >"$work/liger-install.log" 2>&1
            stage "$name" 120 "${bench[@]}" "liger" --benchmark-json "$work/results-liger.json" ;;
        *) echo "unknown stage $name" | tee -a "$work/summary.txt" ;;
    esac
done

echo "--- total $(($(date +%s) - began))s"
grep -h "FAILED\|Error" "$work"/tests-*.log | head -20
grep -h "^| " "$work/sweep.log" 2>/dev/null || grep -h "^row" "$work/sweep.log" | tail -60
cat "$work/summary.txt"
