"""`local`: CLEAR's conv-like local attention (Liu et al. 2024).

Each query attends, with exact softmax, only to the keys near it on the token grid (2-D; 3-D on video):

    o_i = Σ_{j ∈ W(i)} softmax_j(q_i·k_j / √d) v_j

Token n sits at p_n = (n // w, n % w) on the h×w grid (row-major, as diffusers' PatchEmbed flattens
it). With (Δy, Δx) = p_i − p_j and the radius r = `window` (a float, in tokens):

    shape: circle   j ∈ W(i)  ⇔  Δy² + Δx² < r²          (CLEAR's circular window, strict)
    shape: square   j ∈ W(i)  ⇔  max(|Δy|, |Δx|) ≤ r     (a (2⌊r⌋+1)² box)

Borders are not padded: a query near an edge has fewer keys. A token always sees itself (r > 0), so
no row is empty. r² is taken in float64, so e.g. r = √2 (r² = 2.0000000000000004) includes the
diagonal neighbours. A window that covers the whole grid passes no mask: it is softmax attention.

On a video grid (frames, h, w) (Wan) token n sits at (t, y, x), frame-major. `temporal_window` = R_t (an
int) makes time separate: j ∈ W(i) ⇔ |Δt| ≤ R_t and the shape above over (Δy, Δx); left None, the shape
spans all three dims (Δt² + Δy² + Δx² < r², or max(|Δt|, |Δy|, |Δx|) ≤ r). `temporal_window` is unused on
image grids.

With a text prefix (FLUX's joint attention) image query i sees every text key and the image keys in its
window; text queries see every key (CLEAR's rule, `TokenLayout.pair_mask`).

Three paths compute the same thing. Without text on a 2-D grid, when `dit_graft.kernels.tile_attention` would
run its Triton kernel (fp16/bf16/fp32 CUDA inputs with head dims up to 128, or DIT_GRAFT_KERNELS=triton;
never with DIT_GRAFT_KERNELS=naive), the core calls it: it visits only the key tiles near each query tile.
Otherwise `dit_graft.kernels.window_attention` runs its bounded-memory PyTorch path (query tiles, each with
the box of keys its windows reach, text keys prepended; O(N · box) work and memory, never an (N, N) mask).
Only with a key mask (no family passes one to self-attention) does the core build the boolean mask once per
(grid, text, device) and run `F.scaled_dot_product_attention` with it: exact, but O(N²).
The Triton kernel's window is an int W with the same rules, square max(|Δy|, |Δx|) ≤ W and circle
Δy² + Δx² < W², so the processor maps r onto it for the current grid (`tile_window`): square
W = ⌊r⌋, always exact; circle, the smallest W above every in-window offset, exact only when no offset
of the grid falls in [⌈r²⌉, W²) — true for integer r and e.g. r = 1.5 or √2, false for r = 2.5
(Δ = (2, 2) is out, W = 3 would let it in). A circle with no exact W takes the PyTorch path, which takes r
itself.

FLOPs (the operator's formula): 4·P·C for the P query-key pairs inside the windows, counted exactly
(what a sparse kernel computes; the bounded-memory path computes the scores of whole key boxes, a small
multiple of P).

Inheritance: the family's adapter uses the attention module's own projections and norms, so every teacher
weight is kept; the core adds no parameters.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from pydantic import Field

from dit_graft.kernels import tile_attention, window_attention
from dit_graft.kernels._checks import head_dim_over
from dit_graft.kernels._dispatch import use_triton
from dit_graft.kernels.tile import MAX_TRITON_HEAD_DIM
from dit_graft.kernels.window import grid_window_mask as nd_window_mask
from dit_graft.kernels.window.blockwise import reach
from dit_graft.model.attention import AttentionNeeds
from dit_graft.model.layout import TokenLayout
from dit_graft.operators.base import (
    Case,
    MaskedCore,
    Operator,
    Options,
    Site,
    attention_pairs_flops,
    grid_window_is_full,
    grid_window_mask,
    grid_window_pairs,
    register,
)


class LocalOptions(Options):
    """Options of the `local` operator."""

    window: float = Field(default=8.0, gt=0, description="radius r on the token grid, in tokens")
    shape: Literal["circle", "square"] = "circle"
    temporal_window: int | None = Field(
        default=None, ge=0, description="video grids: |Δt| ≤ this, the shape over (Δy, Δx); None: the shape spans time"
    )


def _temporal(grid: tuple[int, ...], options_temporal: int | None) -> int | None:
    """The temporal radius the kernel takes on this grid (only 3-D grids have time)."""
    return options_temporal if len(grid) == 3 else None


def window_is_full(grid: tuple[int, ...], radius: float, shape: str, temporal: int | None) -> bool:
    """Whether every query's window holds every key of the grid (2-D or 3-D)."""
    if len(grid) == 2:
        return grid_window_is_full(*grid, radius, shape)
    spatial = grid
    if temporal is not None:
        if temporal < grid[0] - 1:
            return False
        spatial = grid[1:]
    if shape == "circle":
        return sum((g - 1) ** 2 for g in spatial) < math.ceil(radius * radius)
    return max(spatial) - 1 <= math.floor(radius)


def window_pairs(grid: tuple[int, ...], radius: float, shape: str, temporal: int | None) -> int:
    """Query-key pairs inside the windows (2-D: `grid_window_pairs`; 3-D: counted over the window's offsets)."""
    if len(grid) == 2:
        return grid_window_pairs(*grid, radius, shape)
    reaches = [min(reach(radius, shape), g - 1) for g in grid]
    if temporal is not None:
        reaches[0] = min(temporal, grid[0] - 1)
    deltas = torch.meshgrid(*(torch.arange(-r, r + 1) for r in reaches), indexing="ij")
    if temporal is not None:
        spatial = deltas[1:]
        inside = (deltas[1].abs() <= math.floor(radius)) & (deltas[2].abs() <= math.floor(radius))
        if shape == "circle":
            inside = sum(d.double() ** 2 for d in spatial) < radius * radius
    elif shape == "square":
        inside = torch.ones_like(deltas[0], dtype=torch.bool)
    else:
        inside = sum(d.double() ** 2 for d in deltas) < radius * radius
    count = torch.ones_like(deltas[0])
    for d, g in zip(deltas, grid, strict=True):
        count = count * (g - d.abs())
    return int(count[inside].sum())


@functools.lru_cache(maxsize=256)
def tile_window(h: int, w: int, radius: float, shape: str) -> int | None:
    """The `tile_attention` window giving exactly this window's mask on the h×w grid, or None when no int does."""
    if shape == "square":
        return math.floor(radius)
    r2 = math.ceil(radius * radius)
    inside, outside = 0, None  # the largest offset dist² < r², the smallest ≥ r², over the grid's offsets
    for dy in range(h):
        room = r2 - dy * dy
        if room > 0:
            inside = max(inside, dy * dy + min(w - 1, math.isqrt(room - 1)) ** 2)
        dx = 0 if room <= 0 else math.isqrt(room - 1) + 1  # the smallest dx with dy² + dx² ≥ r²
        if dx < w and (outside is None or dy * dy + dx * dx < outside):
            outside = dy * dy + dx * dx
    window = math.isqrt(inside) + 1  # the smallest W with W² > inside
    return window if outside is None or window * window <= outside else None


class LocalCore(MaskedCore):
    """CLEAR local attention: softmax over the keys within a radius on the 2-D or 3-D token grid (+ text keys)."""

    op = "local"

    def __init__(self, options: LocalOptions) -> None:
        super().__init__(options)
        self.radius = options.window
        self.shape = options.shape
        self.temporal = options.temporal_window

    def image_mask(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        grid = layout.require_grid(self.op, dims=(2, 3))
        temporal = _temporal(grid, self.temporal)
        if window_is_full(grid, self.radius, self.shape, temporal):
            return None
        if len(grid) == 2:
            return grid_window_mask(*grid, self.radius, self.shape, device)
        return nd_window_mask(grid, self.radius, self.shape, temporal, device)

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        if key_mask is not None or layout.is_cross:
            return super().forward(q, k, v, layout, key_mask)  # the masked path (cross: refused there)
        grid = layout.require_grid(self.op, dims=(2, 3))
        temporal = _temporal(grid, self.temporal)
        if window_is_full(grid, self.radius, self.shape, temporal):
            return super().forward(q, k, v, layout, key_mask)  # softmax attention, no mask
        if layout.text == 0 and len(grid) == 2:
            window = tile_window(*grid, self.radius, self.shape)
            if window is not None and use_triton(
                "local", q, k, v, unsupported=head_dim_over(MAX_TRITON_HEAD_DIM, q, v)
            ):
                return tile_attention(q, k, v, grid, window, self.shape)  # (B, H, N, d)
        # Bounded memory: query tiles with the key boxes their windows reach (text keys prepended).
        return window_attention(
            q, k, v, grid, self.radius, self.shape, temporal_radius=temporal, text=layout.text, fallback=True
        )  # (B, H, T + N, d)


def local_flops(site: Site, tokens: int, options: LocalOptions) -> int:
    """4·P·C over the P in-window pairs of the site's token grid."""
    grid = site.grid.resolve(tokens)
    temporal = _temporal(grid, options.temporal_window)
    return attention_pairs_flops(window_pairs(grid, options.window, options.shape, temporal), site.dim)


register(
    Operator(
        name="local",
        site="attention",
        summary="Exact softmax over keys within radius r on the 2-D or 3-D token grid (own temporal radius on "
        "video); inherited q/k/v/out (CLEAR).",
        options=LocalOptions,
        core=lambda site, options: LocalCore(options),
        needs=AttentionNeeds(grid_dims=(2, 3), text=("none", "prefix")),
        paper="CLEAR (Liu et al. 2024)",
        flops=local_flops,
        cases=(
            Case({"window": 100.0}, exact=True),
            Case({"window": 1.5}),
            Case({"window": 1.0, "shape": "square"}),
            Case({"window": 1.5, "temporal_window": 1}),
        ),
    )
)
