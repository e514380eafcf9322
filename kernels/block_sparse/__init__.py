"""Block-sparse softmax attention: each query block attends exactly to the key blocks its block map keeps."""

from __future__ import annotations

import math

import torch

from .._checks import check_qkv, head_dim_over
from .._dispatch import use_triton
from .index import topk_block_index
from .naive import block_sparse_attention_naive

BLOCK_SIZES = (16, 32, 64, 128)
# Register tiles of [64, d] per operand: past 128 they spill.
MAX_TRITON_HEAD_DIM = 128

__all__ = ["BLOCK_SIZES", "block_sparse_attention", "topk_block_index"]


def _check_block_index(q: torch.Tensor, block_index: torch.Tensor, block: int) -> None:
    """Raises ValueError unless block_index is a bool [B, H, n_blocks, n_blocks] map for q's N and this block."""
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"block_sparse_attention: block must be one of {BLOCK_SIZES}, got {block!r}")
    if not isinstance(block_index, torch.Tensor) or block_index.dtype != torch.bool:
        got = block_index.dtype if isinstance(block_index, torch.Tensor) else type(block_index).__name__
        raise ValueError(f"block_sparse_attention: block_index must be a bool tensor, got {got}")
    if block_index.device != q.device:
        raise ValueError(f"block_sparse_attention: block_index is on {block_index.device}, q on {q.device}")
    B, H, N, _ = q.shape
    n_blocks = math.ceil(N / block)
    if block_index.shape != (B, H, n_blocks, n_blocks):
        raise ValueError(
            f"block_sparse_attention: block_index must be [B, H, n_qblocks, n_kblocks] = {(B, H, n_blocks, n_blocks)} "
            f"for N={N}, block={block}, got {tuple(block_index.shape)}"
        )


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block: int = 64
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v restricted to kept blocks; q, k [B, H, N, d], v [B, H, N, dv] → [B, H, N, dv].

    block_index is bool [B, H, ceil(N / block), ceil(N / block)]: row i lists the key blocks query block i attends
    to; a query block keeping none outputs zeros. Triton on CUDA (head dims up to 128), the PyTorch reference
    elsewhere; DIT_GRAFT_KERNELS=triton|naive forces one.
    """
    check_qkv("block_sparse_attention", q, k, v)
    _check_block_index(q, block_index, block)
    if use_triton("block_sparse_attention", q, k, v, unsupported=head_dim_over(MAX_TRITON_HEAD_DIM, q, v)):
        from .triton import block_sparse_attention_triton

        return block_sparse_attention_triton(q, k, v, block_index, block)
    return block_sparse_attention_naive(q, k, v, block_index, block)
