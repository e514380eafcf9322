"""`linear`: LiT-style linear attention (Wang et al. 2025; SANA's LiteLA; TransNormer's output norm).

    o_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + ε),   S = Σ_j φ(k_j) v_jᵀ,   z = Σ_j φ(k_j),   φ = ReLU or ELU + 1

computed as O(N·d²) per head, with the normaliser in fp32. `norm: output_norm` drops the
denominator and RMS-normalises each head's output instead (TransNormer). Optional `dwconv: k` adds a
k×k depthwise convolution of V over the 2-D token grid to the output (LiT's locality guideline); it is
zero-initialised, so at inheritance time the student is exactly linear attention on the teacher's
q/k/v/out projections. `heads` may be fewer than the teacher's: the inherited projections are kept
and only split into fewer, wider heads (LiT's "few heads" guideline).

Where the site's layout has a text prefix (FLUX's joint attention), the text rows keep softmax over every key
(CLEAR's rule) and the image rows take linear attention over all L = T + N keys, text and image; RoPE is
applied before the feature map (φ(R q)ᵀ φ(R k)). The depthwise conv acts on the image values only. In
cross-attention (PixArt's `attn2`) the keys are the caption tokens the mask keeps:
o_i = φ(q_i)ᵀ Σ_j m_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j m_j φ(k_j) + ε); there it takes `norm: divide` and `dwconv: 0`
(the keys are text, not a grid).

FLOPs (the operator's formula), with d = C / heads: 4·N·d·C for S and φ(Q)S, plus 2·N·C for the
normaliser φ(Q)z (`norm: divide`), plus 2·N·C·k² for the depthwise conv. With a text prefix: the text rows'
softmax 4·T·L·C + the formula on L tokens without the conv + 2·N·C·k² (the linear attention runs over all L
rows; the text rows' results are unused).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dit_graft.kernels import linear_attention
from dit_graft.model.attention import AttentionCore, from_heads, to_heads
from dit_graft.model.layout import TokenLayout
from dit_graft.operators.base import Case, Operator, Options, Site, attention_pairs_flops, register


class LinearOptions(Options):
    """Options of the `linear` operator."""

    feature_map: Literal["relu", "elu1"] = "relu"
    norm: Literal["divide", "output_norm"] = "divide"
    heads: int | None = Field(default=None, ge=1, description="heads of the linear attention (default: teacher's)")
    dwconv: int = Field(default=3, ge=0, description="depthwise conv kernel over the token grid (0 = none)")
    eps: float = Field(default=1e-6, gt=0)


def _phi(name: str):
    return F.relu if name == "relu" else (lambda x: F.elu(x) + 1)


class LinearCore(AttentionCore):
    """Linear attention on [B, H, N, d]: self, joint (text rows by softmax) or cross (masked caption keys)."""

    op = "linear"

    def __init__(self, dim: int, heads: int, options: LinearOptions) -> None:
        super().__init__(options)
        self.heads = heads
        self.feature_map = options.feature_map
        self.norm = options.norm
        self.eps = options.eps
        self.dwconv = None
        if options.dwconv:
            k = options.dwconv
            self.dwconv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
            nn.init.zeros_(self.dwconv.weight)
            nn.init.zeros_(self.dwconv.bias)
        self.out_scale = nn.Parameter(torch.ones(dim // heads)) if options.norm == "output_norm" else None

    def _regroup(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, d) teacher heads → (B, H', L, H·d/H') linear-attention heads."""
        b, h, n, d = x.shape
        if h == self.heads:
            return x
        return x.transpose(1, 2).reshape(b, n, self.heads, h * d // self.heads).transpose(1, 2)

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        teacher_heads = q.shape[1]
        if layout.is_cross:
            o = self._cross(q, k, v, key_mask)
        else:
            if key_mask is not None:
                raise ValueError("the linear operator takes a key mask in cross-attention only")
            o = self._joint(q, k, v, layout)
        return to_heads(o, teacher_heads)

    def _cross(self, q, k, v, key_mask) -> torch.Tensor:
        phi = _phi(self.feature_map)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # the sums in fp32 at least
        qf = phi(self._regroup(q).to(acc))  # (B, H', N, d')
        kf = phi(self._regroup(k).to(acc))  # (B, H', T, d')
        vf = self._regroup(v).to(acc)
        if key_mask is not None:
            kf = kf * key_mask[:, None, :, None].to(kf.dtype)
        state = kf.transpose(-1, -2) @ vf  # (B, H', d', d')
        norm = qf @ kf.sum(2, keepdim=True).transpose(-1, -2) + self.eps  # (B, H', N, 1)
        return from_heads((qf @ state) / norm).to(q.dtype)  # (B, N, C)

    def _joint(self, q, k, v, layout: TokenLayout) -> torch.Tensor:
        b, _, length, _ = q.shape
        text = layout.text
        ql, kl, vl = (self._regroup(x) for x in (q, k, v))  # (B, H', L, d')
        if self.norm == "divide":
            o = linear_attention(ql, kl, vl, feature_map=self.feature_map, eps=self.eps)
        else:
            phi = _phi(self.feature_map)
            qf, kf, vf = phi(ql.float()), phi(kl.float()), vl.float()
            o = qf @ (kf.transpose(-1, -2) @ vf) / length  # (B, H', L, d')
            o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.out_scale).to(q.dtype)
        o_image = from_heads(o[:, :, text:])  # (B, N, C): the text rows' linear outputs are unused
        if self.dwconv is not None:
            h, w = layout.require_grid("linear (dwconv)", dims=(2,))
            grid_v = from_heads(v[:, :, text:]).transpose(1, 2).reshape(b, -1, h, w)  # (B, C, h, w)
            o_image = o_image + self.dwconv(grid_v).flatten(2).transpose(1, 2)
        if not text:
            return o_image
        o_text = from_heads(F.scaled_dot_product_attention(q[:, :, :text], k, v))  # (B, T, C): softmax, all keys
        return torch.cat([o_text.to(q.dtype), o_image.to(q.dtype)], dim=1)  # (B, L, C)


def _heads(site: Site, options: LinearOptions) -> int:
    heads = options.heads or site.heads
    if site.dim % heads:
        raise ValueError(f"heads={heads} does not divide the attention width {site.dim}")
    return heads


def check_linear(site: Site, options: LinearOptions) -> None:
    _heads(site, options)
    caps = site.attention
    if caps is not None and caps.text == "cross" and (options.norm != "divide" or options.dwconv):
        raise ValueError("linear cross-attention takes norm: divide and dwconv: 0 (the keys are text, not a grid)")
    if caps is not None and options.dwconv and caps.grid_dims != 2:
        raise ValueError(f"dwconv: {options.dwconv} is a 2-D conv over the token grid, and this site has no 2-D grid")


def build_linear_core(site: Site, options: LinearOptions) -> LinearCore:
    return LinearCore(site.dim, _heads(site, options), options)


def linear_flops(site: Site, tokens: int, options: LinearOptions) -> int:
    """4·N·d·C (+ 2·N·C for the normaliser, + 2·N·C·k² for the conv)."""
    c = site.dim
    d = c // (options.heads or site.heads)
    flops = 4 * tokens * d * c
    if options.norm == "divide":
        flops += 2 * tokens * c
    return flops + 2 * tokens * c * options.dwconv**2


def linear_prefix_flops(site: Site, layout: TokenLayout, options: LinearOptions) -> int:
    """Text rows' softmax + linear attention over all L rows + the conv over the N image tokens."""
    joint, n = layout.length, layout.image
    linear = linear_flops(site, joint, options.model_copy(update={"dwconv": 0}))
    return attention_pairs_flops(layout.text * joint, site.dim) + linear + 2 * n * site.dim * options.dwconv**2


register(
    Operator(
        name="linear",
        site="attention",
        summary="ReLU/ELU+1 linear attention, O(N·d²), inherited q/k/v/out, optional depthwise conv (LiT).",
        options=LinearOptions,
        core=build_linear_core,
        check=check_linear,
        paper="LiT (Wang et al. 2025); SANA; TransNormer",
        flops=linear_flops,
        prefix_flops=linear_prefix_flops,
        cases=(
            Case({"dwconv": 0}),
            Case({"dwconv": 3}),
            Case({"dwconv": 0, "heads": 1, "norm": "output_norm", "feature_map": "elu1"}),
        ),
    )
)
