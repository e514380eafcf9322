"""`swa`: sliding-window attention over the flattened token sequence (grafting, Chandrasegaran et al. 2025).

    o_i = Σ_{j : |i − j| ≤ ⌊w/2⌋} softmax_j(q_i·k_j / √d) v_j,   w = `window`

i and j are positions in the model's token sequence (row-major on the grid for DiT), so query i
sees at most 2⌊w/2⌋ + 1 keys: w + 1 for an even w, w for an odd one. The band is clipped at both
ends of the sequence (no padding) and always holds the query itself. On an image the band reaches
⌊w/2⌋ tokens along the row and wraps into the neighbouring rows, unlike `local`'s 2D window.

The PyTorch path builds the boolean (N, N) band once per (N, device) and runs
`F.scaled_dot_product_attention` with it (exact, still O(N²) work). A window with ⌊w/2⌋ ≥ N − 1
passes no mask: it is softmax attention.

FLOPs (the operator's formula): 4·P·C for the P = Σ_i |band(i)| query-key pairs in the band (what a
banded kernel computes; the PyTorch path above does the dense 4·N²·C).

Inheritance: the processor uses the Attention's own to_q/to_k/to_v/to_out (and norm_q/norm_k when
present), so every teacher weight is kept; it adds no parameters.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from dit_graft.operators.base import (
    MaskedSoftmaxProcessor,
    Operator,
    Options,
    Site,
    attention_pairs_flops,
    band_mask,
    band_pairs,
    check_self_attention,
    register,
)


class SwaOptions(Options):
    """Options of the `swa` operator."""

    window: int = Field(default=64, ge=1, description="window w: key j visible to query i iff |i - j| ≤ w // 2")


class SlidingWindowAttnProcessor(MaskedSoftmaxProcessor):
    """Softmax over the keys within ⌊w/2⌋ positions of the query in the token sequence."""

    op = "swa"

    def __init__(self, options: SwaOptions) -> None:
        super().__init__()
        self.half = options.window // 2

    def mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        if n - 1 <= self.half:
            return None
        return self.cached((n, device), lambda: band_mask(n, self.half, device))


def build_swa(old: nn.Module, site: Site, options: SwaOptions) -> SlidingWindowAttnProcessor:
    check_self_attention(old, "swa")
    return SlidingWindowAttnProcessor(options)


def swa_flops(site: Site, tokens: int, options: SwaOptions) -> int:
    """4·P·C over the P pairs with |i − j| ≤ w // 2."""
    return attention_pairs_flops(band_pairs(tokens, options.window // 2), site.dim)


register(
    Operator(
        name="swa",
        site="attention",
        summary="Sliding-window softmax over the token sequence (|i-j| ≤ w//2), inherited q/k/v/out (grafting).",
        options=SwaOptions,
        build=build_swa,
        paper="Grafting (Chandrasegaran et al. 2025)",
        flops=swa_flops,
    )
)
