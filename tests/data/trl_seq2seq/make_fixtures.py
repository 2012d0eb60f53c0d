"""Regenerate the TRL 0.11.4 encoder-decoder parity fixtures in this folder (tests/data/trl_seq2seq/).

Produces:
  init/              a tiny T5 (d_model 32, 2 + 2 layers, 2 heads, vocab 64) + TRL value head, saved with
                     trl.AutoModelForSeq2SeqLMWithValueHead.save_pretrained (torch.manual_seed(0))
  <case>/inputs.pt   {"steps": [{"queries", "responses", "scores"}, ...]}; each response is a decoder sequence
                     as T5's generate returns it: the decoder start token (0, the pad) first
  <case>/config.json the PPOConfig kwargs passed (only those)
  <case>/stats.json  per step: every scalar stat TRL's step() returned (time/* left out), the [bs] / [bs, L-1]
                     arrays objective/kl_dist, objective/logprobs, objective/ref_logprobs, `_all_keys`, the
                     masks TRL trained on (`_masks`) and the KL coefficient before and after
  <case>/final.safetensors  the policy's state_dict() after the last step (TRL keys, base + v_head.*), float32

The tokenizer is tests/data/trl_parity/tokenizer (pad 0, eos 1, right padding). Run in TRL's own environment
(see tests/data/trl_parity/make_fixtures.py's docstring); it never imports fastppo:

    . /tmp/trl011/bin/activate && python tests/data/trl_seq2seq/make_fixtures.py

Each case runs in its own subprocess with torch.set_num_threads(1), so the output is deterministic.
"""

import argparse
import json
import os
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
TOK_DIR = os.path.join(HERE, "..", "trl_parity", "tokenizer")
INIT_DIR = os.path.join(HERE, "init")

BASE = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, seed=0)
# at step 1 policy == reference (KL 0), so the KL variants need a second step to differ
CASES = {"default": (dict(BASE), 2), "kl_full": (dict(BASE, kl_penalty="full"), 2)}


def make_init():
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    from trl import AutoModelForSeq2SeqLMWithValueHead

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(T5ForConditionalGeneration(config))
    model.save_pretrained(INIT_DIR)
    for name in os.listdir(INIT_DIR):
        os.chmod(os.path.join(INIT_DIR, name), 0o644)


def make_step_data(step, n):
    """Queries of 2-6 ids; responses: the decoder start token, then 2-7 ids (TRL trains from the third token of
    the decoder sequence on, so fewer would leave a row with nothing to train); some end in eos."""
    import torch

    g = torch.Generator().manual_seed(2000 + step)
    queries, responses, scores = [], [], []
    for i in range(n):
        query_length = int(torch.randint(2, 7, (1,), generator=g))
        response_length = int(torch.randint(2, 8, (1,), generator=g))
        queries.append(torch.randint(2, 64, (query_length,), generator=g, dtype=torch.int64))
        body = torch.randint(2, 64, (response_length,), generator=g, dtype=torch.int64)
        if i % 2:
            body[-1] = 1  # eos
        responses.append(torch.cat([torch.zeros(1, dtype=torch.int64), body]))
        scores.append(torch.randn((), generator=g, dtype=torch.float32))
    return {"queries": queries, "responses": responses, "scores": scores}


def _tolist(x):
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64).tolist() if x.dtype.kind == "f" else x.tolist()
    return x


def run_case(name):
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import trl
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from trl import AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer

    config_kwargs, n_steps = CASES[name]
    out = os.path.join(HERE, name)
    os.makedirs(out, exist_ok=True)
    steps = [make_step_data(s, config_kwargs["batch_size"]) for s in range(n_steps)]
    torch.save({"steps": steps}, os.path.join(out, "inputs.pt"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_kwargs, f, indent=2, sort_keys=True)
        f.write("\n")

    tokenizer = AutoTokenizer.from_pretrained(TOK_DIR)
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(INIT_DIR)
    ref = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(INIT_DIR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PPOTrainer(config=PPOConfig(**config_kwargs), model=model, ref_model=ref, tokenizer=tokenizer)
    assert trainer.is_encoder_decoder

    seen = {}
    compute_advantages = trainer.compute_advantages

    def recording_advantages(values, rewards, mask):  # observes the masks TRL trains on
        seen["masks"] = _tolist(mask)
        return compute_advantages(values, rewards, mask)

    trainer.compute_advantages = recording_advantages
    records = []
    for data in steps:
        before = float(trainer.kl_ctl.value)
        stats = trainer.step([q.clone() for q in data["queries"]], [r.clone() for r in data["responses"]],
                             [s.clone() for s in data["scores"]])
        record = {}
        for key in sorted(stats):
            value = stats[key]
            if key.startswith("time/"):
                continue
            if isinstance(value, (float, int)) and not isinstance(value, bool):
                record[key] = float(value)
            elif isinstance(value, (np.generic, np.ndarray, torch.Tensor)) and np.asarray(value).size == 1:
                record[key] = float(np.asarray(value).reshape(-1)[0])
        for key in ("objective/kl_dist", "objective/logprobs", "objective/ref_logprobs"):
            record[key] = _tolist(stats[key])
        record["_all_keys"] = sorted(stats)
        record["_masks"] = seen["masks"]
        record["kl_ctl_value_before"], record["kl_ctl_value_after"] = before, float(trainer.kl_ctl.value)
        records.append(record)

    versions = {"trl": trl.__version__, "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "accelerate": __import__("accelerate").__version__, "numpy": np.__version__}
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump({"case": name, "versions": versions, "steps": records}, f, indent=1)
        f.write("\n")
    state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    save_file({k: v.detach().float().clone().contiguous() for k, v in state.items()},
              os.path.join(out, "final.safetensors"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default=None)
    args = parser.parse_args()
    if args.case:
        run_case(args.case)
        return
    import torch

    torch.set_num_threads(1)
    make_init()
    for name in CASES:
        print(f"[make_fixtures] {name}", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--case", name], check=True)


if __name__ == "__main__":
    main()
