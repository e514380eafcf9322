"""PyTorch reference for window attention on a 1-D, 2-D or 3-D token grid: a dense (N, N) window mask and masked
softmax. The truth the bounded-memory path (blockwise.py) and the Triton tile kernel are tested against."""

from __future__ import annotations

import math

import torch

from .._blockwise import text_prefix_mask


def offsets_inside(
    deltas: list[torch.Tensor], radius: float, shape: str, temporal_radius: int | None = None
) -> torch.Tensor:
    """Whether integer offsets (Δ per grid dim, broadcastable tensors) lie in the window.

    square: max |Δ| ≤ radius; circle: Σ Δ² < radius² (radius² in float64). With temporal_radius (3-D grids only)
    the first dim is time: |Δt| ≤ temporal_radius and the shape applies to the other two dims.
    """
    inside = None
    if temporal_radius is not None:
        inside = deltas[0].abs() <= temporal_radius
        deltas = deltas[1:]
    # Integer offsets: |Δ| ≤ r ⇔ |Δ| ≤ ⌊r⌋ and Σ Δ² < r² ⇔ Σ Δ² < ⌈r²⌉ (r² in float64), exactly, in integers.
    if shape == "square":
        spatial = None
        for d in deltas:
            ok = d.abs() <= math.floor(radius)
            spatial = ok if spatial is None else spatial & ok
    elif shape == "circle":
        total = None
        for d in deltas:
            total = d * d if total is None else total + d * d
        spatial = total < math.ceil(radius * radius)
    else:
        raise ValueError(f"unknown window shape {shape!r}")
    return spatial if inside is None else inside & spatial


def grid_window_mask(
    grid: tuple[int, ...],
    radius: float,
    shape: str,
    temporal_radius: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[N, N] bool, N = prod(grid) row-major: True where key j lies in query i's window."""
    coords = torch.cartesian_prod(*(torch.arange(g, device=device) for g in grid)).reshape(-1, len(grid))  # [N, dims]
    deltas = [coords[None, :, i] - coords[:, None, i] for i in range(len(grid))]  # key − query, [N, N] each
    return offsets_inside(deltas, radius, shape, temporal_radius)


def window_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, ...],
    radius: float,
    shape: str = "square",
    temporal_radius: int | None = None,
    text: int = 0,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over each query's window, in fp32 (float64 stays float64); empty rows give zeros.

    With text = T > 0 the first T tokens are a text prefix whose rows and columns stay dense (CLEAR's rule)."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhid,bhjd->bhij", q.to(compute_dtype), k.to(compute_dtype)) * scale  # [B, H, N, N]
    mask = text_prefix_mask(grid_window_mask(tuple(grid), radius, shape, temporal_radius, q.device), text)
    empty = ~mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    weights = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("bhij,bhje->bhie", weights, v.to(compute_dtype)).to(q.dtype)
