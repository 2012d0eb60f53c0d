"""The seed quickstart (TRL's README loop) runs verbatim with `trl` → `fastppo` and a local model path."""

import shutil

import torch


def test_trl_readme_quickstart_runs_unchanged(gpt2_dir, tokenizer_dir, tmp_path):
    model_path = tmp_path / "gpt2-local"
    shutil.copytree(gpt2_dir, model_path)
    for item in __import__("os").listdir(tokenizer_dir):
        shutil.copy(f"{tokenizer_dir}/{item}", model_path)
    model_path = str(model_path)

    # ---- the quickstart, verbatim but for the import and the model name ----
    from transformers import GPT2Tokenizer

    from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    # 1. load a pretrained model
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_path)
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(model_path)
    tokenizer = GPT2Tokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.eos_token

    # 2. initialize trainer
    ppo_config = {"mini_batch_size": 1, "batch_size": 1}
    config = PPOConfig(**ppo_config)
    ppo_trainer = PPOTrainer(config, model, ref_model, tokenizer)

    # 3. encode a query
    query_txt = "This morning I went to the "
    query_tensor = tokenizer.encode(query_txt, return_tensors="pt").to(model.pretrained_model.device)

    # 4. generate model response
    generation_kwargs = {
        "min_length": -1,
        "top_k": 0.0,
        "top_p": 1.0,
        "do_sample": True,
        "pad_token_id": tokenizer.eos_token_id,
        "max_new_tokens": 20,
    }
    response_tensor = ppo_trainer.generate([item for item in query_tensor], return_prompt=False, **generation_kwargs)
    response_txt = tokenizer.decode(response_tensor[0])

    # 5. define a reward for response
    reward = [torch.tensor(1.0, device=model.pretrained_model.device)]

    # 6. train model with ppo
    train_stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], reward)
    # ---- end of the quickstart ----

    assert isinstance(response_txt, str)
    assert train_stats["ppo/mean_scores"] == 1.0
    assert torch.isfinite(torch.tensor(train_stats["ppo/loss/total"]))


def test_original_quickstart_with_respond_to_batch(gpt2_dir, tokenizer):
    from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from fastppo.core import LengthSampler, respond_to_batch

    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    query_tensor = tokenizer.encode("the cat sat", return_tensors="pt")
    response_tensor = respond_to_batch(model, query_tensor, txt_len=LengthSampler(4, 5)())
    assert response_tensor.shape == (1, 4)
    ppo_trainer = PPOTrainer(PPOConfig(batch_size=1, mini_batch_size=1), model, ref_model, tokenizer)
    stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], [torch.tensor(1.0)])
    assert stats["tokens/responses_len_mean"] == 4.0
