"""Input checks shared by the kernels' public functions."""

from __future__ import annotations

import torch


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raises ValueError unless q, k are [B, H, N, d] and v [B, H, N, dv]: non-empty, floating, one dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, H, N, d], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"{op}: q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must share B, H, N with q, got {tuple(v.shape)} and {tuple(q.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{op}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"{op}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def head_dim_over(limit: int, q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why a Triton kernel taking head dims up to `limit` cannot take q, v; None when it can."""
    if max(q.shape[-1], v.shape[-1]) > limit:
        return f"the Triton kernel takes head dims up to {limit}, got {q.shape[-1]} and {v.shape[-1]}"
    return None
