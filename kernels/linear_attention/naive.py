"""PyTorch reference for non-causal linear attention: the truth the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_map_fn(name: str, x: torch.Tensor) -> torch.Tensor:
    """Applies the named non-negative feature map φ: relu and elu1 (ELU + 1) elementwise, softmax over the head dim
    (SLA's default; the linear_attention kernel itself takes relu and elu1)."""
    if name == "relu":
        return F.relu(x)
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    raise ValueError(f"unknown feature_map {name!r}")


def linear_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str = "relu", eps: float = 1e-6
) -> torch.Tensor:
    """o_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + eps), accumulated in fp32 (float64 stays float64)."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_feat = feature_map_fn(feature_map, q.to(compute_dtype))  # [B, H, N, d]
    k_feat = feature_map_fn(feature_map, k.to(compute_dtype))  # [B, H, N, d]
    state = torch.einsum("bhnd,bhne->bhde", k_feat, v.to(compute_dtype))  # [B, H, d, dv]
    k_sum = k_feat.sum(dim=2)  # [B, H, d]
    numerator = torch.einsum("bhnd,bhde->bhne", q_feat, state)  # [B, H, N, dv]
    denominator = torch.einsum("bhnd,bhd->bhn", q_feat, k_sum) + eps  # [B, H, N]
    return (numerator / denominator.unsqueeze(-1)).to(q.dtype)
