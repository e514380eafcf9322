"""Block-sparse softmax attention: each query block attends exactly to the key blocks its block map keeps."""

from __future__ import annotations

import math

import torch

from .._checks import check_qkv, head_dim_over
from .._dispatch import pytorch_path, use_triton
from .blockwise import block_sparse_attention_blockwise
from .index import topk_block_index
from .naive import block_sparse_attention_naive

BLOCK_SIZES = (16, 32, 64, 128)
# Register tiles of [64, d] per operand: past 128 they spill.
MAX_TRITON_HEAD_DIM = 128

__all__ = ["BLOCK_SIZES", "block_sparse_attention", "topk_block_index"]


def _check_block_index(q: torch.Tensor, block_index: torch.Tensor, block: int, key_block: int, text: int = 0) -> None:
    """Raises ValueError unless block_index is a bool [B, H, n_qblocks, n_kblocks] map for q's N and these blocks."""
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"block_sparse_attention: block must be one of {BLOCK_SIZES}, got {block!r}")
    if isinstance(key_block, bool) or key_block not in BLOCK_SIZES:
        raise ValueError(f"block_sparse_attention: key_block must be one of {BLOCK_SIZES}, got {key_block!r}")
    if not isinstance(block_index, torch.Tensor) or block_index.dtype != torch.bool:
        got = block_index.dtype if isinstance(block_index, torch.Tensor) else type(block_index).__name__
        raise ValueError(f"block_sparse_attention: block_index must be a bool tensor, got {got}")
    if block_index.device != q.device:
        raise ValueError(f"block_sparse_attention: block_index is on {block_index.device}, q on {q.device}")
    if isinstance(text, bool) or not isinstance(text, int) or not 0 <= text < q.shape[2]:
        raise ValueError(f"block_sparse_attention: text must be an int in [0, N={q.shape[2]}), got {text!r}")
    B, H, N, _ = q.shape
    N -= text
    expected = (B, H, math.ceil(N / block), math.ceil(N / key_block))
    if block_index.shape != expected:
        blocks = f"block={block}" if key_block == block else f"block={block}, key_block={key_block}"
        tokens = f"N={N}" if not text else f"N={N} after {text} text tokens"
        raise ValueError(
            f"block_sparse_attention: block_index must be [B, H, n_qblocks, n_kblocks] = {expected} "
            f"for {tokens}, {blocks}, got {tuple(block_index.shape)}"
        )


def triton_gap(q: torch.Tensor, v: torch.Tensor, block: int, key_block: int, text: int = 0) -> str | None:
    """Why the Triton kernel cannot run this call (None when it can)."""
    if text:
        return "the Triton kernel takes no text prefix (a prefix filling whole blocks can be a block map instead)"
    if key_block != block:
        return f"the Triton kernel takes one block size for queries and keys, got block={block}, key_block={key_block}"
    return head_dim_over(MAX_TRITON_HEAD_DIM, q, v)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block: int = 64,
    *,
    key_block: int | None = None,
    text: int = 0,
    fallback: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v restricted to kept blocks; q, k [B, H, N, d], v [B, H, N, dv] → [B, H, N, dv].

    Query blocks hold `block` tokens, key blocks `key_block` (default: block). block_index is bool
    [B, H, ceil(N / block), ceil(N / key_block)]: row i lists the key blocks query block i attends to; a query
    block keeping none outputs zeros. text = T > 0: the blocks cut the N − T tokens after a T-token text prefix
    whose rows and columns stay dense (CLEAR's rule). Triton on CUDA (head dims up to 128, one block size, no
    text), elsewhere the bounded-memory PyTorch path (blockwise.py: gathers each query block's kept key blocks,
    chunked);
    DIT_GRAFT_KERNELS=triton|blockwise|naive forces one (naive: the dense reference).
    fallback=True: a forced Triton backend that cannot take the call runs the PyTorch path instead of raising
    (for operators, which choose their Triton route themselves).
    """
    key_block = block if key_block is None else key_block
    check_qkv("block_sparse_attention", q, k, v)
    _check_block_index(q, block_index, block, key_block, text)
    gap = triton_gap(q, v, block, key_block, text)
    if not (fallback and gap) and use_triton("block_sparse_attention", q, k, v, unsupported=gap):
        from .triton import block_sparse_attention_triton

        return block_sparse_attention_triton(q, k, v, block_index, block)
    if pytorch_path(q) == "naive":
        return block_sparse_attention_naive(q, k, v, block_index, block, key_block, text)
    return block_sparse_attention_blockwise(q, k, v, block_index, block, key_block, text)
