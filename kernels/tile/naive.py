"""PyTorch reference for 2D local (tile) attention: a dense window mask over the token grid and masked softmax."""

from __future__ import annotations

import torch


def window_mask(grid: tuple[int, int], window: int, shape: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, N] bool, N = h * w row-major: True where key j lies in query i's window (square or circle, radius window)."""
    h, w = grid
    ys = torch.arange(h, device=device).repeat_interleave(w)  # [N], token n sits at (n // w, n % w)
    xs = torch.arange(w, device=device).repeat(h)  # [N]
    dy = ys[None, :] - ys[:, None]  # [N, N]
    dx = xs[None, :] - xs[:, None]  # [N, N]
    if shape == "square":
        return (dy.abs() <= window) & (dx.abs() <= window)
    if shape == "circle":
        return dy * dy + dx * dx < window * window
    raise ValueError(f"unknown window shape {shape!r}")


def tile_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window: int, shape: str = "square"
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over each query's window in fp32 (float64 stays float64)."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhid,bhjd->bhij", q.to(compute_dtype), k.to(compute_dtype)) * scale  # [B, H, N, N]
    # Every query sees itself (window ≥ 0 square, ≥ 1 circle), so no row is fully masked.
    scores = scores.masked_fill(~window_mask(grid, window, shape, q.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bhje->bhie", weights, v.to(compute_dtype)).to(q.dtype)
