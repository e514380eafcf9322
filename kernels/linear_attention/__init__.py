"""Non-causal linear attention: o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j φ(k_j) + eps)."""

from __future__ import annotations

import torch

from .._dispatch import use_triton
from .naive import linear_attention_naive

FEATURE_MAPS = ("relu", "elu1")
# A [d, dv] fp32 state tile lives in registers: past 128 it spills.
MAX_TRITON_HEAD_DIM = 128

__all__ = ["FEATURE_MAPS", "linear_attention"]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, eps: float) -> None:
    """Raises ValueError naming the first thing wrong with the arguments."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"linear_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"linear_attention: {name} must be 4-D [B, H, N, d], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"linear_attention: {name} must be floating point, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"linear_attention: {name} must not be empty, got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(
            f"linear_attention: q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"linear_attention: v must share B, H, N with q, got {tuple(v.shape)} and {tuple(q.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"linear_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"linear_attention: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"linear_attention: feature_map must be one of {', '.join(FEATURE_MAPS)}, got {feature_map!r}")
    if not eps > 0:
        raise ValueError(f"linear_attention: eps must be positive, got {eps}")


def _triton_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None (checked without importing triton)."""
    if max(q.shape[-1], v.shape[-1]) > MAX_TRITON_HEAD_DIM:
        return f"the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}, got {q.shape[-1]} and {v.shape[-1]}"
    return None


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str = "relu", eps: float = 1e-6
) -> torch.Tensor:
    """Linear attention over q, k [B, H, N, d] and v [B, H, N, dv]; returns [B, H, N, dv] in q's dtype.

    Triton on CUDA (head dims up to 128), the PyTorch reference elsewhere; DIT_GRAFT_KERNELS=triton|naive forces one.
    """
    _check_inputs(q, k, v, feature_map, eps)
    if use_triton("linear_attention", q, k, v, unsupported=_triton_unsupported(q, v)):
        from .triton import linear_attention_triton

        return linear_attention_triton(q, k, v, feature_map, eps)
    return linear_attention_naive(q, k, v, feature_map, eps)
