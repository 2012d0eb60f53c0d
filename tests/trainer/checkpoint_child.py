"""Run by tests/trainer/test_checkpoint_atomicity.py: saves to be killed with SIGKILL, one child process per save.

    python tests/trainer/checkpoint_child.py MODEL_DIR TOKENIZER_DIR CKPT_DIR EXPECTED_DIR

Imports once (seconds), then for each number K read from stdin forks a child that builds the trainer,
`load_state(CKPT_DIR)`, steps on batch K, sets `current_step = K`, writes the fingerprint of what it is
about to save to EXPECTED_DIR/K.pt, prints "saving K PID", calls `save_state(CKPT_DIR)` and prints
"saved K SECONDS". Once the child is gone (killed or done) this process prints "exit K STATUS".
With FASTPPO_TEST_WRITE_DELAY=seconds the child sleeps after each file it saves, fsyncs or renames during
the save, so that kills at random moments land between those steps (test-only: patched in here).
"""

import copy
import os
import sys
import time

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import make_batch  # noqa: E402
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402


def build(model_dir: str, tokenizer) -> PPOTrainer:
    """Adam and an adaptive KL coefficient: weights, optimizer state and KL all change at every step."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config = PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-2, use_score_scaling=True,
                       seed=0)
    return PPOTrainer(config, model, None, tokenizer)


def fingerprint(trainer: PPOTrainer) -> dict:
    """Everything save_state must keep together: weights, optimizer state, KL coefficient, moments, step."""
    return {"weights": {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()["state"]),
            "kl_coef": trainer.kl_ctl.value, "running": trainer.running.state_dict(),
            "current_step": trainer.current_step}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def _slow_down(delay: float) -> None:
    import accelerate.utils.other as accelerate_io

    def then_sleep(function):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            time.sleep(delay)
            return result
        return wrapped

    torch.save = then_sleep(torch.save)  # accelerate's optimizer and RNG files
    accelerate_io.safe_save_file = then_sleep(accelerate_io.safe_save_file)  # its weights
    for name in ("fsync", "rename", "replace"):  # fastppo.checkpointing's flushes and swaps
        setattr(os, name, then_sleep(getattr(os, name)))


def _child(number: int, model_dir: str, tokenizer_dir: str, ckpt_dir: str, expected_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    trainer = build(model_dir, tokenizer)
    trainer.load_state(ckpt_dir)
    trainer.step(*make_batch(tokenizer, 2, seed=number))
    trainer.current_step = number
    torch.save(fingerprint(trainer), os.path.join(expected_dir, f"{number}.pt"))
    delay = float(os.environ.get("FASTPPO_TEST_WRITE_DELAY", "0"))
    if delay:
        _slow_down(delay)
    print(f"saving {number} {os.getpid()}", flush=True)
    start = time.perf_counter()
    trainer.save_state(ckpt_dir)
    print(f"saved {number} {time.perf_counter() - start:.4f}", flush=True)


def main(model_dir: str, tokenizer_dir: str, ckpt_dir: str, expected_dir: str) -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        number = int(line)
        sys.stdout.flush()
        pid = os.fork()  # the imports above are the slow part: each save's process starts from them
        if pid == 0:
            status = 0
            try:
                _child(number, model_dir, tokenizer_dir, ckpt_dir, expected_dir)
            except BaseException:
                import traceback

                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        print(f"exit {number} {status}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
