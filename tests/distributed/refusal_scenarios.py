"""Run by tests/distributed/test_refusals.py with 2 CPU processes: distributed runs fail loudly, on every rank.

    accelerate launch ... refusal_scenarios.py refusals MODEL_DIR TOKENIZER_DIR OUT_DIR   (DDP, gloo)
    torchrun ...          refusal_scenarios.py construct MODEL_DIR TOKENIZER_DIR OUT_DIR  (any launch)
    accelerate launch ... refusal_scenarios.py timeout MODEL_DIR TOKENIZER_DIR OUT_DIR    (DDP, gloo)

refusals: bad input on one rank (and on both) in `step` and `generate`, each caught as a user's loop would, then a
good step; every rank writes what it raised, a snapshot of its state before and after the refusals, and its
weights after the good step. construct: builds the trainer as the launch set it up, and writes what was raised.
timeout: rank 1 stalls; rank 0's step must end with an error within the process group's timeout.
OUT/rank{r}-{scenario}.json holds it all.
"""

import datetime
import json
import os
import sys
import time

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import end_process_group, make_batch  # noqa: E402
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402
from fastppo.training import agreement  # noqa: E402

TIMEOUT_S = 8


def build(model_dir: str, tokenizer_dir: str, **accelerator_kwargs) -> PPOTrainer:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config = PPOConfig(batch_size=2, mini_batch_size=1, ppo_epochs=1, learning_rate=1e-2, use_score_scaling=True,
                       seed=0, accelerator_kwargs=accelerator_kwargs)
    return PPOTrainer(config, model, None, tokenizer)


def snapshot(trainer: PPOTrainer) -> dict:
    """Everything a refused step must leave as it was: weights, optimizer state, controllers, counters."""
    weights = torch.cat([p.detach().double().flatten() for p in trainer.unwrapped_model.parameters()])
    moments = [v.double().sum().item() for state in trainer.optimizer.state_dict()["state"].values()
               for v in state.values() if torch.is_tensor(v)]
    return {"weights": weights.sum().item(), "weights_abs": weights.abs().sum().item(), "moments": sum(moments),
            "moment_count": len(moments), "kl_coef": trainer.kl_ctl.value, "running_mean": trainer.running.mean,
            "running_count": trainer.running.count, "current_step": trainer.current_step,
            "accumulation_step": trainer.accelerator.step}


def attempt(call) -> dict:
    try:
        call()
    except (TypeError, ValueError) as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def refusals(trainer: PPOTrainer, rank: int) -> dict:
    tokenizer, vocab = trainer.tokenizer, trainer.vocab_size
    queries, responses, scores = make_batch(tokenizer, 2, seed=rank)
    report = {"before": snapshot(trainer)}
    nan_scores = [torch.tensor(float("nan")), scores[1]] if rank == 1 else scores
    report["nan_score_on_1"] = attempt(lambda: trainer.step(queries, responses, nan_scores))
    string_scores = "good" if rank == 0 else scores  # refused on the host, before any read: rank 0 only
    report["bad_type_on_0"] = attempt(lambda: trainer.step(queries, responses, string_scores))
    out_of_vocabulary = [torch.tensor([vocab + 5, 3])] + queries[1:]
    both = (out_of_vocabulary if rank == 0 else queries, nan_scores)
    report["bad_on_both"] = attempt(lambda: trainer.step(both[0], responses, both[1]))
    bad_query = out_of_vocabulary if rank == 1 else queries
    report["generate_bad_query_on_1"] = attempt(lambda: trainer.generate(bad_query, max_new_tokens=3))
    batch_size = 0 if rank == 0 else 2
    report["generate_bad_option_on_0"] = attempt(lambda: trainer.generate(queries, batch_size=batch_size,
                                                                         max_new_tokens=3))
    def failing_check(agree):  # a check that fails outright on rank 1 (not an input refusal): no rank may wait
        if rank == 1:
            raise RuntimeError("device lost")
        return agree(torch.zeros(1, dtype=torch.bool))

    try:
        agreement.decided_together(trainer.accelerator, failing_check)
        report["check_failed_on_1"] = {"raised": None}
    except RuntimeError as exc:
        report["check_failed_on_1"] = {"raised": type(exc).__name__, "message": str(exc)}
    report["after"] = snapshot(trainer)
    stats = trainer.step(queries, responses, scores)  # a good step: the ranks are still in step
    report["after_good_step"] = snapshot(trainer)
    report["kl"] = stats["objective/kl"]
    return report


def main(scenario: str, model_dir: str, tokenizer_dir: str, out_dir: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    report = {}
    if scenario == "refusals":
        report = refusals(build(model_dir, tokenizer_dir, cpu=True), rank)
    elif scenario == "construct":
        report["construct"] = attempt(lambda: build(model_dir, tokenizer_dir))
    elif scenario == "timeout":
        from accelerate.utils import InitProcessGroupKwargs

        handler = InitProcessGroupKwargs(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
        trainer = build(model_dir, tokenizer_dir, cpu=True, kwargs_handlers=[handler])
        queries, responses, scores = make_batch(trainer.tokenizer, 2, seed=rank)
        before = snapshot(trainer)
        start = time.monotonic()
        if rank == 1:
            time.sleep(3 * TIMEOUT_S)  # stuck: never reaches the step's collectives in time
        try:
            trainer.step(queries, responses, scores)
            report["raised"] = None
        except Exception as exc:  # the collective's own error (gloo: RuntimeError / DistBackendError)
            report.update(raised=type(exc).__name__, message=str(exc)[:500])
        report.update(seconds=time.monotonic() - start, unchanged=snapshot(trainer) == before)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    with open(os.path.join(out_dir, f"rank{rank}-{scenario}.json"), "w") as handle:
        json.dump(report, handle)
    if scenario == "timeout":
        os._exit(0)  # the process group is broken: its teardown would wait on the other rank


if __name__ == "__main__":
    main(*sys.argv[1:5])
    end_process_group()
