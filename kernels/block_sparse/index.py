"""Block maps: choosing key blocks per query block, and the compact per-row lists the kernels walk."""

from __future__ import annotations

import math

import torch


def mean_pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Means of x [B, H, N, d] over consecutive blocks of tokens (the last may be short), in fp32 or float64."""
    B, H, N, D = x.shape
    n_blocks = math.ceil(N / block)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    padded = x.new_zeros(B, H, n_blocks * block, D, dtype=dtype)
    padded[:, :, :N] = x
    sizes = torch.full((n_blocks,), block, device=x.device, dtype=dtype)
    sizes[-1] = N - (n_blocks - 1) * block
    return padded.view(B, H, n_blocks, block, D).sum(dim=3) / sizes[:, None]  # [B, H, n_blocks, d]


def keep_count(keep: float | int, n_blocks: int) -> int:
    """Key blocks kept per query block: a count (capped at n_blocks) or a fraction of n_blocks, at least one."""
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise ValueError(f"topk_block_index: keep must be an int count or a float fraction, got {keep!r}")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"topk_block_index: keep as a count must be at least 1, got {keep}")
        return min(keep, n_blocks)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"topk_block_index: keep as a fraction must be in (0, 1], got {keep}")
    return max(1, math.ceil(keep * n_blocks))


@torch.no_grad()
def topk_block_index(
    q: torch.Tensor, k: torch.Tensor, block: int, keep: float | int, *, key_block: int | None = None
) -> torch.Tensor:
    """Bool map [B, H, n_qblocks, n_kblocks]: per query block, the key blocks whose mean k best match its mean q.

    Query blocks hold `block` tokens, key blocks `key_block` (default: block); `keep` counts key blocks.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"topk_block_index: q and k must be [B, H, N, d] of one shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    key_block = block if key_block is None else key_block
    if block < 1 or key_block < 1:
        raise ValueError(f"topk_block_index: block and key_block must be positive, got {block} and {key_block}")
    q_pooled = mean_pool_blocks(q, block)  # [B, H, nq, d]
    k_pooled = mean_pool_blocks(k, key_block)  # [B, H, nk, d]
    scores = q_pooled @ k_pooled.transpose(-1, -2)  # [B, H, nq, nk]
    top = scores.topk(keep_count(keep, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def kept_block_lists(block_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a [B, H, R, C] bool map: the kept column indices in ascending order, then padding; and their count.

    Returns int32 indices [B*H, R, C] and counts [B*H, R], contiguous.
    """
    counts = block_map.sum(dim=-1, dtype=torch.int32)  # [B, H, R]
    # A stable descending sort of 1/0 puts kept columns first, in their original order.
    order = torch.sort(block_map.to(torch.uint8), dim=-1, descending=True, stable=True).indices  # [B, H, R, C]
    return order.to(torch.int32).flatten(0, 1).contiguous(), counts.flatten(0, 1).contiguous()
