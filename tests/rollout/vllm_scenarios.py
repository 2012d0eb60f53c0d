"""Runs one vLLM rollout scenario in a process of its own and prints its measurements as JSON.

`tests/rollout/test_vllm_rollouts.py` starts it (an in-process vLLM engine rebinds torch's threads and
seeds the global RNG, so it never runs inside the pytest process) and asserts on the JSON:

    python tests/vllm_scenarios.py SCENARIO MODEL_DIR TOKENIZER_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("FASTPPO_BACKEND", "torch")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402

QUERIES = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [20]]
SAMPLING = dict(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=8)
VLLM_KWARGS = {"max_model_len": 128, "enforce_eager": True}


def policy_logprobs(trainer, queries, responses) -> list:
    """The policy's own log-probs of each response token, one unpadded sequence at a time."""
    lm = trainer.unwrapped_model.pretrained_model
    out = []
    with torch.no_grad():
        for query, response in zip(queries, responses):
            ids = torch.cat([query, response])[None]
            logits = lm(input_ids=ids).logits[0, len(query) - 1:-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0])
    return out


def max_gap(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def train_rounds(trainer, queries, rounds: int, logprobs_of=policy_logprobs, extra=lambda trainer: {}) -> list:
    """generate (with log-probs) → compare with the policy (`logprobs_of`) → step with rollout_logprobs, `rounds`
    times; each round's record also holds `extra(trainer)`, taken after its step."""
    records = []
    for round_index in range(rounds):
        syncs_before = trainer.rollout_engine.syncs
        responses, logprobs = trainer.generate(queries, return_prompt=False, return_logprobs=True, **SAMPLING)
        gap = max_gap(logprobs, logprobs_of(trainer, queries, responses))
        scores = [torch.tensor(float(len(r) % 3)) for r in responses]
        stats = trainer.step(queries, responses, scores, rollout_logprobs=logprobs)
        records.append({**extra(trainer),
            "gap": gap,
            "syncs": trainer.rollout_engine.syncs - syncs_before,
            "lengths_match": all(len(r) == len(lp) for r, lp in zip(responses, logprobs)),
            "stats": {k: float(v) for k, v in stats.items() if k.startswith("rollout/") or "tis" in k},
        })
    return records


def greedy_pair(trainer, queries, greedy: dict) -> dict:
    """Greedy responses from the vLLM engine and from HF generate on the same policy."""
    vllm_tokens = trainer.generate(queries, return_prompt=False, **greedy)
    hf_samples = trainer.hf_engine.generate(trainer.model, queries, None, 4, dict(greedy, pad_token_id=0))
    return {"vllm": [t.tolist() for t in vllm_tokens], "hf": [s[0].tokens.tolist() for s in hf_samples]}


def trainer_for(model_dir, tokenizer, **config):
    settings = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=3e-3, init_kl_coef=0.05, seed=0,
                    rollout_engine="vllm", vllm_kwargs=VLLM_KWARGS, accelerator_kwargs={"cpu": True})
    settings.update(config)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, **settings.pop("model_kwargs", {}))
    return PPOTrainer(PPOConfig(**settings), model, None, tokenizer)


def scenario_train(model_dir, tokenizer, out_dir) -> dict:
    trainer = trainer_for(model_dir, tokenizer, rollout_correction="tis")
    queries = [torch.tensor(q) for q in QUERIES]
    greedy = dict(do_sample=False, max_new_tokens=10, eos_token_id=None)
    result = {"greedy_initial": greedy_pair(trainer, queries, greedy)}
    result["rounds"] = train_rounds(trainer, queries, 3)

    # No weight change, no sync (the first generate after the last step syncs).
    trainer.generate(queries, **SAMPLING)
    syncs = trainer.rollout_engine.syncs
    trainer.generate(queries, **SAMPLING)
    trainer.generate(queries, **SAMPLING)
    result["syncs_without_step"] = trainer.rollout_engine.syncs - syncs

    # Control: a step moves the weights, and the engine is told nothing.
    responses, logprobs = trainer.generate(queries, return_prompt=False, return_logprobs=True, **SAMPLING)
    trainer.step(queries, responses, [torch.tensor(1.0)] * 4, rollout_logprobs=logprobs)
    trainer.rollout_engine.stale = False
    responses, logprobs = trainer.generate(queries, return_prompt=False, return_logprobs=True, **SAMPLING)
    result["unsynced_gap"] = max_gap(logprobs, policy_logprobs(trainer, queries, responses))
    trainer.rollout_engine.weights_changed()
    responses, logprobs = trainer.generate(queries, return_prompt=False, return_logprobs=True, **SAMPLING)
    result["resynced_gap"] = max_gap(logprobs, policy_logprobs(trainer, queries, responses))

    # Greedy vLLM against greedy HF generate on the trained policy, token for token.
    result["greedy_trained"] = greedy_pair(trainer, queries, greedy)
    vllm_tokens = trainer.generate(queries, return_prompt=False, **greedy)

    # Translation on a live engine: n per query in order, single-query shape, min/max lengths, EOS, seeds.
    pairs = trainer.generate(queries, num_return_sequences=2, **SAMPLING)
    result["n2_prefixes_ok"] = len(pairs) == 8 and all(
        pairs[i][: len(queries[i // 2])].tolist() == queries[i // 2].tolist() for i in range(8))
    single = trainer.generate(queries[0], return_prompt=False, num_return_sequences=3, **SAMPLING)
    result["single_shape"] = list(single.shape)
    fixed = trainer.generate(queries, return_prompt=False, do_sample=True, min_new_tokens=6, max_new_tokens=6)
    result["fixed_lengths"] = [len(r) for r in fixed]
    tokens = vllm_tokens[0].tolist()
    stop = next((t for i, t in enumerate(tokens) if i >= 1 and t not in tokens[:i]), tokens[-1])
    cut = trainer.generate(queries[:1], return_prompt=False, do_sample=False, max_new_tokens=10, eos_token_id=stop)
    result["eos_cut"] = cut[0].tolist()
    result["eos_expected"] = tokens[: tokens.index(stop) + 1]
    seeded = [trainer.generate(queries, return_prompt=False, seed=7, **SAMPLING) for _ in range(2)]
    result["seeded_equal"] = all(a.tolist() == b.tolist() for a, b in zip(*seeded))
    result["length_sampler"] = [len(r) for r in trainer.generate(
        queries, return_prompt=False, length_sampler=lambda: 3, eos_token_id=None, do_sample=True, top_k=0)]
    try:
        trainer.generate(queries, num_beams=2)
        result["num_beams_refused"] = False
    except ValueError as error:
        result["num_beams_refused"] = "num_beams" in str(error)

    # The reference still generates (HF, frozen copy): an untrained reference differs from the policy.
    responses, ref_responses = trainer.generate(queries, generate_ref_response=True, return_prompt=False, **greedy)
    result["ref_pairs"] = len(responses) == len(ref_responses) == 4

    # The trained policy saves and loads in plain transformers.
    trainer.save_pretrained(out_dir)
    plain = AutoModelForCausalLM.from_pretrained(out_dir)
    live = trainer.unwrapped_model.pretrained_model.state_dict()
    result["saved_max_diff"] = max(float((plain.state_dict()[k] - live[k]).abs().max()) for k in live)
    return result


def scenario_peft(model_dir, tokenizer, out_dir) -> dict:
    from peft import LoraConfig

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    trainer = trainer_for(model_dir, tokenizer, model_kwargs={"peft_config": lora})
    queries = [torch.tensor(q) for q in QUERIES]
    result = {"rounds": train_rounds(trainer, queries, 2)}
    responses, ref_responses = trainer.generate(queries, generate_ref_response=True, return_prompt=False,
                                                do_sample=False, max_new_tokens=6, eos_token_id=None)
    result["ref_pairs"] = len(responses) == len(ref_responses) == 4
    return result


def scenario_zero3(model_dir, tokenizer, out_dir) -> dict:
    """One process under DeepSpeed ZeRO-3 (what `accelerate launch` with zero3.yaml sets up): the policy's
    weights live as ZeRO-3 partitions, so every sync must push the gathered parameters."""
    from fastppo import sharding

    os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3", LOCAL_RANK="0",
                      RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29581")
    trainer = trainer_for(model_dir, tokenizer, accelerator_kwargs={})
    queries = [torch.tensor(q) for q in QUERIES]
    result = {"zero_stage": sharding.zero_stage(trainer.accelerator),
              "local_numel": sum(p.numel() for p in trainer.model.parameters())}
    result["rounds"] = train_rounds(trainer, queries, 2)
    return result


SCENARIOS = {"train": scenario_train, "peft": scenario_peft, "zero3": scenario_zero3}


def main(argv) -> None:
    name, model_dir, tokenizer_dir, out_dir = argv
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    result = SCENARIOS[name](model_dir, tokenizer, out_dir)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
