"""Bad input raises a clear error naming the argument, and changes no weights, optimizer state or counters."""

import pytest
import torch

from conftest import assert_trainer_unchanged, make_batch, trainer_state
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer


@pytest.fixture()
def trainer(gpt2_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    config = PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-2, use_score_scaling=True)
    trainer = PPOTrainer(config, model, None, tokenizer)
    trainer.step(*make_batch(tokenizer, 4, seed=9))  # so the optimizer has state to protect
    return trainer


def _good(tokenizer):
    return make_batch(tokenizer, 4, seed=3)


def _replace(sequence, index, value):
    out = list(sequence)
    out[index] = value
    return out


BAD_STEP_INPUTS = {
    # name: (function of (queries, responses, scores) → new (queries, responses, scores, masks), error, message)
    "lists of different lengths": (lambda q, r, s: (q, r[:3], s, None), ValueError, "responses has 3 items"),
    "batch size other than config": (lambda q, r, s: (q[:2], r[:2], s[:2], None), ValueError, "queries has 2 items"),
    "empty response": (lambda q, r, s: (q, _replace(r, 1, torch.tensor([], dtype=torch.long)), s, None),
                       ValueError, r"responses\[1\] is empty"),
    "2-D query": (lambda q, r, s: (_replace(q, 0, q[0].unsqueeze(0)), r, s, None), ValueError,
                  r"queries\[0\] must be 1-D"),
    "float token ids": (lambda q, r, s: (q, _replace(r, 2, r[2].float()), s, None), TypeError,
                        r"responses\[2\] must hold integer token ids"),
    "ids outside the vocabulary": (lambda q, r, s: (_replace(q, 3, torch.tensor([5, 10_000])), r, s, None),
                                   ValueError, r"queries\[3\] holds token ids .* outside the model's vocabulary"),
    "negative id": (lambda q, r, s: (q, _replace(r, 0, torch.tensor([-1, 5])), s, None), ValueError,
                    r"responses\[0\] holds token ids"),
    "NaN score": (lambda q, r, s: (q, r, _replace(s, 1, torch.tensor(float("nan"))), None), ValueError,
                  r"scores\[1\] is nan"),
    "inf score": (lambda q, r, s: (q, r, _replace(s, 0, float("inf")), None), ValueError, r"scores\[0\] is inf"),
    "non-scalar score": (lambda q, r, s: (q, r, _replace(s, 2, torch.tensor([1.0, 2.0])), None), ValueError,
                         r"scores\[2\] must be a scalar"),
    "scores not a list": (lambda q, r, s: (q, r, "good", None), TypeError, "scores must be a list"),
    "scores as a 2-D tensor": (lambda q, r, s: (q, r, torch.zeros(4, 1), None), ValueError, "scores must be"),
    "queries not a list": (lambda q, r, s: (torch.stack([x[:1] for x in q]), r, s, None), TypeError,
                           "queries must be a list"),
    "query not a tensor": (lambda q, r, s: (_replace(q, 0, [1, 2, 3]), r, s, None), TypeError,
                           r"queries\[0\] must be a torch.Tensor"),
    "tensor on another device": (lambda q, r, s: (q, _replace(r, 0, torch.ones(2, dtype=torch.long, device="meta")),
                                                  s, None), ValueError, r"responses\[0\] is on meta"),
    "score on another device": (lambda q, r, s: (q, r, _replace(s, 0, torch.tensor(1.0, device="meta")), None),
                                ValueError, r"scores\[0\] is on meta"),
    "response mask of wrong length": (lambda q, r, s: (q, r, s, [torch.ones(len(x) + 1) for x in r]), ValueError,
                                      r"response_masks\[0\] has shape"),
    "response mask all zero": (lambda q, r, s: (q, r, s, _replace([torch.ones(len(x)) for x in r], 1,
                                                                    torch.zeros(len(r[1])))),
                               ValueError, r"response_masks\[1\] masks out every token"),
    "response mask not 0/1": (lambda q, r, s: (q, r, s, [torch.full((len(x),), 2) for x in r]), ValueError,
                              r"response_masks\[0\] must hold only 0 and 1"),
}


@pytest.mark.parametrize("case", list(BAD_STEP_INPUTS))
def test_bad_step_input_raises_and_changes_nothing(trainer, tokenizer, case):
    make, error, message = BAD_STEP_INPUTS[case]
    queries, responses, scores, masks = make(*_good(tokenizer))
    before = trainer_state(trainer)
    with pytest.raises(error, match=message):
        trainer.step(queries, responses, scores, response_masks=masks)
    assert_trainer_unchanged(before, trainer_state(trainer))
    trainer.step(*_good(tokenizer))  # and the trainer still works


BAD_ROLLOUT_LOGPROBS = {
    # name: (function of the responses → rollout_logprobs, error, message)
    "not a list": (lambda r: torch.zeros(4, 3), TypeError, "rollout_logprobs must be a list"),
    "one missing": (lambda r: [-torch.ones(len(x)) for x in r][:3], ValueError, "rollout_logprobs has 3 items"),
    "wrong length": (lambda r: _replace([-torch.ones(len(x)) for x in r], 2, -torch.ones(len(r[2]) + 1)),
                     ValueError, r"rollout_logprobs\[2\] has shape"),
    "integer dtype": (lambda r: [torch.zeros(len(x), dtype=torch.long) for x in r], TypeError,
                      r"rollout_logprobs\[0\] must hold floating-point"),
    "not a tensor": (lambda r: _replace([-torch.ones(len(x)) for x in r], 1, [-1.0] * len(r[1])), TypeError,
                     r"rollout_logprobs\[1\] must be a torch.Tensor"),
    "NaN": (lambda r: _replace([-torch.ones(len(x)) for x in r], 3, torch.full((len(r[3]),), float("nan"))),
            ValueError, r"rollout_logprobs\[3\]\[0\] is nan"),
    "positive": (lambda r: _replace([-torch.ones(len(x)) for x in r], 0, torch.full((len(r[0]),), 0.5)),
                 ValueError, r"rollout_logprobs\[0\]\[0\] is 0.5; log-probs must be finite and <= 0"),
    "on another device": (lambda r: _replace([-torch.ones(len(x)) for x in r], 0,
                                             torch.zeros(len(r[0]), device="meta")),
                          ValueError, r"rollout_logprobs\[0\] is on meta"),
}


@pytest.mark.parametrize("case", list(BAD_ROLLOUT_LOGPROBS))
def test_bad_rollout_logprobs_raise_and_change_nothing(trainer, tokenizer, case):
    make, error, message = BAD_ROLLOUT_LOGPROBS[case]
    queries, responses, scores = _good(tokenizer)
    before = trainer_state(trainer)
    with pytest.raises(error, match=message):
        trainer.step(queries, responses, scores, rollout_logprobs=make(responses))
    assert_trainer_unchanged(before, trainer_state(trainer))


def test_bad_generate_kwargs_change_nothing(trainer):
    before = trainer_state(trainer), torch.get_rng_state()
    with pytest.raises(ValueError, match="output_scores"):
        trainer.generate([torch.tensor([5])], max_new_tokens=2, output_scores=True)
    with pytest.raises(TypeError, match="return_logprobs"):
        trainer.generate([torch.tensor([5])], max_new_tokens=2, return_logprobs="yes")
    assert_trainer_unchanged(before[0], trainer_state(trainer))
    assert torch.equal(before[1], torch.get_rng_state())


@pytest.mark.parametrize("bad,error,message", [
    (torch.tensor([[5, 6]]), ValueError, "query_tensor must be 1-D"),
    (torch.tensor([5.0, 6.0]), TypeError, "query_tensor must hold integer"),
    ([torch.tensor([5]), torch.tensor([], dtype=torch.long)], ValueError, r"query_tensor\[1\] is empty"),
    ([torch.tensor([5, 99999])], ValueError, r"query_tensor\[0\] holds token ids"),
    ("hello", TypeError, "query_tensor must be a list"),
])
def test_bad_generate_input(trainer, bad, error, message):
    with pytest.raises(error, match=message):
        trainer.generate(bad, max_new_tokens=2)


def test_generate_batch_size_must_be_positive(trainer):
    with pytest.raises(ValueError, match="batch_size"):
        trainer.generate([torch.tensor([5])], batch_size=0)


def test_tokenizer_without_pad_token_is_refused_where_padding_is_needed(trainer, tokenizer):
    """As TRL: accepted at construction; step, batched generate and prepare_model_inputs refuse it, changing nothing."""
    queries, responses, scores = _good(tokenizer)
    pad = tokenizer.pad_token
    tokenizer.pad_token = None
    before = trainer_state(trainer)
    try:
        PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), trainer.unwrapped_model, None, tokenizer)  # accepted
        for call, where in ((lambda: trainer.step(queries, responses, scores), "which step needs"),
                            (lambda: trainer.generate(queries[:2], max_new_tokens=2), "which generate needs"),
                            (lambda: trainer.prepare_model_inputs(queries, responses), "which prepare_model_inputs")):
            with pytest.raises(ValueError, match=f"tokenizer has no pad token, {where}"):
                call()
        assert_trainer_unchanged(before, trainer_state(trainer))
        assert trainer.generate(queries[0], max_new_tokens=2, do_sample=False).shape[0] == 1  # one query: no padding
    finally:
        tokenizer.pad_token = pad


@pytest.mark.parametrize("argument,kwargs,error,message", [
    ("config", dict(config={"batch_size": 2}), TypeError, "config must be a fastppo.PPOConfig"),
    ("model", dict(model="gpt2"), TypeError, "model must be a fastppo.AutoModelForCausalLMWithValueHead"),
    ("ref_model", dict(ref_model=torch.nn.Linear(2, 2)), TypeError, "ref_model must be"),
    ("tokenizer", dict(tokenizer="gpt2"), TypeError, "tokenizer must be a transformers tokenizer"),
    ("optimizer", dict(optimizer="adam"), TypeError, "optimizer must be"),
    ("num_shared_layers", dict(num_shared_layers=0), ValueError, "num_shared_layers must be a positive int"),
    ("num_shared_layers", dict(num_shared_layers=2), ValueError, "num_shared_layers=2: no parameter name"),
])
def test_bad_constructor_arguments(gpt2_dir, tokenizer, argument, kwargs, error, message):
    args = dict(config=PPOConfig(batch_size=2, mini_batch_size=2),
                model=AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir), tokenizer=tokenizer)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        PPOTrainer(**args)


def test_ref_model_must_not_be_the_policy(gpt2_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    with pytest.raises(ValueError, match="ref_model must not be the policy"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), model, model, tokenizer)
