"""2D local (tile) attention for CLEAR's `local` operator: each token attends, with exact softmax, to the keys
within a square or circular window around it on the token grid."""

from __future__ import annotations

import torch

from .._checks import check_qkv, head_dim_over
from .._dispatch import pytorch_path, use_triton
from ..window.blockwise import window_attention_blockwise
from .naive import tile_attention_naive

WINDOW_SHAPES = ("square", "circle")
# Register tiles of [64, d] per operand: past 128 they spill.
MAX_TRITON_HEAD_DIM = 128

__all__ = ["WINDOW_SHAPES", "tile_attention"]


def _check_grid(q: torch.Tensor, grid: tuple[int, int], window: int, shape: str) -> None:
    """Raises ValueError unless grid is (h, w) with h * w = N, shape is known and window a radius it accepts."""
    if (
        not isinstance(grid, tuple | list)
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"tile_attention: grid must be (h, w), two positive ints, got {grid!r}")
    if grid[0] * grid[1] != q.shape[2]:
        raise ValueError(f"tile_attention: grid {tuple(grid)} holds {grid[0] * grid[1]} tokens, q has N={q.shape[2]}")
    if shape not in WINDOW_SHAPES:
        raise ValueError(f"tile_attention: shape must be one of {', '.join(WINDOW_SHAPES)}, got {shape!r}")
    smallest = 0 if shape == "square" else 1
    if isinstance(window, bool) or not isinstance(window, int) or window < smallest:
        raise ValueError(f"tile_attention: window must be an int ≥ {smallest} for a {shape}, got {window!r}")


def tile_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window: int, shape: str = "square"
) -> torch.Tensor:
    """Local softmax attention on an h x w token grid; q, k [B, H, N, d], v [B, H, N, dv] → [B, H, N, dv].

    Tokens are row-major over grid = (h, w), N = h * w: token n sits at (n // w, n % w). Query (y, x) attends to
    key (y', x') when |y' - y| ≤ window and |x' - x| ≤ window ("square", (2 window + 1)² keys inside the grid) or
    when (y' - y)² + (x' - x)² < window² ("circle", CLEAR's window; window ≥ 1 so a token sees itself). Scale
    1/√d. Triton on CUDA (head dims up to 128), elsewhere the bounded-memory PyTorch path (window attention's
    blockwise.py: 8 x 8 query tiles, each with the key box its windows reach); DIT_GRAFT_KERNELS=triton|blockwise|
    naive forces one (naive: the dense reference). `window_attention` takes float radii, 1-D and 3-D grids too.
    """
    check_qkv("tile_attention", q, k, v)
    _check_grid(q, grid, window, shape)
    if use_triton("tile_attention", q, k, v, unsupported=head_dim_over(MAX_TRITON_HEAD_DIM, q, v)):
        from .triton import tile_attention_triton

        return tile_attention_triton(q, k, v, tuple(grid), window, shape)
    if pytorch_path(q) == "naive":
        return tile_attention_naive(q, k, v, tuple(grid), window, shape)
    return window_attention_blockwise(q, k, v, tuple(grid), window, shape)
