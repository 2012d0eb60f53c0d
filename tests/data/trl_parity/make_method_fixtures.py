"""Record what TRL 0.11.4's public PPOTrainer methods return, for tests/test_trl_methods.py.

    . /tmp/trl011/bin/activate && python tests/data/trl_parity/make_method_fixtures.py

Writes methods.pt here: for each method, the inputs it was called with and what it returned.
Model-dependent methods (prepare_model_inputs, batched_forward_pass) run on init/ with the step
data of make_fixtures.py; the tensor-only methods (compute_rewards, compute_advantages, loss,
record_step_stats) get random inputs drawn from a fixed generator, so fastppo's versions can be
fed exactly the same tensors. Never imports fastppo. Deterministic (one thread, fixed seeds).
"""

import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixtures import INIT_DIR, TOK_DIR, make_step_data  # noqa: E402

B, T, V = 4, 9, 64


def _trainer(padding_side="right", **config):
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(TOK_DIR)
    tokenizer.padding_side = padding_side
    model = AutoModelForCausalLMWithValueHead.from_pretrained(INIT_DIR, attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PPOConfig(**dict(dict(batch_size=B, mini_batch_size=2, seed=0), **config))
        return PPOTrainer(config=config, model=model, ref_model=None, tokenizer=tokenizer)


def _mask(generator):
    """[B, T] response masks: each row one contiguous run of at least one token."""
    mask = torch.zeros(B, T, dtype=torch.int64)
    for row in range(B):
        start = int(torch.randint(0, T - 1, (1,), generator=generator))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=generator))
        mask[row, start:end] = 1
    return mask


def forward_cases():
    data = make_step_data(0, B, response_masks=True)
    out = {"data": data}
    for side in ("right", "left"):
        trainer = _trainer(side)
        inputs = trainer.prepare_model_inputs(data["queries"], data["responses"])
        with torch.no_grad():
            logprobs, logits, values, masks = trainer.batched_forward_pass(
                trainer.model, data["queries"], data["responses"], inputs, return_logits=True,
                response_masks=data["response_masks"])
        out[side] = {"model_inputs": {k: v.clone() for k, v in inputs.items()}, "logprobs": logprobs,
                     "logits": logits, "values": values, "masks": masks}
    return out


def reward_cases(generator):
    cases = {}
    for estimator in ("kl", "abs", "mse", "full"):
        trainer = _trainer(kl_penalty=estimator)
        trainer.kl_ctl.value = 0.2
        mask = _mask(generator)
        if estimator == "full":
            logprobs = torch.log_softmax(torch.randn(B, T, V, generator=generator), -1)
            ref_logprobs = torch.log_softmax(torch.randn(B, T, V, generator=generator), -1)
        else:
            logprobs = -torch.rand(B, T, generator=generator) * 4
            ref_logprobs = -torch.rand(B, T, generator=generator) * 4
        scores = torch.randn(B, generator=generator)
        rewards, non_score, kls = trainer.compute_rewards(scores, logprobs, ref_logprobs, mask)
        cases[estimator] = {"inputs": (scores, logprobs, ref_logprobs, mask), "kl_coef": 0.2,
                            "outputs": (rewards, non_score, kls)}
    return cases


def advantage_case(generator):
    trainer = _trainer(gamma=0.95, lam=0.9)
    values, rewards, mask = torch.randn(B, T, generator=generator), torch.randn(B, T, generator=generator), \
        _mask(generator)
    return {"inputs": (values, rewards, mask), "gamma": 0.95, "lam": 0.9,
            "outputs": trainer.compute_advantages(values, rewards, mask)}


def loss_cases(generator):
    cases = {}
    for name, threshold in (("plain", 10.0), ("ratio_skip", 1e-3)):
        trainer = _trainer(ratio_threshold=threshold)
        mask = _mask(generator)
        old_logprobs = -torch.rand(B, T, generator=generator) * 3
        logprobs = old_logprobs + 0.3 * torch.randn(B, T, generator=generator)
        values, vpreds = torch.randn(B, T, generator=generator), torch.randn(B, T, generator=generator)
        logits = torch.randn(B, T, V, generator=generator)
        advantages, returns = torch.randn(B, T, generator=generator), torch.randn(B, T, generator=generator)
        inputs = (old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pg_loss, vf_loss, stats = trainer.loss(*inputs)
        cases[name] = {"inputs": inputs, "ratio_threshold": threshold, "outputs": (pg_loss, vf_loss, stats)}
    return cases


def step_stats_case(generator):
    trainer = _trainer()
    mask = _mask(generator)
    kls = torch.randn(B, T, generator=generator) * 0.1
    train_stats = {"loss/policy": torch.randn(3, generator=generator),
                   "val/error": torch.rand(3, generator=generator),
                   "returns/var": torch.rand(3, generator=generator) + 0.5,
                   "policy/ratio": torch.rand(1, 20, generator=generator)}
    data = dict(scores=torch.randn(B, generator=generator), logprobs=-torch.rand(B, T, generator=generator),
                ref_logprobs=-torch.rand(B, T, generator=generator), non_score_reward=-0.2 * kls,
                train_stats=train_stats, kls=kls, masks=mask,
                queries=[torch.arange(n) for n in (2, 3, 4, 5)], responses=[torch.arange(n) for n in (1, 6, 2, 3)])
    inputs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    return {"inputs": inputs, "kl_coef": 0.2, "outputs": trainer.record_step_stats(0.2, **data)}


def main():
    import trl

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(7)
    record = {"versions": {"trl": trl.__version__, "torch": torch.__version__},
              "forward": forward_cases(), "rewards": reward_cases(generator),
              "advantages": advantage_case(generator), "loss": loss_cases(generator),
              "step_stats": step_stats_case(generator)}
    path = os.path.join(HERE, "methods.pt")
    torch.save(record, path)
    os.chmod(path, 0o644)
    assert os.path.getsize(path) < 400_000, os.path.getsize(path)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
