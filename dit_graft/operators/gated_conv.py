"""`gated_conv`: a Hyena-style gated convolution in place of attention (grafting, Chandrasegaran et al. 2025).

An order-2 Hyena operator with short filters only (grafting's Hyena-X), made 2D and non-causal for
image tokens:

    q̃ = D_q ∗ to_q(x),   k̃ = D_k ∗ to_k(x),   ṽ = D_v ∗ to_v(x)        (featurizers)
    y = to_out( q̃ ⊙ (D_h ∗ (k̃ ⊙ ṽ)) )                                  (gating, mixing, gating)

where D ∗ is a k×k depthwise (per-channel) convolution with bias over the h×w token grid, zero
padded ("same" size, so k is odd), and ⊙ the elementwise product. Output token p depends on the
input tokens within Chebyshev distance 2⌊k/2⌋ of p; the cost is O(N·C·k²) instead of O(N²·C).
No softmax, no heads: norm_q/norm_k, when the Attention has them, are applied per head (by the family's adapter)
before the featurizers.

It has no keys, so it is refused where text reaches the image tokens only through attention's keys (FLUX's
joint attention, cross-attention): the image tokens would lose the text, and there is no CLEAR-style form.

FLOPs (the operator's formula): 8·N·C·k² (the four depthwise filters on C channels each, 2 FLOPs
per tap; the products ⊙ are not counted, as FlopCounterMode does not count them).

Inheritance: the Attention module stays, so to_q/to_k/to_v/to_out are the teacher's. The new
parameters are the filters: D_q, D_k, D_v (one grouped conv over the 3C projected channels) start
as the identity (centre tap 1, others 0, bias 0), so q̃, k̃, ṽ start as the teacher's projections;
D_h starts as a k×k box mean (every tap 1/k², bias 0), so tokens mix from the first step (an identity
D_h would make the operator token-wise).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from dit_graft.model.attention import AttentionCore, AttentionNeeds, from_heads, to_heads
from dit_graft.model.layout import TokenLayout
from dit_graft.operators.base import Case, Operator, Options, Site, identity_depthwise, register


class GatedConvOptions(Options):
    """Options of the `gated_conv` operator."""

    kernel: int = Field(default=3, ge=3, description="odd k of the k×k depthwise filters on the token grid")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"kernel must be odd (got {k}): the filters keep the grid's size")
        return k


class GatedConvCore(AttentionCore):
    """y = q̃ ⊙ D_h ∗ (k̃ ⊙ ṽ) on the token grid, from the teacher's projections; no keys, no softmax."""

    op = "gated_conv"

    def __init__(self, channels: int, options: GatedConvOptions) -> None:
        super().__init__(options)
        kernel = options.kernel
        self.featurizer = identity_depthwise(
            nn.Conv2d(3 * channels, 3 * channels, kernel, padding=kernel // 2, groups=3 * channels)
        )
        self.mixer = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        with torch.no_grad():
            self.mixer.weight.fill_(1.0 / kernel**2)
            self.mixer.bias.zero_()

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        if layout.text or layout.is_cross or key_mask is not None:
            raise ValueError("the gated_conv operator replaces self-attention over the grid tokens only (no text)")
        b, heads, n, _ = q.shape
        h, w = layout.require_grid(self.op, dims=(2,))
        qkv = torch.cat([from_heads(q), from_heads(k), from_heads(v)], dim=-1)  # (B, N, 3C)
        qkv = self.featurizer(qkv.transpose(1, 2).reshape(b, -1, h, w))  # (B, 3C, h, w)
        q, k, v = qkv.chunk(3, dim=1)  # (B, C, h, w) each
        y = q * self.mixer(k * v)  # (B, C, h, w)
        return to_heads(y.flatten(2).transpose(1, 2), heads)  # (B, H, N, d)


def gated_conv_flops(site: Site, tokens: int, options: GatedConvOptions) -> int:
    """8·N·C·k²: D_q, D_k, D_v and D_h, k² taps per token and channel."""
    return 2 * tokens * 4 * site.dim * options.kernel**2


register(
    Operator(
        name="gated_conv",
        site="attention",
        summary="Hyena-style gated k×k depthwise convs on the token grid, no softmax; inherited q/k/v/out (grafting).",
        options=GatedConvOptions,
        core=lambda site, options: GatedConvCore(site.dim, options),
        needs=AttentionNeeds(grid_dims=(2,), text=("none",), keys=False),
        paper="Grafting (Chandrasegaran et al. 2025); Hyena (Poli et al. 2023)",
        flops=gated_conv_flops,
        cases=(Case({"kernel": 3}),),
    )
)
