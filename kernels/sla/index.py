"""SLA block maps: per query block, the critical key blocks (top scores), the negligible ones (bottom), the rest."""

from __future__ import annotations

import math

import torch

from ..block_sparse.index import keep_count, mean_pool_blocks, topk_block_index


def _fraction_or_count(name: str, value: float | int, closed_at_one: bool) -> None:
    """Raises ValueError unless value is an int count ≥ 0 or a float fraction in [0, 1] ([0, 1) when not closed)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"sla_block_index: {name} must be an int count or a float fraction, got {value!r}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"sla_block_index: {name} as a count must be at least 0, got {value}")
    if isinstance(value, float) and not (0.0 <= value <= 1.0 if closed_at_one else 0.0 <= value < 1.0):
        interval = "[0, 1]" if closed_at_one else "[0, 1)"
        raise ValueError(f"sla_block_index: {name} as a fraction must be in {interval}, got {value}")


@torch.no_grad()
def sla_block_index(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int,
    critical: float | int,
    negligible: float | int = 0,
    *,
    key_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(critical, marginal) bool maps [B, H, n_qblocks, n_kblocks] from mean-pooled q·k block scores.

    Query blocks hold `block` tokens, key blocks `key_block` (default: block); counts and fractions are of the
    n_kblocks key blocks.
    Per query block, the `critical` best-scoring key blocks (a count, or a fraction rounded up; 0 keeps none) are
    exactly topk_block_index's map; the `negligible` worst-scoring of the others (a count, or a fraction of all
    key blocks rounded down) are skipped; every other key block is marginal. The two maps never overlap. SLA's
    mean-centring of k and its softmax over the pooled scores shift or rescale a row monotonically, so they change
    no block's rank and are left out.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"sla_block_index: q and k must be [B, H, N, d] of one shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.numel() == 0:
        raise ValueError(f"sla_block_index: q must not be empty, got shape {tuple(q.shape)}")
    key_block = block if key_block is None else key_block
    for name, value in (("block", block), ("key_block", key_block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sla_block_index: {name} must be a positive int, got {value!r}")
    _fraction_or_count("critical", critical, closed_at_one=True)
    _fraction_or_count("negligible", negligible, closed_at_one=False)
    B, H, N, _ = q.shape
    n_qblocks, n_blocks = math.ceil(N / block), math.ceil(N / key_block)
    if critical == 0:
        n_critical = 0
        critical_map = torch.zeros(B, H, n_qblocks, n_blocks, dtype=torch.bool, device=q.device)
    else:
        n_critical = keep_count(critical, n_blocks)
        critical_map = topk_block_index(q, k, block, critical, key_block=key_block)
    n_negligible = negligible if isinstance(negligible, int) else math.floor(negligible * n_blocks)
    n_negligible = min(n_negligible, n_blocks - n_critical)
    if n_negligible == 0:
        return critical_map, ~critical_map
    scores = mean_pool_blocks(q, block) @ mean_pool_blocks(k, key_block).transpose(-1, -2)  # [B, H, nq, nk]
    # Critical blocks score +inf here, so the bottom n_negligible never reach them.
    bottom = scores.masked_fill(critical_map, float("inf")).topk(n_negligible, dim=-1, largest=False).indices
    negligible_map = torch.zeros_like(critical_map).scatter_(-1, bottom, True)
    return critical_map, ~(critical_map | negligible_map)
