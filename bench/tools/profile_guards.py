"""What the non-finite guard costs: PPOTrainer.step with nonfinite_guard on and off, and on CUDA the host
syncs per step (torch.cuda.set_sync_debug_mode counts each device→host wait as a warning).

    python bench/tools/profile_guards.py [--length 2048] [--rounds 5] [--backend triton]  # GPU: bench_step's Llama
    python bench/tools/profile_guards.py --length 128                                    # CPU: the tiny Llama

Prints one table: median step time of each setting (Adam fused, the trainer's default, whose steps are
skipped on the device; or foreach, skipped from the host; guard on and off; rounds alternate between all
four, so drift hits each), host syncs per step, and optimizer steps per step.
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "suites"))  # the suites' modules
from bench_step import SETTINGS, _tokenizer, llama_policy  # noqa: E402


def _trainer(settings, guard: bool, backend: str, max_length: int, device, optimizer: str):
    from fastppo import PPOConfig, PPOTrainer

    config = PPOConfig(batch_size=settings["batch_size"], mini_batch_size=settings["mini_batch_size"], ppo_epochs=1,
                       seed=0, backend=backend, nonfinite_guard=guard)
    model = llama_policy(settings, max_length, device)
    adam = None  # the trainer's default: fused Adam
    if optimizer == "foreach":  # torch's default Adam on CUDA: no device-side skip, so the guard reads on the host
        adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                foreach=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no dataset; bf16 without mixed precision (the benchmark's setting)
        return PPOTrainer(config, model, None, _tokenizer(), optimizer=adam)


def _batch(settings, length: int, device):
    generator = torch.Generator().manual_seed(0)
    rows, vocab = settings["batch_size"], settings["vocab"]
    queries = [torch.randint(3, vocab, (settings["query_length"],), generator=generator).to(device)
               for _ in range(rows)]
    responses = [torch.randint(3, vocab, (length,), generator=generator).to(device) for _ in range(rows)]
    return queries, responses, [torch.tensor(1.0)] * rows


def _timed_step(trainer, batch, cuda: bool) -> tuple:
    """(seconds, host syncs, optimizer steps) of one step."""
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        start = time.perf_counter()
        stats = trainer.step(*batch)
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return seconds, syncs, stats["fastppo/optimizer_steps"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--optimizers", default="fused,foreach", help="Adam variants to compare, comma-separated")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    settings = SETTINGS["gpu" if cuda else "cpu"]
    batch = _batch(settings, args.length, device)
    max_length = settings["query_length"] + args.length
    trainers = {(optimizer, guard): _trainer(settings, guard, args.backend if cuda else "torch", max_length, device,
                                             optimizer)
                for optimizer in args.optimizers.split(",") for guard in (True, False)}
    results = {guard: [] for guard in trainers}
    for guard, trainer in trainers.items():
        _timed_step(trainer, batch, cuda)  # warm-up
    for _ in range(args.rounds):
        for guard, trainer in trainers.items():
            results[guard].append(_timed_step(trainer, batch, cuda))
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
          f"B{settings['batch_size']} Q{settings['query_length']} R{args.length}, mini-batch "
          f"{settings['mini_batch_size']}, 1 epoch, backend {args.backend if cuda else 'torch'}")
    print("| Adam | nonfinite_guard | median step ms | host syncs / step | optimizer steps / step |")
    print("|---|---|---|---|---|")
    for (optimizer, guard), rows in results.items():
        print(f"| {optimizer} | {guard} | {statistics.median(r[0] for r in rows) * 1e3:.1f} | "
              f"{statistics.median(r[1] for r in rows):.0f} | {rows[0][2]:.0f} |")


if __name__ == "__main__":
    main()
