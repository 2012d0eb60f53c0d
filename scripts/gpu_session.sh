#!/usr/bin/env bash
# The GPU checks in slices that each fit a 10-minute command on a lent GPU machine (no network,
# torch/triton/transformers/pytest/pytest-benchmark already there). One slice per call:
#
#   bash scripts/gpu_session.sh tests     # pytest -m gpu, then the kernel and head-path tests on CUDA
#   bash scripts/gpu_session.sh logprobs  # bench/suites: logprobs fwd, fwd+bwd → results-logprobs.json
#   bash scripts/gpu_session.sh tokens    # bench/suites: full_kl, kl_reward, gae, ppo_loss → results-tokens.json
#   bash scripts/gpu_session.sh linear    # bench/suites: linear_logprobs      → results-linear.json
#   bash scripts/gpu_session.sh step      # bench/suites: PPOTrainer.step rows → results-step.json
#   bash scripts/gpu_session.sh longest   # bench/suites: longest response that fits → results-longest.json
#                                         #   (each in bench/results/gpu/, bench/run.sh's folder on CUDA)
#   bash scripts/gpu_session.sh sweep     # bench/tools/sweep.py: launch knobs of every kernel, checked and timed
#   bash scripts/gpu_session.sh report    # bench/RESULTS.md + bench/results/gpu/results.png from every results-*.json
#
# Extra arguments go to pytest (e.g. `-k "bf16"` to split a slice that outgrows its 10 minutes:
# torch.compile's warm-up, tens of seconds per case, is most of a slice's time).
#
# Wheels for packages the machine lacks (liger-kernel for the liger provider) go in .whl/
# (git-ignored; see the device README for `pip download`) and are installed to /tmp/site first.
# Logs and results are copied to $OUT when it is set (the device tool brings that folder back):
# put each slice's results-<slice>.json into bench/results/gpu/ on the machine you commit from, where
# `python bench/report.py bench/results/gpu/results-*.json --out bench --results-dir bench/results/gpu`
# (no GPU needed) writes bench/RESULTS.md and bench/results/gpu/results.png.
set -uo pipefail
cd "$(dirname "$0")/.."
slice=${1:?usage: gpu_session.sh tests|ops|step|report [pytest args]}
shift
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-}

if ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# fastppo itself, without touching the machine's torch/transformers
"$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
"$python" - <<'EOF'
import torch, triton, transformers
print(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}; torch {torch.__version__}, "
      f"triton {triton.__version__}, transformers {transformers.__version__}")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null

log=${TMPDIR:-/tmp}/gpu-$slice.log
case $slice in
    tests)
        # GPU-marked tests first (real shapes), then the kernel and head-path suites on CUDA tensors
        "$python" -m pytest -q -p no:cacheprovider -m gpu tests "$@" 2>&1 | tee "$log"
        status=${PIPESTATUS[0]}
        "$python" -m pytest -q -p no:cacheprovider -x tests/kernels \
            tests/ops/test_head_paths.py tests/ops/test_backends.py "$@" 2>&1 | tee -a "$log"
        status=$((status | PIPESTATUS[0]))
        ;;
    logprobs | tokens | linear | step | longest)
        case $slice in
            logprobs) select="bench_logprobs" ;;
            tokens) select="full_kl or kl_reward or gae or ppo_loss" ;;
            linear) select="linear_logprobs" ;;
            step) select="bench_step and not longest" ;;
            longest) select="bench_step_longest" ;;
        esac
        PYTHON=$python bash bench/run.sh --part "$slice" -k "$select" "$@" 2>&1 | tee "$log"
        status=${PIPESTATUS[0]}
        ;;
    sweep)
        "$python" bench/tools/sweep.py --out bench/results/gpu/sweep.json "$@" 2>&1 | tee "$log"
        status=${PIPESTATUS[0]}
        [ -n "$out" ] && cp bench/results/gpu/sweep.json "$out"/
        ;;
    report)
        "$python" bench/report.py bench/results/gpu/results-*.json --out bench --results-dir bench/results/gpu \
            --command "bash scripts/gpu_session.sh logprobs|tokens|linear|step|longest, then report" 2>&1 | tee "$log"
        status=${PIPESTATUS[0]}
        ;;
    *)
        echo "unknown slice '$slice': tests, logprobs, tokens, linear, step, longest, sweep or report" >&2
        exit 2
        ;;
esac

if [ -n "$out" ]; then
    cp "$log" "$out"/ 2>/dev/null
    for file in bench/results/gpu/results-"$slice".json bench/RESULTS.md bench/results/gpu/results.png; do
        [ -f "$file" ] && cp "$file" "$out"/
    done
fi
exit "$status"
