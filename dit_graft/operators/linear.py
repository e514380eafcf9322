"""`linear`: LiT-style linear attention (Wang et al. 2025; SANA's LiteLA; TransNormer's output norm).

    o_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + ε),   S = Σ_j φ(k_j) v_jᵀ,   z = Σ_j φ(k_j),   φ = ReLU or ELU + 1

computed as O(N·d²) per head, with the normaliser in fp32. `norm: output_norm` drops the
denominator and RMS-normalises each head's output instead (TransNormer). Optional `dwconv: k` adds a
k×k depthwise convolution of V over the token grid to the output (LiT's locality guideline); it is
zero-initialised, so at inheritance time the student is exactly linear attention on the teacher's
q/k/v/out projections. `heads` may be fewer than the teacher's: the inherited projections are kept
and only split into fewer, wider heads (LiT's "few heads" guideline).

FLOPs (the operator's formula), with d = C / heads: 4·N·d·C for S and φ(Q)S, plus 2·N·C for the
normaliser φ(Q)z (`norm: divide`), plus 2·N·C·k² for the depthwise conv.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dit_graft.kernels import linear_attention
from dit_graft.operators.base import Operator, Options, Site, TokenGrid, from_heads, register, to_heads


class LinearOptions(Options):
    """Options of the `linear` operator."""

    feature_map: Literal["relu", "elu1"] = "relu"
    norm: Literal["divide", "output_norm"] = "divide"
    heads: int | None = Field(default=None, ge=1, description="heads of the linear attention (default: teacher's)")
    dwconv: int = Field(default=3, ge=0, description="depthwise conv kernel over the token grid (0 = none)")
    eps: float = Field(default=1e-6, gt=0)


class LinearAttnProcessor(nn.Module):
    """A diffusers attention processor computing linear attention with the Attention's projections."""

    def __init__(self, dim: int, heads: int, options: LinearOptions, grid: TokenGrid) -> None:
        super().__init__()
        self.heads = heads
        self.feature_map = options.feature_map
        self.norm = options.norm
        self.eps = options.eps
        self.grid = grid
        self.dwconv = None
        if options.dwconv:
            k = options.dwconv
            self.dwconv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
            nn.init.zeros_(self.dwconv.weight)
            nn.init.zeros_(self.dwconv.bias)
        self.out_scale = nn.Parameter(torch.ones(dim // heads)) if options.norm == "output_norm" else None

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the linear operator replaces self-attention only (no context, no mask)")
        b, n, _ = hidden_states.shape
        v_flat = attn.to_v(hidden_states)  # (B, N, C)
        q = to_heads(attn.to_q(hidden_states), self.heads)  # (B, H, N, d)
        k = to_heads(attn.to_k(hidden_states), self.heads)
        v = to_heads(v_flat, self.heads)
        if self.norm == "divide":
            o = linear_attention(q, k, v, feature_map=self.feature_map, eps=self.eps)
        else:
            phi = F.relu if self.feature_map == "relu" else (lambda x: F.elu(x) + 1)
            qf, kf, vf = phi(q.float()), phi(k.float()), v.float()
            o = qf @ (kf.transpose(-1, -2) @ vf) / n  # (B, H, N, d)
            o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.out_scale).to(q.dtype)
        o = from_heads(o)  # (B, N, C)
        if self.dwconv is not None:
            h, w = self.grid.resolve(n)
            grid_v = v_flat.transpose(1, 2).reshape(b, -1, h, w)  # (B, C, h, w)
            o = o + self.dwconv(grid_v).flatten(2).transpose(1, 2)
        o = attn.to_out[0](o)
        return attn.to_out[1](o)


def build_linear(old: nn.Module, site: Site, options: LinearOptions) -> LinearAttnProcessor:
    heads = options.heads or site.heads
    if site.dim % heads:
        raise ValueError(f"heads={heads} does not divide the attention width {site.dim}")
    return LinearAttnProcessor(site.dim, heads, options, site.grid)


def linear_flops(site: Site, tokens: int, options: LinearOptions) -> int:
    """4·N·d·C (+ 2·N·C for the normaliser, + 2·N·C·k² for the conv)."""
    c = site.dim
    d = c // (options.heads or site.heads)
    flops = 4 * tokens * d * c
    if options.norm == "divide":
        flops += 2 * tokens * c
    return flops + 2 * tokens * c * options.dwconv**2


register(
    Operator(
        name="linear",
        site="attention",
        summary="ReLU/ELU+1 linear attention, O(N·d²), inherited q/k/v/out, optional depthwise conv (LiT).",
        options=LinearOptions,
        build=build_linear,
        paper="LiT (Wang et al. 2025); SANA; TransNormer",
        flops=linear_flops,
    )
)
