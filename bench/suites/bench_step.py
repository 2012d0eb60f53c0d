"""End to end: `PPOTrainer.step` on a small Llama built from a config (no hub), backend="torch" vs "triton".

Variants: "torch" (the reference ops), "triton" (the kernels), "triton-fused" (the kernels with
`fused_lm_head=True`: log-probs from hidden states, never the [N, V] logits), "triton-grpo" (the kernels
with GRPO's advantages in groups of 2: no critic forward or value loss, for the row beside PPO's).
bench_step: tokens per second (B·(query + response) tokens / median step time), MFU (the
step's model FLOPs, flops.step_flops, / median step time / the run's measured matmul rate) and
peak memory at a few response lengths. bench_step_longest (CUDA): the longest response length
whose step fits in device memory, per backend — doubling from SEARCH_START until the first
out-of-memory, then bisecting to within 1/8. On CPU both are tiny smokes: the triton backend
runs under the interpreter (smoke mode only) and host memory is not the limit that matters.

The GPU model has Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads over 2 key-value heads,
MLP 4864, vocabulary 151936, tied embeddings: 494 M parameters), built from a config with
random weights: DESIGN.md §6's bar is for a 0.5B model at 2k-token responses (≥ 2× step, ≥ 4×
longest fit). Its vocabulary is where the backends differ: the reference upcasts [B, T, V]
logits to float32 and keeps log-softmax and softmax copies for backward; the kernels read the
bf16 logits in place, and the fused variant never makes them.
"""

from __future__ import annotations

import time

import pytest
import torch

import harness
import machine
from flops import step_flops

VARIANTS = {  # name → PPOConfig switches
    "torch": dict(backend="torch"),
    "triton": dict(backend="triton"),
    "triton-fused": dict(backend="triton", fused_lm_head=True),
    # GRPO beside PPO's default GAE: no value head run or trained, groups of 2 answers per query
    "triton-grpo": dict(backend="triton", advantage_estimator="grpo", group_size=2),
}
LONGEST_VARIANTS = ("torch", "triton", "triton-fused")  # the out-of-memory search: the backends, not objectives
SETTINGS = {
    "gpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, dtype=torch.bfloat16,
                batch_size=4, mini_batch_size=2, query_length=32, lengths=[512, 2048, 8192], rounds=3,
                search_start=4096, search_limit=1 << 17),
    "cpu": dict(hidden=64, layers=2, heads=2, intermediate=128, vocab=2048, dtype=torch.float32,
                batch_size=4, mini_batch_size=2, query_length=8, lengths=[32, 128, 512], rounds=3),
    "smoke": dict(hidden=32, layers=2, heads=2, intermediate=64, vocab=512, dtype=torch.float32,
                  batch_size=2, mini_batch_size=1, query_length=4, lengths=[8], rounds=1,
                  search_start=8, search_limit=16),
}
PPO_EPOCHS = 1  # one optimisation pass per step keeps the GPU budget small; the ratio is what matters


def pytest_generate_tests(metafunc):
    settings = SETTINGS[harness.run_mode(metafunc.config)]
    if "backend" in metafunc.fixturenames:
        longest = metafunc.function.__name__ == "bench_step_longest"
        metafunc.parametrize("backend", list(LONGEST_VARIANTS if longest else VARIANTS))
    if "response_length" in metafunc.fixturenames:
        metafunc.parametrize("response_length", settings["lengths"])


@pytest.fixture()
def settings(bench_env):
    return SETTINGS[bench_env.mode]


def _skip_reason(backend: str, env) -> str | None:
    if VARIANTS[backend]["backend"] == "triton":
        return harness.provider_skip_reason("fastppo", env)
    return None


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def llama_config(settings: dict, max_length: int):
    """The benchmark Llama's config (also what flops.step_flops counts)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=settings["vocab"], hidden_size=settings["hidden"], intermediate_size=settings["intermediate"],
        num_hidden_layers=settings["layers"], num_attention_heads=settings["heads"],
        num_key_value_heads=settings.get("kv_heads", settings["heads"]), max_position_embeddings=max_length,
        tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, attn_implementation="sdpa",
    )


def llama_policy(settings: dict, max_length: int, device: torch.device):
    """The benchmark's value-head Llama, built from a config (no hub), seeded."""
    from transformers import LlamaForCausalLM

    from fastppo import AutoModelForCausalLMWithValueHead

    torch.manual_seed(0)
    config = llama_config(settings, max_length)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(settings["dtype"])
    return AutoModelForCausalLMWithValueHead(base)


def _build_trainer(settings: dict, backend: str, max_length: int, device: torch.device):
    from fastppo import PPOConfig, PPOTrainer

    model = llama_policy(settings, max_length, device)
    ppo_config = PPOConfig(batch_size=settings["batch_size"], mini_batch_size=settings["mini_batch_size"],
                           ppo_epochs=PPO_EPOCHS, seed=0, **VARIANTS[backend])
    return PPOTrainer(ppo_config, model, None, _tokenizer())


def _batch(settings: dict, response_length: int, device: torch.device, group_size: int = 1):
    """Random queries (each repeated `group_size` times in a row, as a group estimator's batch), responses, scores."""
    generator = torch.Generator().manual_seed(1)
    size, vocab = settings["batch_size"], settings["vocab"]
    queries = [torch.randint(3, vocab, (settings["query_length"],), generator=generator).to(device)
               for _ in range(size)]
    queries = [queries[i // group_size * group_size] for i in range(size)]
    responses = [torch.randint(3, vocab, (response_length,), generator=generator).to(device) for _ in range(size)]
    scores = torch.randn(size, generator=generator).to(device)
    return queries, responses, scores


def _parameters(trainer) -> int:
    return sum(p.numel() for p in trainer.unwrapped_model.parameters())


def bench_step(benchmark, bench_env, settings, backend, response_length):
    reason = _skip_reason(backend, bench_env)
    if reason is not None:
        pytest.skip(reason)
    device = bench_env.device
    total_length = settings["query_length"] + response_length
    tokens = settings["batch_size"] * total_length
    benchmark.group = "step"
    info = benchmark.extra_info
    info.update(op="step", provider=backend, dims="BT", shape=[settings["batch_size"], total_length],
                shape_id=f"B{settings['batch_size']}xQ{settings['query_length']}xR{response_length}",
                dtype=harness.dtype_name(settings["dtype"]), seq_len=response_length, device=str(device),
                mode=bench_env.mode, tokens_per_step=tokens, ppo_epochs=PPO_EPOCHS,
                model={k: v for k, v in settings.items() if k in ("hidden", "layers", "heads", "vocab")})
    batch = _batch(settings, response_length, device, VARIANTS[backend].get("group_size", 1))
    median_s = time_steps(benchmark, bench_env, lambda: _build_trainer(settings, backend, total_length, device),
                          batch, settings["rounds"])
    flops = step_flops(llama_config(settings, total_length), settings["batch_size"], total_length, PPO_EPOCHS)
    info.update(median_ms=median_s * 1e3, tokens_per_s=tokens / median_s, timer="host_rounds",
                rounds=settings["rounds"], flops=flops,
                mfu=flops / median_s / (bench_env.ceilings["matmul_TFLOPs"] * 1e12))


def time_steps(benchmark, bench_env, build, batch, rounds: int) -> float:
    """Median seconds of `trainer.step(*batch)` for the trainer `build()` makes: one warm-up step,
    one for peak memory, then `rounds` timed ones; fills `benchmark.extra_info` (warm-up, peak,
    parameters). Out of memory skips the case as "OOM" (the report shows it)."""
    info, device = benchmark.extra_info, bench_env.device
    trainer = None
    oom = None
    try:
        trainer = build()
        info["parameters"] = _parameters(trainer)

        def step():
            trainer.step(*batch)
            bench_env.synchronize()

        start = time.perf_counter()
        step()  # warm-up: cuBLAS handles, Triton JIT, allocator growth
        info["warmup_s"] = time.perf_counter() - start
        if bench_env.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            step()
            info.update(peak_bytes=torch.cuda.max_memory_allocated(device), peak_kind="cuda_max_allocated_total")
        else:
            info["peak_bytes"], info["peak_kind"] = machine.measure_peak(step, bench_env)
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
        if not machine.is_out_of_memory(exc):
            raise
        oom = str(exc).splitlines()[0][:160]
    if trainer is not None:
        trainer.accelerator.free_memory()  # drops accelerate's references to model and optimizer
    trainer = step = None
    machine.free_device_memory(bench_env)
    if oom is not None:
        pytest.skip(f"OOM ({oom})")
    stats = harness.benchmark_stats(benchmark)
    return stats.median if stats is not None else info["warmup_s"]  # --benchmark-disable


def _fits(settings, backend, response_length, env) -> bool:
    """Whether one step at `response_length` completes without running out of device memory."""
    trainer = None
    fitted = True
    try:
        trainer = _build_trainer(settings, backend, settings["query_length"] + response_length, env.device)
        trainer.step(*_batch(settings, response_length, env.device))
        env.synchronize()
    except RuntimeError as exc:
        if not machine.is_out_of_memory(exc):
            raise
        fitted = False
    if trainer is not None:
        trainer.accelerator.free_memory()
    trainer = None
    machine.free_device_memory(env)
    return fitted


def longest_fitting(fits, start: int, limit: int, granularity: int = 256) -> tuple:
    """(longest length that fits, shortest that did not or None) by doubling from `start`, then bisection."""
    fitted, failed, length = 0, None, start
    while length <= limit:
        if fits(length):
            fitted, length = length, length * 2
        else:
            failed = length
            break
    if failed is None:
        return fitted, None
    while failed - fitted > max(granularity, fitted // 8):
        middle = (fitted + failed) // 2 // granularity * granularity or granularity
        if middle in (fitted, failed):
            break
        if fits(middle):
            fitted = middle
        else:
            failed = middle
    return fitted, failed


def bench_step_longest(benchmark, bench_env, settings, backend):
    if bench_env.mode == "cpu":
        pytest.skip("the out-of-memory search needs CUDA (host memory is not the limit that matters); "
                    "--bench-smoke runs it over tiny lengths")
    reason = _skip_reason(backend, bench_env)
    if reason is not None:
        pytest.skip(reason)
    benchmark.group = "step_longest"
    info = benchmark.extra_info
    tried = {}

    def fits(length):
        tried[length] = _fits(settings, backend, length, bench_env)
        return tried[length]

    granularity = 256 if bench_env.cuda else 4
    result = {}
    benchmark.pedantic(lambda: result.update(zip(("longest", "first_oom"), longest_fitting(
        fits, settings["search_start"], settings["search_limit"], granularity))), rounds=1, iterations=1)
    info.update(op="step_longest", provider=backend, device=str(bench_env.device), mode=bench_env.mode,
                dtype=harness.dtype_name(settings["dtype"]), batch_size=settings["batch_size"],
                mini_batch_size=settings["mini_batch_size"], query_length=settings["query_length"],
                max_response_length=result["longest"], first_oom_length=result["first_oom"],
                search_limit=settings["search_limit"], tried={str(k): v for k, v in sorted(tried.items())},
                timer="search_duration",
                model={k: v for k, v in settings.items() if k in ("hidden", "layers", "heads", "vocab")})
