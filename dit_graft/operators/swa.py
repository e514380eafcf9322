"""`swa`: sliding-window attention over the flattened token sequence (grafting, Chandrasegaran et al. 2025).

    o_i = Σ_{j : |i − j| ≤ ⌊w/2⌋} softmax_j(q_i·k_j / √d) v_j,   w = `window`

i and j are positions in the model's token sequence (row-major on the grid for DiT), so query i
sees at most 2⌊w/2⌋ + 1 keys: w + 1 for an even w, w for an odd one. The band is clipped at both
ends of the sequence (no padding) and always holds the query itself. On an image the band reaches
⌊w/2⌋ tokens along the row and wraps into the neighbouring rows, unlike `local`'s 2D window.

The core runs `dit_graft.kernels.window_attention` on the 1-D grid (N,) with a square window of radius
⌊w/2⌋: its bounded-memory PyTorch path cuts the sequence into query tiles, each with the key range its band
reaches (text keys prepended), so work and memory are O(N · (tile + w)), never an (N, N) mask. A window
with ⌊w/2⌋ ≥ N − 1 is softmax attention (plain SDPA). Only with a key mask (no family passes one to
self-attention) does the core build the boolean band and run SDPA with it (O(N²)).

FLOPs (the operator's formula): 4·P·C for the P = Σ_i |band(i)| query-key pairs in the band (what a
banded kernel computes; the PyTorch path above does the dense 4·N²·C).

With a text prefix (FLUX's joint attention) i and j count along the image tokens (row-major), image queries
also see every text key and text queries see every key (CLEAR's rule, `TokenLayout.pair_mask`).

Inheritance: the family's adapter uses the attention module's own projections and norms, so every teacher
weight is kept; the core adds no parameters.
"""

from __future__ import annotations

import torch
from pydantic import Field

from dit_graft.kernels import window_attention
from dit_graft.model.attention import AttentionNeeds
from dit_graft.model.layout import TokenLayout
from dit_graft.operators.base import (
    Case,
    MaskedCore,
    Operator,
    Options,
    Site,
    attention_pairs_flops,
    band_mask,
    band_pairs,
    register,
)


class SwaOptions(Options):
    """Options of the `swa` operator."""

    window: int = Field(default=64, ge=1, description="window w: key j visible to query i iff |i - j| ≤ w // 2")


class SwaCore(MaskedCore):
    """Softmax over the keys within ⌊w/2⌋ positions of the query in the image token sequence (+ every text key)."""

    op = "swa"

    def __init__(self, options: SwaOptions) -> None:
        super().__init__(options)
        self.half = options.window // 2

    def mask_key(self, layout: TokenLayout) -> tuple:
        return (layout.text, layout.image)

    def image_mask(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        n = layout.image
        return None if n - 1 <= self.half else band_mask(n, self.half, device)

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        if key_mask is not None or layout.is_cross or layout.image - 1 <= self.half:
            return super().forward(q, k, v, layout, key_mask)  # masked path / refusal / plain softmax
        return window_attention(q, k, v, (layout.image,), self.half, "square", text=layout.text, fallback=True)


def swa_flops(site: Site, tokens: int, options: SwaOptions) -> int:
    """4·P·C over the P pairs with |i − j| ≤ w // 2."""
    return attention_pairs_flops(band_pairs(tokens, options.window // 2), site.dim)


register(
    Operator(
        name="swa",
        site="attention",
        summary="Sliding-window softmax over the token sequence (|i-j| ≤ w//2), inherited q/k/v/out (grafting).",
        options=SwaOptions,
        core=lambda site, options: SwaCore(options),
        needs=AttentionNeeds(text=("none", "prefix")),
        paper="Grafting (Chandrasegaran et al. 2025)",
        flops=swa_flops,
        cases=(Case({"window": 100000}, exact=True), Case({"window": 4})),
    )
)
