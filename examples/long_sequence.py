"""PPO steps on long responses: time per step and peak memory, default vs memory-lean paths.

Builds a model from a config (Llama-style by default, no hub needed) or loads `--model`,
makes random prompts and responses of the requested lengths, and runs `PPOTrainer.step`
with each requested head path:

- ``full``: TRL's path, logits for every position;
- ``response``: the LM head at response positions only (`response_only_logits=True`);
- ``fused``: log-probs from hidden states, never holding [N, V] logits (`fused_lm_head=True`).

Peak memory is `torch.cuda.max_memory_allocated` on CUDA and the process's peak resident
memory on CPU (coarse: it only grows). An out-of-memory step is reported, not raised.

    python examples/long_sequence.py --lengths 512 1024 2048 --modes full fused --device cuda
    python examples/long_sequence.py --lengths 256 --vocab 32000 --hidden 256 --layers 2   # CPU-sized
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

MODES = {"full": {}, "response": {"response_only_logits": True}, "fused": {"fused_lm_head": True}}


def build_model(args) -> AutoModelForCausalLMWithValueHead:
    if args.model:
        return AutoModelForCausalLMWithValueHead.from_pretrained(args.model, dtype=args.dtype)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.query_length + max(args.lengths) + 8, pad_token_id=0,
                         bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    return AutoModelForCausalLMWithValueHead(LlamaForCausalLM(config).to(args.dtype))


def build_tokenizer(args):
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        return tokenizer
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(args.vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
                                   pad_token="t0", eos_token="t1")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def run(args, mode: str, length: int) -> str:
    device = torch.device(args.device)
    model = build_model(args).to(device)
    tokenizer = build_tokenizer(args)
    config = PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=1,
                       learning_rate=1e-6, gradient_checkpointing=args.gradient_checkpointing, backend=args.backend,
                       accelerator_kwargs={"cpu": device.type == "cpu"}, **MODES[mode])
    trainer = PPOTrainer(config, model, None, tokenizer)
    vocab = model.lm_head.weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randint(2, vocab, (args.query_length,), generator=generator) for _ in range(args.batch_size)]
    responses = [torch.randint(2, vocab, (length,), generator=generator) for _ in range(args.batch_size)]
    scores = [torch.randn((), generator=generator) for _ in range(args.batch_size)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.step(queries, responses, scores)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return f"{mode:>8} {length:>7}  out of memory"
    finally:
        del trainer, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tokens = args.batch_size * (args.query_length + length)
    best = min(times)
    return f"{mode:>8} {length:>7}  {best:8.3f} s  {tokens / best:10.0f} tok/s  peak {peak_memory_gb(device):7.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local path or hub name; default: a Llama built from flags")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="response lengths")
    parser.add_argument("--modes", nargs="+", default=["full", "fused"], choices=list(MODES))
    parser.add_argument("--query-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--mini-batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="steps per setting (the fastest is reported)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.device == "cpu":
        print("CPU: peak memory is the process's peak resident memory, which only grows; run one mode per process "
              "for clean figures.")
    print(f"{'mode':>8} {'length':>7}  time/step  throughput  memory")
    for length in args.lengths:
        for mode in args.modes:
            print(run(args, mode, length), flush=True)


if __name__ == "__main__":
    main()
