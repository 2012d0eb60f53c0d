"""Launch heuristics shared by the kernels: interpreter detection, block sizes, row layouts.

Kernels never pick block sizes or warps themselves: they take them from here, so a tuning
change (or a test forcing several vocabulary blocks) happens in one place.

- Under the Triton interpreter (`TRITON_INTERPRET=1`, CPU tensors) every block costs a
  round of numpy calls, so blocks are as large as the row allows.
- On a GPU the vocabulary kernels stream 2048-column blocks over 4 warps (16 elements per
  thread: two 16-byte loads for bf16), the token kernels 2048-element tiles at 8 per thread.
  Measured by bench/tools/sweep.py on an H200 (bench/results/gpu/sweep-h200.json, bench/RESULTS.md): at
  N=16384, V=151936 bf16 the logprobs forward took 1.21 ms (98 % of a device copy's rate)
  against 1.49 ms with the earlier 4096 × 16-warp guess, forward + backward 3.73 against
  3.97 ms, full_kl (V=128256) 1.33 against 1.71 ms; 8192-column blocks were slowest of all.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Tuple

import torch

try:
    import triton
except Exception:  # the linear_logprobs chunk heuristic at the end serves the reference too, which runs without triton
    triton = None

# Largest vocabulary block of one loop iteration. Tests shrink these to force many blocks.
GPU_MAX_VOCAB_BLOCK = 2048
INTERPRETER_MAX_VOCAB_BLOCK = 65536
# Elements each thread holds per iteration on a GPU; num_warps follows from the block (or tile).
GPU_VOCAB_ELEMENTS_PER_THREAD = 16
GPU_TOKEN_ELEMENTS_PER_THREAD = 8
GPU_MAX_WARPS = 16


def is_interpreted(device: torch.device) -> bool:
    """Whether kernels on `device` run under the Triton interpreter (CPU tensors, or TRITON_INTERPRET=1)."""
    return torch.device(device).type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def vocab_block(n_cols: int, device: torch.device) -> Tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that loops over rows of `n_cols` in blocks of BLOCK columns."""
    if is_interpreted(device):
        return min(triton.next_power_of_2(n_cols), INTERPRETER_MAX_VOCAB_BLOCK), 1
    block = min(triton.next_power_of_2(n_cols), GPU_MAX_VOCAB_BLOCK)
    num_warps = max(1, min(GPU_MAX_WARPS, block // (32 * GPU_VOCAB_ELEMENTS_PER_THREAD)))
    return block, num_warps


# --------------------------------------------------------------------------- row layouts
#
# A `[..., V]` tensor is a set of rows. Row kernels address row r (C order over the leading
# dims) as  base + (r // n_inner)·stride_outer + (r % n_inner)·stride_inner, which covers
# contiguous tensors and the common views (`logits[:, :-1]`, `logits[:, -T:]`, a transposed
# batch) without copying. Views that need more than two strided levels are cut along
# their first dimension into pieces that do not (a loop of launches, still no copy).

RowLayout = Tuple[int, int, int, int]  # (n_inner, stride_outer, stride_inner, stride_col)


def row_layout(x: torch.Tensor) -> Optional[RowLayout]:
    """`x`'s leading dims as at most two strided levels, or None when that is impossible."""
    merged = []  # [size, stride] from outer to inner, adjacent dims merged where they nest
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    stride_col = x.stride(-1)
    if not merged:
        return 1, 0, 0, stride_col
    if len(merged) == 1:
        return merged[0][0], 0, merged[0][1], stride_col
    if len(merged) == 2:
        return merged[1][0], merged[0][1], merged[1][1], stride_col
    return None


def row_pieces(*tensors: torch.Tensor, prefix: tuple = ()) -> Iterator[Tuple[tuple, Sequence[RowLayout]]]:
    """Yield (index, layouts): `t[index]` of every tensor has a two-level row layout `layouts[i]`.

    The tensors share their leading shape. Usually a single piece, index `()`.
    """
    views = [t[prefix] for t in tensors]
    layouts = [row_layout(v) for v in views]
    if all(layout is not None for layout in layouts):
        yield prefix, layouts
        return
    for i in range(views[0].shape[0]):
        yield from row_pieces(*tensors, prefix=prefix + (i,))


def aligned_block(block: int, n_cols: int, x: torch.Tensor, x_layout: RowLayout,
                  other: Optional[torch.Tensor] = None, other_layout: Optional[RowLayout] = None) -> dict:
    """Launch constants of a vocabulary kernel streaming rows of `x` (and of `other`, read or
    written at the same columns) in blocks that start on 16-byte boundaries.

    ALIGN: elements per 16 bytes when x's columns are contiguous, else 1. RAGGED: rows may
    start off those boundaries or end mid-way through 16 bytes (V or a row stride not a
    multiple of 16 elements, what triton specialises on), so the kernel masks only a row's
    first and last block and loads the blocks between unmasked, 128 bits wide; otherwise one
    masked loop already vectorises. OTHER_ALIGNED: `other` has x's row layout and dtype, so
    its rows share x's 16-byte phase. BLOCK: at least one 16-byte group, so the lanes before a
    row (fewer than ALIGN) all fall in its first block.
    """
    align = 16 // x.element_size() if x_layout[3] == 1 else 1
    ragged = align > 1 and any(n % 16 for n in (n_cols, x_layout[1], x_layout[2]))
    other_aligned = (other is not None and align > 1 and other_layout == x_layout
                     and other.element_size() == x.element_size())
    return dict(BLOCK=max(block, align), ALIGN=align, RAGGED=ragged, OTHER_ALIGNED=other_aligned)


def check_column_offsets(x: torch.Tensor, name: str) -> None:
    """Kernels index columns with int32 offsets (row offsets are int64): refuse a layout that overflows them."""
    if (x.shape[-1] - 1) * abs(x.stride(-1)) >= 2**31:
        raise ValueError(f"{name}: a row spans ≥ 2**31 elements (last-dim stride {x.stride(-1)}); "
                         "make the last dim contiguous")


# --------------------------------------------------------------------------- [B, T] token tiles
# (appended for kl_reward.py, gae.py, ppo_loss.py)
#
# The per-token kernels work on tiles of BLOCK_B rows × BLOCK_T positions. Row-sequential
# kernels (kl rewards, GAE) give each program whole rows and loop over T from the end;
# elementwise + reduction kernels (whitening, ppo_loss) spread the tiles over at most
# MAX_TOKEN_PARTIALS programs, each writing one row of partial sums. These ops are
# launch-bound: a tile of ~2048 elements per program step keeps enough loads in flight.

GPU_TOKEN_TILE = 2048
INTERPRETER_TOKEN_TILE = 16384
MAX_TOKEN_BLOCK_T = 2048  # positions per loop step (GAE: per associative scan). Tests shrink it.
MAX_TOKEN_PARTIALS = 512  # programs of a partial-sum kernel = rows of its partials buffer


def token_tiles(n_rows: int, n_cols: int, device: torch.device, scan: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_B, BLOCK_T, num_warps) for a `[n_rows, n_cols]` token kernel.

    `scan=True` (GAE) under the interpreter keeps one row per program: its scan runs element
    by element in Python, so padding rows would cost as much as real ones.
    """
    interpreted = is_interpreted(device)
    tile = INTERPRETER_TOKEN_TILE if interpreted else GPU_TOKEN_TILE
    block_t = min(triton.next_power_of_2(max(n_cols, 1)), MAX_TOKEN_BLOCK_T, tile)
    block_b = min(triton.next_power_of_2(max(n_rows, 1)), max(1, tile // block_t))
    if interpreted:
        return (1 if scan else block_b), block_t, 1
    num_warps = max(1, min(GPU_MAX_WARPS, block_b * block_t // (32 * GPU_TOKEN_ELEMENTS_PER_THREAD)))
    return block_b, block_t, num_warps


def device_guard(tensor: torch.Tensor):
    """A context that makes `tensor`'s CUDA device current for a launch (a no-op on CPU)."""
    import contextlib

    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------- linear_logprobs tiles
# (pure Python: fastppo.reference uses the same chunks and tiles, without triton)
#
# linear_logprobs holds one tile of logits at a time, of about [chunk, V] elements. The forward
# walks token chunks (a row's log-sum-exp needs all of V). On a GPU the chunk is as many tokens
# as fit ~2**27 logits (256 MB in bf16: at V = 128256, 1024 tokens, enough M for cuBLAS to run
# near peak); fewer than 128 tokens would starve the tensor cores even at huge V, and beyond
# 8192 the matmul gains nothing more, so small vocabularies get smaller buffers. On CPU (and
# under the interpreter) ~2**22 logits keep the reference's float32 temporaries in tens of MB.
#
# The backward needs only the saved per-row statistics, so it can walk either axis. Whichever
# axis it splits, the gradient of the other operand is summed over the tiles in float32:
# token chunks sum grad_weight [V, H], vocabulary tiles sum grad_hidden [N, H]. It splits the
# vocabulary when N ≤ V (RLHF: 32k response tokens against a 128k vocabulary), so the float32
# accumulator is the smaller [N, H] and every grad_weight row is one matmul, rounded once.
# Untuned on hardware: sweep chunk and tile sizes in bench/.

LINEAR_CHUNK_LOGITS_GPU = 2**27
LINEAR_CHUNK_LOGITS_CPU = 2**22
LINEAR_CHUNK_MIN_TOKENS = 128
LINEAR_CHUNK_MAX_TOKENS = 8192
LINEAR_CHUNK_MULTIPLE = 64  # whole tensor-core tiles along M
LINEAR_VOCAB_TILE_MULTIPLE = 128  # whole tensor-core tiles along N of the recompute matmul
LINEAR_BACKWARD_SPLIT = None  # None: by N ≤ V; "tokens" or "vocab" forces one (tests, tuning sweeps)


def linear_logprobs_chunk_size(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Tokens per chunk for linear_logprobs over `n_tokens` rows and a `vocab`-sized head on `device`."""
    budget = LINEAR_CHUNK_LOGITS_GPU if torch.device(device).type == "cuda" else LINEAR_CHUNK_LOGITS_CPU
    chunk = min(max(budget // max(vocab, 1), LINEAR_CHUNK_MIN_TOKENS), LINEAR_CHUNK_MAX_TOKENS)
    chunk -= chunk % LINEAR_CHUNK_MULTIPLE
    return max(1, min(chunk, n_tokens))


def linear_logprobs_backward_tiles(n_tokens: int, vocab: int, chunk_size: int) -> Tuple[str, list]:
    """How the backward walks the [N, V] logits: (split, [(rows, cols), ...] slices), N ≥ 1.

    split "tokens": `chunk_size` rows × all V per tile, grad_weight summed over tiles.
    split "vocab": all N rows × ⌊chunk_size·V / N⌋ columns (whole tensor-core tiles when
    that is ≥ 128) per tile, grad_hidden summed over tiles. Either way a tile holds at most
    about chunk_size × V logits, as the forward's chunk does; one tile covers everything
    (nothing to sum) when N ≤ chunk_size.
    """
    everything = slice(0, vocab)
    split = LINEAR_BACKWARD_SPLIT or ("tokens" if n_tokens > vocab else "vocab")
    if n_tokens <= chunk_size or split == "tokens":
        return "tokens", [(slice(start, min(start + chunk_size, n_tokens)), everything)
                          for start in range(0, n_tokens, chunk_size)]
    width = max(1, chunk_size * vocab // n_tokens)
    if width >= LINEAR_VOCAB_TILE_MULTIPLE:
        width -= width % LINEAR_VOCAB_TILE_MULTIPLE
    rows = slice(0, n_tokens)
    return "vocab", [(rows, slice(start, min(start + width, vocab))) for start in range(0, vocab, width)]
