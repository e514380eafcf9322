"""PyTorch reference for sparse-linear attention: dense masks built from the two block maps, the truth (O(N²))."""

from __future__ import annotations

import torch

from ..block_sparse.naive import block_sparse_attention_naive, dense_block_mask
from ..linear_attention.naive import feature_map_fn


def marginal_linear_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index_marginal: torch.Tensor | None,
    block: int = 64,
    feature_map: str = "relu",
    eps: float = 1e-6,
    key_block: int | None = None,
) -> torch.Tensor:
    """o_i = Σ_j m_ij φ(q_i)ᵀφ(k_j) v_j / (Σ_j m_ij φ(q_i)ᵀφ(k_j) + eps) over the marginal blocks, in fp32 or float64.

    A None map means every key (m = 1). Computed in the quadratic form (N x N weights), independent of the other
    paths' per-block states.
    """
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_feat = feature_map_fn(feature_map, q.to(compute_dtype))  # [B, H, N, d]
    k_feat = feature_map_fn(feature_map, k.to(compute_dtype))  # [B, H, N, d]
    weights = torch.einsum("bhid,bhjd->bhij", q_feat, k_feat)  # [B, H, N, N]
    if block_index_marginal is not None:
        weights = weights * dense_block_mask(block_index_marginal, q.shape[2], block, key_block)
    numerator = weights @ v.to(compute_dtype)  # [B, H, N, dv]
    denominator = weights.sum(dim=-1, keepdim=True) + eps  # [B, H, N, 1]
    return (numerator / denominator).to(q.dtype)


def sla_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index_critical: torch.Tensor,
    block_index_marginal: torch.Tensor | None,
    block: int = 64,
    feature_map: str = "relu",
    eps: float = 1e-6,
    key_block: int | None = None,
    text: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_sparse, o_linear): softmax attention over the critical blocks, linear attention over the marginal ones
    (over every key when the marginal map is None).

    With a T-token text prefix (text = T) the blocks cut the tokens after it; the sparse part keeps the text rows
    and columns dense (CLEAR's rule) and the linear part covers grid queries and keys only (zeros on text rows).
    """
    o_sparse = block_sparse_attention_naive(q, k, v, block_index_critical, block, key_block, text)
    t = text
    o_linear = marginal_linear_attention_naive(
        q[:, :, t:], k[:, :, t:], v[:, :, t:], block_index_marginal, block, feature_map, eps, key_block
    )
    if t:
        o_linear = torch.cat([o_linear.new_zeros(*o_linear.shape[:2], t, o_linear.shape[-1]), o_linear], dim=2)
    return o_sparse, o_linear
