"""PPOTrainer.step on a ragged batch: padded rows against padding_free, with and without a token budget.

16 responses with log-uniform lengths (GPU: 64 … 4096 tokens; CPU: 8 … 256 on the tiny model) after
a 32-token query (CPU: 8). Padded rows make the model and the LM head run over
16 × (query + longest response) positions; packed rows over the real tokens only. Recorded per
variant: median step time, real tokens per second, peak memory, and the share of the padded
batch's positions that are pads (FLOPs that padding_free does not spend, to first order:
attention's quadratic part aside).
"""

import math

import torch

import harness
from bench_step import SETTINGS, _tokenizer, llama_policy, time_steps

VARIANTS = {  # name → PPOConfig switches
    "padded": {},
    "padding-free": {"padding_free": True},
    "padding-free+budget": {"padding_free": True},  # + max_tokens_per_microbatch: the longest sequence's length
}
LENGTHS = {"gpu": (64, 4096), "cpu": (8, 256), "smoke": (2, 8)}
ROWS = 16


def pytest_generate_tests(metafunc):
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", list(VARIANTS))


def _batch(settings: dict, mode: str, device: torch.device):
    generator = torch.Generator().manual_seed(2)
    low, high = LENGTHS[mode]
    vocab = settings["vocab"]
    lengths = [int(math.exp(math.log(low) + torch.rand((), generator=generator).item() * math.log(high / low)))
               for _ in range(ROWS)]
    queries = [torch.randint(3, vocab, (settings["query_length"],), generator=generator).to(device)
               for _ in range(ROWS)]
    responses = [torch.randint(3, vocab, (n,), generator=generator).to(device) for n in lengths]
    scores = torch.randn(ROWS, generator=generator).to(device)
    return queries, responses, scores


def _trainer(settings: dict, switches: dict, max_length: int, device: torch.device):
    from fastppo import PPOConfig, PPOTrainer

    ppo_config = PPOConfig(batch_size=ROWS, mini_batch_size=4, ppo_epochs=1, seed=0, backend="torch", **switches)
    return PPOTrainer(ppo_config, llama_policy(settings, max_length, device), None, _tokenizer())


def bench_ragged_step(benchmark, bench_env, variant):
    device, mode = bench_env.device, bench_env.mode
    settings = SETTINGS[mode]
    batch = _batch(settings, mode, device)
    lengths = [len(q) + len(r) for q, r in zip(batch[0], batch[1])]
    real, padded = sum(lengths), ROWS * max(lengths)
    switches = dict(VARIANTS[variant])
    if variant.endswith("budget"):
        switches["max_tokens_per_microbatch"] = max(lengths)
    benchmark.group = "ragged"
    info = benchmark.extra_info
    info.update(op="ragged", provider=variant, dims="BT", shape=[ROWS, max(lengths)],
                shape_id=f"B{ROWS}xLmax{max(lengths)}",
                dtype=harness.dtype_name(settings["dtype"]), seq_len=max(lengths), device=str(device), mode=mode,
                real_tokens=real, padded_tokens=padded, pad_share=1 - real / padded, switches=switches,
                lengths=lengths)
    median_s = time_steps(benchmark, bench_env, lambda: _trainer(settings, switches, max(lengths), device), batch,
                          rounds=1 if bench_env.smoke else 3)
    info.update(median_ms=median_s * 1e3, tokens_per_s=real / median_s, timer="host_rounds")
