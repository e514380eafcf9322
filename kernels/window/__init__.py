"""Window attention on a 1-D, 2-D or 3-D token grid: each query attends, with exact softmax, to the keys inside a
square (box) or circular (ball) window around it; on a video grid optionally with its own temporal radius.

Covers `swa` (a band on the 1-D token sequence), `local` (CLEAR's window on an image grid) and `local` on a video
grid (frames, h, w). The 2-D integer windows run on tile_attention's Triton kernel on CUDA; everything else, and
every call off CUDA, runs the bounded-memory PyTorch path (blockwise.py).
"""

from __future__ import annotations

import math

import torch

from .._checks import check_qkv, head_dim_over
from .._dispatch import pytorch_path, use_triton
from .blockwise import window_attention_blockwise
from .naive import grid_window_mask, window_attention_naive

WINDOW_SHAPES = ("square", "circle")

__all__ = ["WINDOW_SHAPES", "grid_window_mask", "window_attention"]


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_text(op: str, q: torch.Tensor, text) -> None:
    """Raises ValueError unless text is an int in [0, N)."""
    if isinstance(text, bool) or not isinstance(text, int) or not 0 <= text < q.shape[2]:
        raise ValueError(f"{op}: text must be an int in [0, N={q.shape[2]}), got {text!r}")


def _check(q: torch.Tensor, grid, radius, shape: str, temporal_radius, text: int) -> None:
    """Raises ValueError unless grid holds q's N − text tokens in 1-3 dims and the window is one this takes."""
    check_text("window_attention", q, text)
    if not isinstance(grid, tuple | list) or not 1 <= len(grid) <= 3 or not all(_positive_int(g) for g in grid):
        raise ValueError(f"window_attention: grid must be 1 to 3 positive ints, got {grid!r}")
    if math.prod(grid) != q.shape[2] - text:
        after = f" after {text} text tokens" if text else ""
        raise ValueError(
            f"window_attention: grid {tuple(grid)} holds {math.prod(grid)} tokens, q has N={q.shape[2]}{after}"
        )
    if shape not in WINDOW_SHAPES:
        raise ValueError(f"window_attention: shape must be one of {', '.join(WINDOW_SHAPES)}, got {shape!r}")
    if isinstance(radius, bool) or not isinstance(radius, int | float) or not math.isfinite(radius):
        raise ValueError(f"window_attention: radius must be a finite number, got {radius!r}")
    if radius < 0 or (shape == "circle" and radius <= 0):
        bound = "≥ 0 for a square" if shape == "square" else "> 0 for a circle"
        raise ValueError(f"window_attention: radius must be {bound}, got {radius!r}")
    if temporal_radius is not None:
        if len(grid) != 3:
            raise ValueError(f"window_attention: temporal_radius needs a 3-D grid (frames, h, w), got {tuple(grid)}")
        if isinstance(temporal_radius, bool) or not isinstance(temporal_radius, int) or temporal_radius < 0:
            raise ValueError(f"window_attention: temporal_radius must be an int ≥ 0, got {temporal_radius!r}")


def _triton_window(grid, radius, shape: str, temporal_radius) -> int | None:
    """tile_attention's int window giving exactly this window, or None when the Triton kernel cannot take it."""
    if len(grid) != 2 or temporal_radius is not None:
        return None
    if shape == "square":
        return math.floor(radius)
    return int(radius) if float(radius).is_integer() else None


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, ...],
    radius: float,
    shape: str = "square",
    *,
    temporal_radius: int | None = None,
    text: int = 0,
    fallback: bool = False,
) -> torch.Tensor:
    """Window softmax attention on a row-major token grid; q, k [B, H, N, d], v [B, H, N, dv] → [B, H, N, dv].

    grid is (N,), (h, w) or (frames, h, w) with prod(grid) = N. With Δ = key position − query position per dim:
    "square" keeps max |Δ| ≤ radius, "circle" keeps Σ Δ² < radius² (radius² in float64). temporal_radius (3-D
    grids only) makes time separate: |Δt| ≤ temporal_radius and the shape over (Δy, Δx). Scale 1/√d. Borders are
    not padded. text = T > 0: the first T tokens are a text prefix, the grid holds the N − T after it, and CLEAR's
    rule holds (text rows and columns dense). Triton (tile_attention's kernel) on CUDA for 2-D grids with a window
    it takes exactly and no text; otherwise
    the bounded-memory PyTorch path; DIT_GRAFT_KERNELS=triton|blockwise|naive forces one (naive: dense reference).
    fallback=True: a forced Triton backend that cannot take the call runs the PyTorch path instead of raising
    (for operators, which choose their Triton route themselves).
    """
    check_qkv("window_attention", q, k, v)
    _check(q, grid, radius, shape, temporal_radius, text)
    grid = tuple(grid)
    window = _triton_window(grid, radius, shape, temporal_radius)
    if window is None:
        gap = "the Triton kernel takes 2-D grids with an integer window only"
    elif text:
        gap = "the Triton kernel takes no text prefix"
    else:
        gap = head_dim_over(128, q, v)
    if not (fallback and gap) and use_triton("window_attention", q, k, v, unsupported=gap):
        from ..tile.triton import tile_attention_triton

        return tile_attention_triton(q, k, v, grid, window, shape)
    if pytorch_path(q) == "naive":
        return window_attention_naive(q, k, v, grid, radius, shape, temporal_radius, text)
    return window_attention_blockwise(q, k, v, grid, radius, shape, temporal_radius, text)
