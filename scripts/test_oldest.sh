#!/usr/bin/env bash
# The oldest stack fastppo claims (pyproject.toml's minimums), in its own virtual environment (.venv-oldest, or
# $FASTPPO_OLDEST_VENV), built from scratch if missing: the TRL-parity, model, PEFT/reward-adapter, seq2seq,
# trainer and padding-free tests on transformers 4.46 / accelerate 1.1 / peft 0.12, so that code that only works on
# the newest transformers fails CI (scripts/test.sh tests the newest). Extra arguments go to pytest, e.g.
# `bash scripts/test_oldest.sh -k peft`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FASTPPO_OLDEST_VENV:-.venv-oldest}
# The floors of pyproject.toml, pinned (a floor that is raised there is raised here too). transformers 4.46.0 is
# yanked on PyPI (for Python 3.8 only; fastppo needs >= 3.10): an exact pin still installs it.
# torch is the one exception: the project's machines carry a local CPU build of 2.13.0 only (see scripts/test.sh).
stack=(
    transformers==4.46.0 accelerate==1.1.0 peft==0.12.0 safetensors==0.4.3 tokenizers==0.20.0
    # not named by fastppo: the oldest its dependencies accept (huggingface-hub), the last 1.x (numpy: no floor set)
    huggingface-hub==0.23.2 numpy==1.26.4
)
tests=(
    tests/trl/test_trl_parity.py          # the step against numbers recorded from TRL 0.11.4
    tests/trl/test_trl_model_surface.py   # the value-head model's TRL surface, TRL's PEFT checkpoints
    tests/trainer/test_model.py           # loading, forward, checkpoints
    tests/trainer/test_peft.py            # LoRA policies, reward adapters
    tests/trainer/test_seq2seq.py         # encoder-decoder policies
    tests/trainer/test_trainer.py         # step, generate, save/resume
    tests/trainer/test_padding_free.py    # packing refused where transformers cannot pack (4.46); token budgets
)
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }
pip_q torch==2.13.0  # first, pinned: an unpinned torch pulled in below would be GBs of CUDA wheels
pip_q -c <(echo torch==2.13.0) "${stack[@]}" pytest triton
pip_q --no-deps -e .
python - "${stack[@]}" <<'PY'  # what pip installed is what was pinned, or this is no test of the floors
import sys
from importlib.metadata import version
wrong = [f"{pin} (found {version(pin.split('==')[0])})" for pin in sys.argv[1:]
         if version(pin.split("==")[0]) != pin.split("==")[1]]
sys.exit(f"scripts/test_oldest.sh: not the oldest stack: {', '.join(wrong)}" if wrong else 0)
PY
python -m pytest "${tests[@]}" "$@"
