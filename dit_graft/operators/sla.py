"""`sla`: sparse-linear attention (SLA, Zhang et al. 2025).

Tokens are cut into consecutive blocks of b = `block` tokens (the last block is short when b does
not divide N). Per head, query block I ranks the key blocks J by the mean-pooled score q̄_I · k̄_J
and splits them three ways:

    critical    the top `critical` share      → exact softmax over their keys (block-sparse)
    negligible  the bottom `negligible` share → skipped
    marginal    every other block             → linear attention, φ = ReLU, ELU + 1 or softmax over d

    o_i = Σ_{j ∈ critical(I)} softmax_j(q_i·k_j / √d) v_j
          + proj_l( φ(q_i)ᵀ Σ_{j ∈ marginal(I)} φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_{j ∈ marginal(I)} φ(k_j) + ε) )

`critical` is a fraction of the ⌈N/b⌉ key blocks in (0, 1] (rounded up, at least one) or a count ≥ 1;
`negligible` a fraction in [0, 1) (rounded down) or a count ≥ 0, never taking a critical block. The
defaults, 5% critical and 10% negligible, are the paper's. Block selection runs without gradients.

proj_l is one Linear(d → d), shared by every head and applied to each head's linear output before the
heads are merged, as in the paper: d² parameters, 2·N·d·C FLOPs, where a C → C map would cost as much as
another q/k/v projection. It starts at zero (weight, and bias when `proj_bias: true`), so at inheritance
time the operator is exactly block-sparse softmax over the critical blocks (the `sparse` operator with
`keep: critical`). Without a bias it adds nothing where a query block has no marginal block, so
`critical: 1.0` is softmax attention whatever proj_l has learnt; thu-ml's releases have the bias.
Fine-tuning trains proj_l with the inherited projections.

The released variants (thu-ml/SLA; docs/kernels.md has the table):

- `linear_keys: marginal` (default): the linear part sums over each query block's marginal blocks — the
  paper's formulation. With `negligible: 0` the marginal blocks are every non-critical block: the first
  release (branch SLA-1), whose kernel sums all block states minus the critical ones.
- `linear_keys: all`: the linear part sums over every key, critical blocks included, one global state —
  thu-ml's current main branch (`negligible` must then be 0: nothing is skipped).
- `feature_map: softmax` (softmax over the head dim, applied to q and k separately) is thu-ml's default;
  `relu` and `elu1` (ELU + 1) are their other options. `key_block` gives key blocks their own size
  (thu-ml: query blocks 64 or 128, key blocks 64); `block` sizes the query blocks.
- Departures, kept on purpose: at least one critical block per query block (thu-ml's int(ratio · n) can be 0)
  and the negligible class (the paper describes it; neither release implements it); eps is added to the
  normaliser in both modes (SLA-1 adds none, main adds 1e-5: set `eps: 1e-5` to match it).

The core calls only the public kernels: `dit_graft.kernels.sla_block_index` splits the blocks and
`dit_graft.kernels.sla_attention` returns both parts (Triton on CUDA when query and key blocks are one
size; elsewhere its bounded-memory PyTorch path: gathered critical blocks, per-block linear states summed
over each query block's marginal blocks, chunked — never [N, N]).

FLOPs (the operator's formula; n_q = ⌈N/b⌉ query blocks, n_k = ⌈N/b_k⌉ key blocks, k = critical blocks,
d = C / heads): 4·N·min(N, k·b_k)·C for the critical blocks (each counted as full) + 2·n_q·n_k·C for the
pooled block scores + 2·N·d·C for the per-block states φ(K_J)ᵀV_J + 2·n_q·n_k·(d + 1)·C for summing each
query block's marginal states (the map × states product, dense over the blocks; none with `linear_keys:
all`, which sums one global state) + 2·N·d·C + 2·N·C for φ(Q)·state and its normaliser + 2·N·d·C for proj_l.

With a text prefix (FLUX's joint attention) the text keys count as critical for every image query: softmax over
the text keys plus the critical image key blocks, + proj_l(linear attention over the marginal image key
blocks, or every image key with `linear_keys: all`); text queries attend to every key by softmax (CLEAR's
rule) and get no linear part.

Inheritance: the family's adapter uses the attention module's own projections and norms; the core adds only
proj_l.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from dit_graft.kernels import sla_attention, sla_block_index
from dit_graft.kernels._dispatch import use_triton
from dit_graft.kernels.block_sparse.index import keep_count
from dit_graft.kernels.sla import triton_gap
from dit_graft.model.attention import AttentionCore, AttentionNeeds
from dit_graft.model.layout import TokenLayout
from dit_graft.operators.base import (
    Case,
    Operator,
    Options,
    Site,
    attention_pairs_flops,
    block_share,
    register,
)


class SlaOptions(Options):
    """Options of the `sla` operator."""

    block: Literal[16, 32, 64, 128] = 64
    key_block: Literal[16, 32, 64, 128] | None = Field(default=None, description="key block size (None: block)")
    critical: int | float = Field(default=0.05, description="critical key blocks per query block: fraction or count")
    negligible: int | float = Field(default=0.1, description="skipped key blocks per query block: fraction or count")
    feature_map: Literal["relu", "elu1", "softmax"] = "relu"
    linear_keys: Literal["marginal", "all"] = Field(
        default="marginal", description="the linear part's keys: the marginal blocks (paper, SLA-1) or all (main)"
    )
    proj_bias: bool = Field(default=False, description="proj_l has a (zero-initialised) bias, as thu-ml's releases")
    eps: float = Field(default=1e-6, gt=0)

    @field_validator("critical", "negligible", mode="before")
    @classmethod
    def _no_bool(cls, value, info):
        return block_share(info.field_name, value) if isinstance(value, bool) else value  # before True reads as 1

    @field_validator("critical", "negligible")
    @classmethod
    def _share_range(cls, value: int | float, info) -> int | float:
        return block_share(info.field_name, value, zero_ok=info.field_name == "negligible")

    @model_validator(mode="after")
    def _negligible_needs_marginal(self):
        if self.linear_keys == "all" and self.negligible != 0:
            raise ValueError(
                f"negligible: {self.negligible} has no effect with linear_keys: all (the linear part covers every "
                "key); set negligible: 0"
            )
        return self


def critical_blocks(critical: int | float, n_blocks: int) -> int:
    """Key blocks per query block, counted exactly as the kernel counts them (a count, or ⌈fraction · n⌉ ≥ 1)."""
    return keep_count(critical, n_blocks)


def _joint_map(image: torch.Tensor, layout: TokenLayout, block: int, fill: bool) -> torch.Tensor | None:
    """An image-block map extended over text blocks (kept when fill, else dropped); None unless T is whole blocks."""
    t = layout.text
    if t % block:
        return None
    tb = t // block
    out = image.new_full((*image.shape[:-2], tb + image.shape[-2], tb + image.shape[-1]), fill)
    out[..., tb:, tb:] = image
    return out


class SlaCore(AttentionCore):
    """Sparse-linear attention on [B, H, N, d]: o_sparse + proj_l(o_linear) (image blocks; text rows dense)."""

    op = "sla"

    def __init__(self, head_dim: int, options: SlaOptions) -> None:
        super().__init__(options)
        self.block = options.block
        self.key_block = options.key_block or options.block
        self.critical = options.critical
        self.negligible = options.negligible
        self.feature_map = options.feature_map
        self.linear_keys = options.linear_keys
        self.eps = options.eps
        self.proj_l = nn.Linear(head_dim, head_dim, bias=options.proj_bias)
        nn.init.zeros_(self.proj_l.weight)
        if self.proj_l.bias is not None:
            nn.init.zeros_(self.proj_l.bias)

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        if key_mask is not None or layout.is_cross:
            raise ValueError("the sla operator takes no key mask and no cross-attention")
        t = layout.text
        critical, marginal = sla_block_index(
            q[:, :, t:], k[:, :, t:], self.block, self.critical, self.negligible, key_block=self.key_block
        )  # (B, H, n_q, n_k) over the image tokens
        args = (self.block, self.feature_map, self.eps)
        kwargs = {"key_block": self.key_block, "linear_keys": self.linear_keys}
        joint = None
        if t and self.linear_keys == "marginal" and not triton_gap(q, v, self.block, self.key_block):
            joint = _joint_map(critical, layout, self.block, True), _joint_map(marginal, layout, self.block, False)
        if joint is not None and joint[0] is not None and use_triton("sla", q, k, v):
            # Text filling whole blocks: one joint map per part on the Triton kernels (text blocks critical for
            # every query block, never marginal), the same computation as the text prefix below.
            o_sparse, o_linear = sla_attention(q, k, v, *joint, *args, **kwargs)
        else:
            o_sparse, o_linear = sla_attention(q, k, v, critical, marginal, *args, **kwargs, text=t, fallback=True)
        if t == 0:
            return o_sparse + self.proj_l(o_linear)
        o_image = o_sparse[:, :, t:] + self.proj_l(o_linear[:, :, t:])  # text rows get no linear part
        return torch.cat([o_sparse[:, :, :t], o_image.to(o_sparse.dtype)], dim=2)


def sla_flops(site: Site, tokens: int, options: SlaOptions) -> int:
    """Critical blocks + block scores + the linear part's states, state sums, read-out and proj_l (module doc)."""
    c = site.dim
    d = c // site.heads
    key_block = options.key_block or options.block
    n_q, n_k = math.ceil(tokens / options.block), math.ceil(tokens / key_block)
    keys = min(tokens, critical_blocks(options.critical, n_k) * key_block)
    sparse = attention_pairs_flops(tokens * keys, c) + 2 * n_q * n_k * c
    sums = 2 * n_q * n_k * (d + 1) * c if options.linear_keys == "marginal" else 0
    linear = 2 * tokens * d * c + sums + 2 * tokens * d * c + 2 * tokens * c
    return sparse + linear + 2 * tokens * d * c


register(
    Operator(
        name="sla",
        site="attention",
        summary="Sparse-linear: softmax on the critical key blocks, linear attention on the marginal ones (or all "
        "keys), skip the rest; zero-init proj_l; inherited q/k/v/out (SLA; thu-ml's releases as options).",
        options=SlaOptions,
        core=lambda site, options: SlaCore(site.dim // site.heads, options),
        needs=AttentionNeeds(text=("none", "prefix")),
        paper="SLA (Zhang et al. 2025)",
        flops=sla_flops,
        cases=(
            Case({"block": 16, "critical": 1.0}, exact=True),
            Case({"block": 16, "critical": 1, "negligible": 0}),
            Case(
                {
                    "block": 32,
                    "key_block": 16,
                    "critical": 0.3,
                    "negligible": 0,
                    "feature_map": "softmax",
                    "proj_bias": True,
                }
            ),
            Case(
                {
                    "block": 32,
                    "key_block": 16,
                    "critical": 0.3,
                    "negligible": 0,
                    "feature_map": "softmax",
                    "linear_keys": "all",
                    "proj_bias": True,
                    "eps": 1e-5,
                }
            ),
        ),
    )
)
