"""Regenerate the TRL 0.11.4 parity fixtures in this folder (tests/data/trl_parity/).

Produces:
  tokenizer/            PreTrainedTokenizerFast (WordLevel, 64-token vocab, pad=<pad>=0, eos=<eos>=1, right padding)
  init/                 tiny GPT-2 (n_embd=32, n_layer=2, n_head=2, vocab 64) + TRL value head, saved with
                        trl.AutoModelForCausalLMWithValueHead.save_pretrained (torch.manual_seed(0))
  <case>/inputs.pt      {"steps": [{"queries", "responses", "scores", "response_masks"}, ...]}
  <case>/config.json    the PPOConfig kwargs passed (only those)
  <case>/stats.json     per-step stats returned by trl.PPOTrainer.step() + extras (see README.md)
  <case>/final.safetensors  policy state_dict() (TRL keys, base + v_head.*) after the last step, float32

This script must be run with TRL's own environment; it never imports fastppo:

    python3 -m venv /tmp/trl011 && . /tmp/trl011/bin/activate
    pip install torch==2.13.0
    pip install -c <(echo torch==2.13.0) trl==0.11.4 transformers==4.46.3 accelerate==1.1.1 \
        datasets==3.1.0 numpy==1.26.4 pyarrow==18.0.0 pandas==2.2.3 tyro==0.8.14 safetensors
    python tests/data/trl_parity/make_fixtures.py            # everything (tokenizer, init, all cases)
    python tests/data/trl_parity/make_fixtures.py --case default   # one case (needs tokenizer/ and init/)

Each case runs in its own subprocess (accelerate keeps process-global singleton state, and the
trainer seeds the global RNGs), with torch.set_num_threads(1) on CPU, so output is deterministic.
"""

import argparse
import json
import os
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
TOK_DIR = os.path.join(HERE, "tokenizer")
INIT_DIR = os.path.join(HERE, "init")

WORDS = [
    "a", "an", "the", "and", "or", "but", "if", "then", "so", "to", "of", "in", "on", "at", "by",
    "up", "is", "are", "was", "be", "it", "he", "she", "we", "you", "they", "i", "me", "my", "no",
    "yes", "not", "cat", "dog", "sun", "sky", "red", "blue", "big", "small", "good", "bad", "hot",
    "cold", "run", "sit", "eat", "see", "go", "come", "one", "two", "six", "ten", "day", "night",
    "old", "new", "fast", "slow", "win", "lose",
]
assert len(WORDS) == 62 and len(set(WORDS)) == 62

# NOTE: at step 1 policy == reference, so the KL penalty is exactly 0 and kl_penalty / init_kl_coef have no
# effect; the kl_* and fixed_kl cases therefore run 2 steps (step 2 has a non-zero KL).
BASE = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, seed=0)

# name -> (PPOConfig kwargs, n_steps, data options)
CASES = {
    "default": (dict(BASE), 2, {}),
    "kl_abs": (dict(BASE, kl_penalty="abs"), 2, {}),
    "kl_mse": (dict(BASE, kl_penalty="mse"), 2, {}),
    "kl_full": (dict(BASE, kl_penalty="full"), 2, {}),
    "score_scaling": (dict(BASE, use_score_scaling=True, use_score_norm=True, score_clip=0.5), 2, {}),
    # mini_batch_size=1: a length-1 response would make TRL's masked_var divide by zero (NaN stats)
    "grad_accum": (
        dict(batch_size=4, mini_batch_size=1, gradient_accumulation_steps=2, max_grad_norm=0.5,
             ppo_epochs=1, learning_rate=1e-3, seed=0),
        1,
        {"min_response_len": 2},
    ),
    # same as grad_accum, but with TRL's one-shot clipping bug removed (trainer.model_params is a `filter`
    # iterator, exhausted by the first clip_grad_norm_ call, so TRL only clips the very first optimizer step)
    "grad_accum_clipfix": (
        dict(batch_size=4, mini_batch_size=1, gradient_accumulation_steps=2, max_grad_norm=0.5,
             ppo_epochs=1, learning_rate=1e-3, seed=0),
        1,
        {"min_response_len": 2, "clipfix": True},
    ),
    "fixed_kl": (
        dict(BASE, adap_kl_ctrl=False, init_kl_coef=0.05, gamma=0.9, lam=0.8, cliprange=0.1,
             cliprange_value=0.1, vf_coef=0.5),
        2,
        {},
    ),
    "early_stop": (dict(BASE, early_stopping=True, target_kl=1e-6, ppo_epochs=4), 1, {}),
    "ratio_skip": (dict(BASE, ratio_threshold=1.0000001), 1, {}),
    "response_masks": (dict(BASE), 1, {"response_masks": True}),
    # scores shifted by +2 so the reward mean is far from 0 and TRL's pad-position leak is clearly visible
    "whiten_rewards": (dict(BASE, whiten_rewards=True), 1, {"score_offset": 2.0}),
    # ref_model=None, num_shared_layers=1: TRL freezes the policy's embeddings and first block
    # (the tied LM head with them) and copies the model as the reference
    "shared_layers": (dict(BASE), 2, {"num_shared_layers": 1}),
    # tokenizer.padding_side="left": TRL pads the step's batch on the left and offsets each row's mask;
    # GPT-2's position ids do not follow the pads, so the numbers differ from right padding
    "left_padding": (dict(BASE), 2, {"padding_side": "left"}),
}


# --------------------------------------------------------------------------------------------------
# tokenizer + init model


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for i, w in enumerate(WORDS):
        vocab[w] = i + 2
    # "<unk>" is deliberately NOT in the vocab: out-of-vocabulary words raise (fixtures only use ids)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="right"
    )
    assert hf.pad_token_id == 0 and hf.eos_token_id == 1 and len(hf) == 64
    hf.save_pretrained(TOK_DIR)


def make_init():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import AutoModelForCausalLMWithValueHead

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    base = GPT2LMHeadModel(cfg)
    # passing an instance: wraps it (sets is_peft_model etc.); v_head gets default nn.Linear init
    # from the same RNG stream (torch.manual_seed(0) above)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base)
    model.save_pretrained(INIT_DIR)
    for f in os.listdir(INIT_DIR):
        os.chmod(os.path.join(INIT_DIR, f), 0o644)
    total = sum(os.path.getsize(os.path.join(INIT_DIR, f)) for f in os.listdir(INIT_DIR))
    assert total < 1_000_000, total


# --------------------------------------------------------------------------------------------------
# data


def make_step_data(step, n, min_response_len=1, response_masks=False, score_offset=0.0):
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    queries, responses, scores, masks = [], [], [], []
    for i in range(n):
        ql = int(torch.randint(2, 7, (1,), generator=g))
        rl = int(torch.randint(max(min_response_len, 1), 8, (1,), generator=g))
        if i == 0 and min_response_len <= 1:
            rl = 1  # always include a length-1 response
        queries.append(torch.randint(2, 64, (ql,), generator=g, dtype=torch.int64))
        responses.append(torch.randint(2, 64, (rl,), generator=g, dtype=torch.int64))
        scores.append(torch.randn((), generator=g, dtype=torch.float32) + score_offset)
    if response_masks:
        for i, r in enumerate(responses):
            m = torch.ones(len(r), dtype=torch.int64)
            if len(r) >= 2:
                if i % 2 == 1:
                    m[-1] = 0  # last token masked: TRL puts the score on the last *unmasked* token
                else:
                    m[len(r) // 2] = 0  # a middle token masked
                if len(r) >= 4:
                    m[0] = 0
            assert m.sum() > 0
            masks.append(m)
        # make sure at least one response actually has masked tokens
        assert any(int((m == 0).sum()) > 0 for m in masks)
    return {"queries": queries, "responses": responses, "scores": scores,
            "response_masks": masks if response_masks else None}


# --------------------------------------------------------------------------------------------------
# one case (runs in a subprocess)


class _F(float):
    """float with a tensor-like .to(): minimal shim for TRL 0.11.4's RunningMoments bug (see README)."""

    def to(self, dtype=None, device=None):
        import torch

        return torch.tensor(float(self), dtype=dtype, device=device)


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
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    cfg_kwargs, n_steps, data_opts = CASES[name]
    out = os.path.join(HERE, name)
    os.makedirs(out, exist_ok=True)

    steps_data = [
        make_step_data(s, cfg_kwargs["batch_size"], data_opts.get("min_response_len", 1),
                       data_opts.get("response_masks", False), data_opts.get("score_offset", 0.0))
        for s in range(n_steps)
    ]
    torch.save({"steps": steps_data}, os.path.join(out, "inputs.pt"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg_kwargs, f, indent=2, sort_keys=True)
        f.write("\n")

    tokenizer = AutoTokenizer.from_pretrained(TOK_DIR)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id == 0
    tokenizer.padding_side = data_opts.get("padding_side", "right")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(INIT_DIR, attn_implementation="eager")
    shared = data_opts.get("num_shared_layers")
    ref = None if shared else AutoModelForCausalLMWithValueHead.from_pretrained(INIT_DIR, attn_implementation="eager")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PPOConfig(**cfg_kwargs)
        trainer = PPOTrainer(config=config, model=model, ref_model=ref, tokenizer=tokenizer, num_shared_layers=shared)

    notes = []
    # ---- instrumentation (observes only; does not change TRL's math) ----
    rec = {}
    inner_opt = trainer.optimizer
    while hasattr(inner_opt, "optimizer"):
        inner_opt = inner_opt.optimizer
    inner_opt.register_step_post_hook(lambda *a, **k: rec.__setitem__("opt_steps", rec["opt_steps"] + 1))

    orig_train_minibatch = trainer.train_minibatch

    def train_minibatch(old_logprobs, values, logprobs, logits, vpreds, mask, advantages, returns):
        rec["minibatches"] += 1
        avg_ratio = float(((torch.exp(logprobs - old_logprobs) * mask).sum() / mask.sum()).item())
        ts = orig_train_minibatch(old_logprobs, values, logprobs, logits, vpreds, mask, advantages, returns)
        row = {"avg_ratio": avg_ratio}
        for k, v in ts.items():
            if v.numel() == 1:
                row[k] = float(v)
        rec["mb_stats"].append(row)
        return ts

    trainer.train_minibatch = train_minibatch

    orig_clip = torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, *a, **k):
        params = list(parameters)
        norm = orig_clip(params, max_norm, *a, **k)
        rec["clip_calls"].append({"n_params": len(params), "total_norm": float(norm)})
        return norm

    torch.nn.utils.clip_grad_norm_ = clip

    orig_perm = np.random.permutation

    def perm(*a, **k):
        p = orig_perm(*a, **k)
        rec["perms"].append(p.tolist())
        return p

    np.random.permutation = perm

    orig_compute_adv = trainer.compute_advantages

    def compute_advantages(values, rewards, mask):
        v, adv, ret = orig_compute_adv(values, rewards, mask)
        rec["internals"] = {
            "masks": _tolist(mask),
            "rewards": _tolist(rewards),
            "values": _tolist(v),
            "advantages": _tolist(adv),
            "returns": _tolist(ret),
        }
        return v, adv, ret

    trainer.compute_advantages = compute_advantages

    orig_prep = trainer.prepare_model_inputs

    def prepare_model_inputs(q, r):
        mi = orig_prep(q, r)
        rec["model_inputs"] = {k: _tolist(v) for k, v in mi.items()}
        return mi

    trainer.prepare_model_inputs = prepare_model_inputs

    if data_opts.get("clipfix"):
        trainer.model_params = [p for p in trainer.model.parameters() if p.requires_grad]
        notes.append("grad_accum_clipfix: trainer.model_params replaced by a list so that every optimizer "
                     "step is clipped (TRL 0.11.4 only clips the first one).")

    if cfg_kwargs.get("use_score_scaling"):
        # TRL 0.11.4 bug: RunningMoments.update stores mean/std as python floats (.item()), but step()
        # calls self.running.std.to(...) -> AttributeError. Re-wrap them as floats with a .to();
        # arithmetic is unchanged (still python floats / float64).
        orig_update = trainer.running.update

        def update(xs):
            res = orig_update(xs)
            trainer.running.mean = _F(trainer.running.mean)
            trainer.running.std = _F(trainer.running.std)
            return res

        trainer.running.update = update
        notes.append("score_scaling: unpatched TRL 0.11.4 raises AttributeError: 'float' object has no "
                     "attribute 'to' (RunningMoments.mean/std are python floats). Recorded with a shim that "
                     "only adds .to() to those floats.")

    step_records = []
    for s, d in enumerate(steps_data):
        rec.update(opt_steps=0, minibatches=0, mb_stats=[], clip_calls=[], perms=[], internals=None, model_inputs=None)
        kl_coef_before = float(trainer.kl_ctl.value)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            stats = trainer.step(
                [q.clone() for q in d["queries"]],
                [r.clone() for r in d["responses"]],
                [x.clone() for x in d["scores"]],
                response_masks=[m.clone() for m in d["response_masks"]] if d["response_masks"] else None,
            )
        skipped = [str(x.message) for x in w if "Skipping batch" in str(x.message)]
        sr = {}
        for k in sorted(stats):
            v = stats[k]
            if k.startswith("time/"):
                continue  # wall-clock, not reproducible
            if isinstance(v, (float, int)) and not isinstance(v, bool):
                sr[k] = float(v)
            elif isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.size == 1):
                sr[k] = float(np.asarray(v).reshape(-1)[0])
            elif isinstance(v, torch.Tensor) and v.numel() == 1:
                sr[k] = float(v.reshape(-1)[0])
        for k in ("objective/kl_dist", "objective/logprobs", "objective/ref_logprobs",
                  "tokens/queries_dist", "tokens/responses_dist"):
            sr[k] = _tolist(stats[k])
        sr["_all_keys"] = sorted(stats.keys())
        sr["_stat_types"] = {
            k: (f"ndarray{list(np.asarray(v).shape)}" if isinstance(v, np.ndarray) else type(v).__name__)
            for k, v in sorted(stats.items())
        }
        sr["kl_ctl_value_before"] = kl_coef_before
        sr["kl_ctl_value_after"] = float(trainer.kl_ctl.value)
        sr["_n_minibatches"] = rec["minibatches"]
        sr["_n_optimizer_steps"] = rec["opt_steps"]
        sr["_n_skipped_minibatches"] = len(skipped)
        sr["_skip_warnings"] = skipped
        sr["_early_stopped"] = bool(
            cfg_kwargs.get("early_stopping")
            and rec["minibatches"] < cfg_kwargs.get("ppo_epochs", 4) * cfg_kwargs["batch_size"]
            // cfg_kwargs["mini_batch_size"]
        )
        sr["_minibatch_stats"] = rec["mb_stats"]
        sr["_clip_calls"] = rec["clip_calls"]
        sr["_permutations"] = rec["perms"]
        sr["_model_inputs"] = rec["model_inputs"]
        sr["_internals"] = rec["internals"]
        step_records.append(sr)

    result = {
        "case": name,
        "versions": {"trl": trl.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "accelerate": __import__("accelerate").__version__, "numpy": np.__version__},
        "notes": notes,
        "steps": step_records,
    }
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")

    sd = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    tensors = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in sd.items()}
    save_file(tensors, os.path.join(out, "final.safetensors"))
    os.chmod(os.path.join(out, "final.safetensors"), 0o644)
    assert os.path.getsize(os.path.join(out, "final.safetensors")) < 200_000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default=None)
    args = ap.parse_args()
    if args.case:
        run_case(args.case)
        return
    import torch

    torch.set_num_threads(1)
    make_tokenizer()
    make_init()
    for name in CASES:
        print(f"[make_fixtures] {name}", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--case", name], check=True)


if __name__ == "__main__":
    main()
