"""`local`: CLEAR's conv-like local attention (Liu et al. 2024).

Each query attends, with exact softmax, only to the keys near it on the 2D token grid:

    o_i = Σ_{j ∈ W(i)} softmax_j(q_i·k_j / √d) v_j

Token n sits at p_n = (n // w, n % w) on the h×w grid (row-major, as diffusers' PatchEmbed flattens
it). With (Δy, Δx) = p_i − p_j and the radius r = `window` (a float, in tokens):

    shape: circle   j ∈ W(i)  ⇔  Δy² + Δx² < r²          (CLEAR's circular window, strict)
    shape: square   j ∈ W(i)  ⇔  max(|Δy|, |Δx|) ≤ r     (a (2⌊r⌋+1)² box)

Borders are not padded: a query near an edge has fewer keys. A token always sees itself (r > 0), so
no row is empty. r² is taken in float64, so e.g. r = √2 (r² = 2.0000000000000004) includes the
diagonal neighbours. A window that covers the whole grid passes no mask: it is softmax attention.

With a text prefix (FLUX's joint attention) image query i sees every text key and the image keys in its
window; text queries see every key (CLEAR's rule, `TokenLayout.pair_mask`).

Two paths compute the same thing. Without text, when `dit_graft.kernels.tile_attention` would run its Triton
kernel (fp16/bf16/fp32 CUDA inputs with head dims up to 128, or DIT_GRAFT_KERNELS=triton; never with
DIT_GRAFT_KERNELS=naive), the core calls it: it visits only the key tiles near each query tile.
Otherwise it builds the boolean mask once per (grid, text, device) and runs
`F.scaled_dot_product_attention` with it: exact, but O(N²) work.
The kernel's window is an int W with the same rules, square max(|Δy|, |Δx|) ≤ W and circle
Δy² + Δx² < W², so the processor maps r onto it for the current grid (`tile_window`): square
W = ⌊r⌋, always exact; circle, the smallest W above every in-window offset, exact only when no offset
of the grid falls in [⌈r²⌉, W²) — true for integer r and e.g. r = 1.5 or √2, false for r = 2.5
(Δ = (2, 2) is out, W = 3 would let it in). A circle with no exact W takes the masked path.

FLOPs (the operator's formula): 4·P·C for the P query-key pairs inside the windows, counted exactly
(what a sparse kernel computes; the PyTorch path above does the dense 4·N²·C).

Inheritance: the family's adapter uses the attention module's own projections and norms, so every teacher
weight is kept; the core adds no parameters.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from pydantic import Field

from dit_graft.kernels import tile_attention
from dit_graft.kernels._checks import head_dim_over
from dit_graft.kernels._dispatch import use_triton
from dit_graft.kernels.tile import MAX_TRITON_HEAD_DIM
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
    """CLEAR local attention: softmax over the keys within a radius on the 2-D token grid (+ every text key)."""

    op = "local"

    def __init__(self, options: LocalOptions) -> None:
        super().__init__(options)
        self.radius = options.window
        self.shape = options.shape

    def image_mask(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        h, w = layout.require_grid(self.op, dims=(2,))
        if grid_window_is_full(h, w, self.radius, self.shape):
            return None
        return grid_window_mask(h, w, self.radius, self.shape, device)

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        if layout.text == 0 and key_mask is None and not layout.is_cross:
            h, w = layout.require_grid(self.op, dims=(2,))
            full = grid_window_is_full(h, w, self.radius, self.shape)
            window = None if full else tile_window(h, w, self.radius, self.shape)
            if window is not None and use_triton(
                "local", q, k, v, unsupported=head_dim_over(MAX_TRITON_HEAD_DIM, q, v)
            ):
                return tile_attention(q, k, v, (h, w), window, self.shape)  # (B, H, N, d)
        return super().forward(q, k, v, layout, key_mask)


def local_flops(site: Site, tokens: int, options: LocalOptions) -> int:
    """4·P·C over the P in-window pairs of the site's token grid."""
    h, w = site.grid.resolve(tokens)
    return attention_pairs_flops(grid_window_pairs(h, w, options.window, options.shape), site.dim)


register(
    Operator(
        name="local",
        site="attention",
        summary="Exact softmax over keys within radius r on the 2D token grid; inherited q/k/v/out (CLEAR).",
        options=LocalOptions,
        core=lambda site, options: LocalCore(options),
        needs=AttentionNeeds(grid_dims=(2,), text=("none", "prefix")),
        paper="CLEAR (Liu et al. 2024)",
        flops=local_flops,
        cases=(
            Case({"window": 100.0}, exact=True),
            Case({"window": 1.5}),
            Case({"window": 1.0, "shape": "square"}),
        ),
    )
)
