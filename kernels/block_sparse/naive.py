"""PyTorch reference for block-sparse softmax attention: a dense mask built from the block map (the truth the
other paths are tested against; O(N²) memory)."""

from __future__ import annotations

import torch

from .._blockwise import text_prefix_mask


def dense_block_mask(block_index: torch.Tensor, n: int, block: int, key_block: int | None = None) -> torch.Tensor:
    """Expands a [B, H, n_qblocks, n_kblocks] block map to a [B, H, n, n] token mask (key blocks default to block)."""
    key_block = key_block or block
    mask = block_index.repeat_interleave(block, dim=-2).repeat_interleave(key_block, dim=-1)  # [B, H, nq*b, nk*kb]
    return mask[..., :n, :n]


def block_sparse_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block: int = 64,
    key_block: int | None = None,
    text: int = 0,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over the kept key blocks in fp32 (float64 stays float64); empty rows give zeros.

    With text = T > 0 the blocks cut the tokens after a T-token text prefix whose rows and columns stay dense."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhid,bhjd->bhij", q.to(compute_dtype), k.to(compute_dtype)) * scale  # [B, H, N, N]
    mask = text_prefix_mask(dense_block_mask(block_index, q.shape[2] - text, block, key_block), text)
    empty = ~mask.any(dim=-1, keepdim=True)  # [B, H, N, 1]
    # Fully masked rows get finite scores before the softmax and zero weights after it, so no NaN reaches autograd.
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    weights = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("bhij,bhje->bhie", weights, v.to(compute_dtype)).to(q.dtype)
