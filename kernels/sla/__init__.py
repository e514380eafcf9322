"""Sparse-linear attention (SLA): exact softmax over each query block's critical key blocks, linear attention
over its marginal ones, nothing over the rest. The operator adds the parts as o_sparse + proj_l(o_linear)."""

from __future__ import annotations

import math

import torch

from .._checks import check_qkv, head_dim_over
from .._dispatch import use_triton
from ..block_sparse import BLOCK_SIZES
from ..linear_attention import FEATURE_MAPS
from .index import sla_block_index
from .naive import sla_attention_naive

# The sparse part runs on block_sparse's kernels and the linear part keeps a [d, dv] fp32 state: both stop at 128.
MAX_TRITON_HEAD_DIM = 128

__all__ = ["sla_attention", "sla_block_index"]


def _check_block_map(name: str, q: torch.Tensor, block_map: torch.Tensor, block: int) -> None:
    """Raises ValueError unless block_map is a bool [B, H, n_blocks, n_blocks] map for q's N and this block."""
    if not isinstance(block_map, torch.Tensor) or block_map.dtype != torch.bool:
        got = block_map.dtype if isinstance(block_map, torch.Tensor) else type(block_map).__name__
        raise ValueError(f"sla_attention: {name} must be a bool tensor, got {got}")
    if block_map.device != q.device:
        raise ValueError(f"sla_attention: {name} is on {block_map.device}, q on {q.device}")
    B, H, N, _ = q.shape
    n_blocks = math.ceil(N / block)
    if block_map.shape != (B, H, n_blocks, n_blocks):
        raise ValueError(
            f"sla_attention: {name} must be [B, H, n_qblocks, n_kblocks] = {(B, H, n_blocks, n_blocks)} "
            f"for N={N}, block={block}, got {tuple(block_map.shape)}"
        )


def sla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index_critical: torch.Tensor,
    block_index_marginal: torch.Tensor,
    block: int = 64,
    feature_map: str = "relu",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_sparse, o_linear), each [B, H, N, dv] in q's dtype, from q, k [B, H, N, d] and v [B, H, N, dv].

    o_sparse is softmax(q kᵀ / √d) v over each query block's critical key blocks (zeros where it has none);
    o_linear is φ(q)ᵀ Σ φ(k) vᵀ / (φ(q)ᵀ Σ φ(k) + eps) with both sums over its marginal key blocks only (zeros where
    it has none). The maps are bool [B, H, ceil(N / block), ceil(N / block)], e.g. from sla_block_index; each part
    reads only its own map, so a block in both maps counts in both. The parts come back separately so that the
    caller applies its own (zero-initialised) proj_l: out = o_sparse + proj_l(o_linear). Triton on CUDA (head
    dims up to 128), the PyTorch reference elsewhere; DIT_GRAFT_KERNELS=triton|naive forces one.
    """
    check_qkv("sla_attention", q, k, v)
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"sla_attention: block must be one of {BLOCK_SIZES}, got {block!r}")
    _check_block_map("block_index_critical", q, block_index_critical, block)
    _check_block_map("block_index_marginal", q, block_index_marginal, block)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"sla_attention: feature_map must be one of {', '.join(FEATURE_MAPS)}, got {feature_map!r}")
    if not eps > 0:
        raise ValueError(f"sla_attention: eps must be positive, got {eps}")
    if use_triton("sla_attention", q, k, v, unsupported=head_dim_over(MAX_TRITON_HEAD_DIM, q, v)):
        from .triton import sla_attention_triton

        return sla_attention_triton(q, k, v, block_index_critical, block_index_marginal, block, feature_map, eps)
    return sla_attention_naive(q, k, v, block_index_critical, block_index_marginal, block, feature_map, eps)
