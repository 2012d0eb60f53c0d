"""Shared fixtures: a BPE tokenizer trained on the spot and tiny GPT-2 / Llama checkpoints, no hub."""

from __future__ import annotations

import os
import sys

# Without a GPU the kernels run under the Triton interpreter, which triton reads when it is
# first imported (fastppo imports it through transformers/torch._dynamo): set it first.
_interpret_set_here = "TRITON_INTERPRET" not in os.environ
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if torch.cuda.is_available() and _interpret_set_here:
    del os.environ["TRITON_INTERPRET"]
# backend="auto" means the reference in tests unless a test asks for Triton explicitly
# (kernel tests call the kernels; test_backends compares the trainer on both backends).
os.environ.setdefault("FASTPPO_BACKEND", "torch")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a 2-core machine they lose a lot.
torch.set_num_threads(1)


def dtype_kwarg(dtype) -> dict:
    """`from_pretrained`'s dtype argument under the installed transformers' name: `dtype` from 4.56 on,
    `torch_dtype` before (4.46 is the oldest fastppo supports: scripts/test_oldest.sh)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


CORPUS = (
    "the cat sat on the mat. a dog ran in the park. good day, bad day, happy day. "
    "we like tea and cake. the sun is warm and the sky is blue. one two three four five. "
    "ppo trains a policy with a value head and a reference model. rewards go up. "
) * 8


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                      bos_token="<eos>")
    path = tmp_path_factory.mktemp("tokenizer")
    wrapped.save_pretrained(path)
    return str(path)


@pytest.fixture()
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(config)


def _llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config)


BUILDERS = {"gpt2": _gpt2, "llama": _llama}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer_dir):
    """{"gpt2": dir, "llama": dir}: tiny randomly initialised checkpoints saved with transformers."""
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    dirs = {}
    for name, build in BUILDERS.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        build(vocab_size).save_pretrained(path)
        dirs[name] = str(path)
    return dirs


@pytest.fixture(params=["gpt2", "llama"])
def model_dir(request, model_dirs):
    return model_dirs[request.param]


@pytest.fixture()
def gpt2_dir(model_dirs):
    return model_dirs["gpt2"]


def checkpoint_with_tokenizer(model_dir: str, tokenizer_dir: str, dest) -> str:
    """A copy of `model_dir` with the tokenizer's files beside it: what `from_pretrained(path)` of
    both model and tokenizer (e.g. examples/quickstart.py --model) expects."""
    import shutil

    shutil.copytree(model_dir, dest)
    for item in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, item), dest)
    return str(dest)


def make_batch(tokenizer, batch_size: int, seed: int = 0, max_query: int = 6, max_response: int = 7):
    """Variable-length (query, response, score) lists of token ids drawn from the tokenizer's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    queries, responses, scores = [], [], []
    for _ in range(batch_size):
        q_len = int(torch.randint(2, max_query + 1, (1,), generator=generator))
        r_len = int(torch.randint(1, max_response + 1, (1,), generator=generator))
        queries.append(torch.randint(2, vocab, (q_len,), generator=generator))
        responses.append(torch.randint(2, vocab, (r_len,), generator=generator))
        scores.append(torch.randn((), generator=generator))
    return queries, responses, scores


@pytest.fixture()
def bench():
    """`import_module` with bench/ (report, plot), bench/suites/ (harness, machine, bench_*) and bench/tools/
    (sweep, ...) on sys.path, as pytest and the scripts import them; their modules are forgotten
    afterwards (they are plain top-level names)."""
    import importlib
    from pathlib import Path

    root = Path(__file__).parent.parent / "bench"
    folders = [root, root / "suites", root / "tools"]
    saved = list(sys.path)
    sys.path[:0] = [str(folder) for folder in folders]
    try:
        yield importlib.import_module
    finally:
        sys.path[:] = saved  # the tools add bench/suites/ themselves when imported
        for folder in folders:
            for path in folder.glob("*.py"):
                if path.stem != "conftest":  # this file goes by that name too
                    sys.modules.pop(path.stem, None)


def end_process_group() -> None:
    """For the multi-process scripts: tear torch.distributed down before the interpreter exits. Left to the
    interpreter's exit, gloo's threads once aborted a finished run ("terminate called without an active
    exception", SIGABRT, after its last file was written)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def record_experience(monkeypatch) -> list:
    """The `Experience` each step trains on, appended to the returned list as the PPO epochs receive it."""
    from fastppo.training import ppo_epochs

    seen, run = [], ppo_epochs.PPOEpochs.run
    monkeypatch.setattr(ppo_epochs.PPOEpochs, "run", lambda self, experience: (seen.append(experience),
                                                                               run(self, experience))[1])
    return seen


def assert_same_training(baseline, candidate, weights_tolerance: dict) -> None:
    """Two runs of `(trainer, [(stats, response mask), ...])` agree: every statistic (log-prob
    histograms at response positions only; per-position distributions skipped) and every weight."""
    import numpy as np

    from tolerances import TRAINER

    (base_trainer, base_results), (trainer, results) = baseline, candidate
    for (expected, mask), (got, _) in zip(base_results, results):
        for key, value in expected.items():
            if key.startswith("time/") or key == "fastppo/tokens_per_s":
                continue
            want, have = np.asarray(value, dtype=np.float64), np.asarray(got[key], dtype=np.float64)
            if key in ("objective/logprobs", "objective/ref_logprobs"):
                want, have = want[mask], have[mask]  # lean and packed paths compute response positions only
            if key in ("ppo/policy/advantages", "ppo/policy/ratio"):
                continue  # per-position distributions include off-response positions
            np.testing.assert_allclose(have, want, err_msg=key, **TRAINER)
    expected_state = base_trainer.unwrapped_model.state_dict()
    for key, value in trainer.unwrapped_model.state_dict().items():
        torch.testing.assert_close(value, expected_state[key], msg=lambda m: f"{key}: {m}", **weights_tolerance)


@pytest.fixture()
def single_thread():
    """One torch thread: reductions run in the order of numbers recorded single-threaded (TRL's fixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; mixed precision can only be chosen on a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def trainer_state(trainer) -> dict:
    """Everything a failed call must leave as it was: weights, gradients, optimizer state, KL coefficient,
    running score moments, counters, train/eval mode and the gradient-accumulation phase."""
    import copy

    return {
        "weights": {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()},
        "grads": [p.grad is None or not bool(p.grad.any()) for p in trainer.model.parameters()],
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "kl_coef": trainer.kl_ctl.value,
        "running": trainer.running.state_dict(),
        "current_step": trainer.current_step,
        "training": trainer.model.training,
        "accumulation_phase": trainer.accelerator.step,
    }


def assert_trainer_unchanged(before: dict, after: dict) -> None:
    """`trainer_state`s equal (NaN equal to NaN: a poisoned weight stays what it was)."""
    exact = dict(rtol=0, atol=0, equal_nan=True)
    for key, value in before["weights"].items():
        torch.testing.assert_close(after["weights"][key], value, msg=lambda m: f"{key}: {m}", **exact)
    assert after["grads"] == before["grads"]
    assert before["optimizer"]["state"].keys() == after["optimizer"]["state"].keys()
    for param_id, state in before["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(torch.as_tensor(after["optimizer"]["state"][param_id][name]),
                                       torch.as_tensor(value), **exact)
    for key in ("kl_coef", "running", "current_step", "training", "accumulation_phase"):
        assert after[key] == before[key], key
