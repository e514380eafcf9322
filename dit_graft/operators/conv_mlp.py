"""`conv_mlp`: SANA's Mix-FFN — the MLP with a depthwise convolution over the token grid (Xie et al. 2024).

    y = W₂ · GELU( D ∗ (W₁ x + b₁) ) + b₂

where D ∗ is a k×k depthwise (per hidden channel) convolution with bias over the h×w token grid,
zero padded ("same" size, so k is odd). It gives the MLP the locality that linear attention lacks.
SANA's own block is 1×1 conv → 3×3 depthwise conv → GLU → 1×1 conv; here the teacher's GELU MLP is
kept around the conv so that its weights carry over.

Inheritance: W₁, b₁, W₂, b₂ are copied from the teacher's FeedForward (shapes checked), dropout
too; D starts as the identity (centre tap 1, others 0, bias 0), so at build time the module
computes exactly the teacher's FFN. The new parameters are D's weight and bias.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from dit_graft.model.attention import AttentionNeeds
from dit_graft.operators.base import (
    Operator,
    Options,
    Site,
    TokenGrid,
    identity_depthwise,
    inherit,
    read_feedforward,
    register,
)


class ConvMlpOptions(Options):
    """Options of the `conv_mlp` operator."""

    kernel: int = Field(default=3, ge=3, description="odd k of the k×k depthwise conv on the hidden units")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"kernel must be odd (got {k}): the conv keeps the grid's size")
        return k


class ConvFeedForward(nn.Module):
    """fc1 → k×k depthwise conv over the token grid → GELU → dropout → fc2, on (B, N, C) tokens."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        dim_out: int,
        kernel: int,
        approximate: str,
        dropout: float,
        final_dropout: bool,
        bias: bool,
        grid: TokenGrid,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.dwconv = identity_depthwise(nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden))
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim_out, bias=bias)
        self.final_dropout = nn.Dropout(dropout) if final_dropout else nn.Identity()

    def forward(self, hidden_states, *args, **kwargs):
        b, n, _ = hidden_states.shape
        h, w = self.grid.resolve(n)
        z = self.fc1(hidden_states)  # (B, N, hidden)
        z = self.dwconv(z.transpose(1, 2).reshape(b, -1, h, w))  # (B, hidden, h, w)
        z = F.gelu(z.flatten(2).transpose(1, 2), approximate=self.approximate)  # (B, N, hidden)
        return self.final_dropout(self.fc2(self.dropout(z)))


def build_conv_mlp(old: nn.Module, site: Site, options: ConvMlpOptions) -> ConvFeedForward:
    ffn = read_feedforward(old, site, "conv_mlp")
    bias = ffn.fc1.bias is not None
    weight = ffn.fc1.weight
    new = ConvFeedForward(
        site.dim,
        ffn.fc1.out_features,
        ffn.fc2.out_features,
        options.kernel,
        ffn.approximate,
        ffn.dropout,
        ffn.final_dropout,
        bias,
        site.grid,
    ).to(device=weight.device, dtype=weight.dtype)
    inherit(new.fc1.weight, ffn.fc1.weight, "fc1.weight")
    inherit(new.fc2.weight, ffn.fc2.weight, "fc2.weight")
    if bias:
        inherit(new.fc1.bias, ffn.fc1.bias, "fc1.bias")
        inherit(new.fc2.bias, ffn.fc2.bias, "fc2.bias")
    return new


register(
    Operator(
        name="conv_mlp",
        site="mlp",
        summary="SANA Mix-FFN: fc1 → k×k depthwise conv on the token grid → GELU → fc2; inherited fc1/fc2.",
        options=ConvMlpOptions,
        build=build_conv_mlp,
        installs="module",
        paper="SANA (Xie et al. 2024)",
        needs=AttentionNeeds(grid_dims=(2,)),  # a 2-D conv over the token grid
    )
)
