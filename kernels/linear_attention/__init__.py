"""Non-causal linear attention: o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j φ(k_j) + eps)."""

from __future__ import annotations

import torch

from .._checks import check_qkv, head_dim_over
from .._dispatch import use_triton
from .naive import linear_attention_naive

FEATURE_MAPS = ("relu", "elu1")
# A [d, dv] fp32 state tile lives in registers: past 128 it spills.
MAX_TRITON_HEAD_DIM = 128

__all__ = ["FEATURE_MAPS", "linear_attention"]


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str = "relu", eps: float = 1e-6
) -> torch.Tensor:
    """Linear attention over q, k [B, H, N, d] and v [B, H, N, dv]; returns [B, H, N, dv] in q's dtype.

    Triton on CUDA (head dims up to 128), the PyTorch reference elsewhere; DIT_GRAFT_KERNELS=triton|naive forces one.
    """
    check_qkv("linear_attention", q, k, v)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"linear_attention: feature_map must be one of {', '.join(FEATURE_MAPS)}, got {feature_map!r}")
    if not eps > 0:
        raise ValueError(f"linear_attention: eps must be positive, got {eps}")
    if use_triton("linear_attention", q, k, v, unsupported=head_dim_over(MAX_TRITON_HEAD_DIM, q, v)):
        from .triton import linear_attention_triton

        return linear_attention_triton(q, k, v, feature_map, eps)
    return linear_attention_naive(q, k, v, feature_map, eps)
