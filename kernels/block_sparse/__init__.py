"""Block-sparse softmax attention: each query block attends exactly to the key blocks its block map keeps."""

from __future__ import annotations

import math

import torch

from .._dispatch import use_triton
from .index import topk_block_index
from .naive import block_sparse_attention_naive

BLOCK_SIZES = (16, 32, 64, 128)
# Register tiles of [64, d] per operand: past 128 they spill.
MAX_TRITON_HEAD_DIM = 128

__all__ = ["BLOCK_SIZES", "block_sparse_attention", "topk_block_index"]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block: int) -> None:
    """Raises ValueError naming the first thing wrong with the arguments."""
    for name, t in (("q", q), ("k", k), ("v", v), ("block_index", block_index)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"block_sparse_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"block_sparse_attention: {name} must be 4-D, got shape {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise ValueError(f"block_sparse_attention: {name} must be floating point, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"block_sparse_attention: {name} must not be empty, got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(
            f"block_sparse_attention: q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"block_sparse_attention: v must share B, H, N with q, got {tuple(v.shape)} and {tuple(q.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"block_sparse_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device == block_index.device:
        raise ValueError(
            "block_sparse_attention: q, k, v, block_index devices differ: "
            f"{q.device}, {k.device}, {v.device}, {block_index.device}"
        )
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"block_sparse_attention: block must be one of {BLOCK_SIZES}, got {block!r}")
    if block_index.dtype != torch.bool:
        raise ValueError(f"block_sparse_attention: block_index must be a bool tensor, got {block_index.dtype}")
    B, H, N, _ = q.shape
    n_blocks = math.ceil(N / block)
    if block_index.shape != (B, H, n_blocks, n_blocks):
        raise ValueError(
            f"block_sparse_attention: block_index must be [B, H, n_qblocks, n_kblocks] = {(B, H, n_blocks, n_blocks)} "
            f"for N={N}, block={block}, got {tuple(block_index.shape)}"
        )


def _triton_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None (checked without importing triton)."""
    if max(q.shape[-1], v.shape[-1]) > MAX_TRITON_HEAD_DIM:
        return f"the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}, got {q.shape[-1]} and {v.shape[-1]}"
    return None


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block: int = 64
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v restricted to kept blocks; q, k [B, H, N, d], v [B, H, N, dv] → [B, H, N, dv].

    block_index is bool [B, H, ceil(N / block), ceil(N / block)]: row i lists the key blocks query block i attends
    to; a query block keeping none outputs zeros. Triton on CUDA (head dims up to 128), the PyTorch reference
    elsewhere; DIT_GRAFT_KERNELS=triton|naive forces one.
    """
    _check_inputs(q, k, v, block_index, block)
    if use_triton("block_sparse_attention", q, k, v, unsupported=_triton_unsupported(q, v)):
        from .triton import block_sparse_attention_triton

        return block_sparse_attention_triton(q, k, v, block_index, block)
    return block_sparse_attention_naive(q, k, v, block_index, block)
