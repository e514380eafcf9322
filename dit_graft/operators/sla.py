"""`sla`: sparse-linear attention (SLA, Zhang et al. 2025).

Tokens are cut into consecutive blocks of b = `block` tokens (the last block is short when b does
not divide N). Per head, query block I ranks the key blocks J by the mean-pooled score q̄_I · k̄_J
and splits them three ways:

    critical    the top `critical` share      → exact softmax over their keys (block-sparse)
    negligible  the bottom `negligible` share → skipped
    marginal    every other block             → linear attention, φ = ReLU or ELU + 1

    o_i = Σ_{j ∈ critical(I)} softmax_j(q_i·k_j / √d) v_j
          + proj_l( φ(q_i)ᵀ Σ_{j ∈ marginal(I)} φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_{j ∈ marginal(I)} φ(k_j) + ε) )

`critical` is a fraction of the ⌈N/b⌉ key blocks in (0, 1] (rounded up, at least one) or a count ≥ 1;
`negligible` a fraction in [0, 1) (rounded down) or a count ≥ 0, never taking a critical block. The
defaults, 5% critical and 10% negligible, are the paper's. Block selection runs without gradients.

proj_l is one Linear(d → d) without bias, shared by every head and applied to each head's linear
output before the heads are merged, as in the paper: d² parameters, 2·N·d·C FLOPs, where a C → C
map would cost as much as another q/k/v projection. It starts at zero, so at inheritance time the
operator is exactly block-sparse softmax over the critical blocks (the `sparse` operator with
`keep: critical`); having no bias, it adds nothing where a query block has no marginal block, so
`critical: 1.0` is softmax attention whatever proj_l has learnt. Fine-tuning trains proj_l with the
inherited projections.

The processor calls only the public kernels: `dit_graft.kernels.sla_block_index` splits the blocks
and `dit_graft.kernels.sla_attention` returns both parts (Triton on CUDA; elsewhere the PyTorch
reference, which computes densely and masks, so off CUDA the processor calls it a few heads at a time).

FLOPs (the operator's formula; n_b = ⌈N/b⌉, k = critical blocks, d = C / heads):
4·N·min(N, k·b)·C for the critical blocks (each counted as full) + 2·n_b²·C for the pooled block
scores + 2·N·d·C for the per-block states φ(K_J)ᵀV_J + 2·n_b²·(d + 1)·C for summing each query
block's marginal states (the kernel's map × states product, dense over the blocks) + 2·N·d·C + 2·N·C
for φ(Q)·state and its normaliser + 2·N·d·C for proj_l.

With a text prefix (FLUX's joint attention) the text keys count as critical for every image query: softmax over
the text keys plus the critical image key blocks, + proj_l(linear attention over the marginal image key
blocks); text queries attend to every key by softmax (CLEAR's rule).

Inheritance: the family's adapter uses the attention module's own projections and norms; the core adds only
proj_l.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from dit_graft.kernels import block_sparse_attention, sla_attention, sla_block_index
from dit_graft.kernels.block_sparse.index import keep_count
from dit_graft.model.attention import AttentionCore, AttentionNeeds
from dit_graft.model.layout import TokenLayout
from dit_graft.operators.base import (
    Case,
    Operator,
    Options,
    Site,
    attention_pairs_flops,
    block_share,
    prefix_block_sparse,
    register,
)

# Scores one call of the reference may hold: it keeps about four [B, h, N, N] fp32 tensors (scores,
# softmax weights, masks, linear weights), so 2²⁷ per tensor stays near 2 GiB. The Triton kernels hold none.
REFERENCE_SCORES = 2**27


class SlaOptions(Options):
    """Options of the `sla` operator."""

    block: Literal[16, 32, 64, 128] = 64
    critical: int | float = Field(default=0.05, description="critical key blocks per query block: fraction or count")
    negligible: int | float = Field(default=0.1, description="skipped key blocks per query block: fraction or count")
    feature_map: Literal["relu", "elu1"] = "relu"
    eps: float = Field(default=1e-6, gt=0)

    @field_validator("critical", "negligible", mode="before")
    @classmethod
    def _no_bool(cls, value, info):
        return block_share(info.field_name, value) if isinstance(value, bool) else value  # before True reads as 1

    @field_validator("critical", "negligible")
    @classmethod
    def _share_range(cls, value: int | float, info) -> int | float:
        return block_share(info.field_name, value, zero_ok=info.field_name == "negligible")


def critical_blocks(critical: int | float, n_blocks: int) -> int:
    """Key blocks per query block, counted exactly as the kernel counts them (a count, or ⌈fraction · n⌉ ≥ 1)."""
    return keep_count(critical, n_blocks)


class SlaCore(AttentionCore):
    """Sparse-linear attention on [B, H, N, d]: o_sparse + proj_l(o_linear) (image blocks; text rows dense)."""

    op = "sla"

    def __init__(self, head_dim: int, options: SlaOptions) -> None:
        super().__init__(options)
        self.block = options.block
        self.critical = options.critical
        self.negligible = options.negligible
        self.feature_map = options.feature_map
        self.eps = options.eps
        self.proj_l = nn.Linear(head_dim, head_dim, bias=False)
        nn.init.zeros_(self.proj_l.weight)

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        if key_mask is not None or layout.is_cross:
            raise ValueError("the sla operator takes no key mask and no cross-attention")
        t = layout.text
        qi, ki, vi = q[:, :, t:], k[:, :, t:], v[:, :, t:]  # (B, H, N, d): the image tokens
        b, h, n, _ = qi.shape
        critical, marginal = sla_block_index(qi, ki, self.block, self.critical, self.negligible)  # (B, H, nb, nb)
        step = h if q.is_cuda else max(1, REFERENCE_SCORES // (b * n * n))
        if t == 0:
            parts = [
                sla_attention(
                    q[:, s : s + step],
                    k[:, s : s + step],
                    v[:, s : s + step],
                    critical[:, s : s + step],
                    marginal[:, s : s + step],
                    self.block,
                    self.feature_map,
                    self.eps,
                )
                for s in range(0, h, step)
            ]
            o_sparse = torch.cat([p[0] for p in parts], dim=1)  # (B, H, N, d)
            o_linear = torch.cat([p[1] for p in parts], dim=1)  # (B, H, N, d)
            return o_sparse + self.proj_l(o_linear)
        # text prefix: the sparse part over text keys + critical image blocks; the linear part over the marginal
        o = prefix_block_sparse(q, k, v, layout, critical, self.block, block_sparse_attention, REFERENCE_SCORES)
        none = torch.zeros_like(critical)  # the critical blocks' softmax is `o` above; only the linear part here
        o_linear = torch.cat(
            [
                sla_attention(
                    qi[:, s : s + step],
                    ki[:, s : s + step],
                    vi[:, s : s + step],
                    none[:, s : s + step],
                    marginal[:, s : s + step],
                    self.block,
                    self.feature_map,
                    self.eps,
                )[1]
                for s in range(0, h, step)
            ],
            dim=1,
        )  # (B, H, N, d): zeros where a query block has no marginal block
        o_image = o[:, :, t:] + self.proj_l(o_linear)
        return torch.cat([o[:, :, :t], o_image.to(o.dtype)], dim=2)


def sla_flops(site: Site, tokens: int, options: SlaOptions) -> int:
    """Critical blocks + block scores + the linear part's states, state sums, read-out and proj_l (module doc)."""
    c = site.dim
    d = c // site.heads
    n_blocks = math.ceil(tokens / options.block)
    keys = min(tokens, critical_blocks(options.critical, n_blocks) * options.block)
    sparse = attention_pairs_flops(tokens * keys, c) + 2 * n_blocks * n_blocks * c
    linear = 2 * tokens * d * c + 2 * n_blocks * n_blocks * (d + 1) * c + 2 * tokens * d * c + 2 * tokens * c
    return sparse + linear + 2 * tokens * d * c


register(
    Operator(
        name="sla",
        site="attention",
        summary="Sparse-linear: softmax on the critical key blocks, linear attention on the marginal ones, "
        "skip the rest; zero-init proj_l; inherited q/k/v/out (SLA).",
        options=SlaOptions,
        core=lambda site, options: SlaCore(site.dim // site.heads, options),
        needs=AttentionNeeds(text=("none", "prefix")),
        paper="SLA (Zhang et al. 2025)",
        flops=sla_flops,
        cases=(
            Case({"block": 16, "critical": 1.0}, exact=True),
            Case({"block": 16, "critical": 1, "negligible": 0}),
        ),
    )
)
