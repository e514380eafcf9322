"""`sparse`: top-k block-sparse softmax attention (SLA's critical blocks, Zhang et al. 2025; VSA; LLSA's level 1).

Tokens are cut into consecutive blocks of b = `block` tokens (the last block is short when b does
not divide N). For query block I and key block J, with q̄_I and k̄_J the means of their q and k rows,

    score(I, J) = q̄_I · k̄_J,   K(I) = the `keep` key blocks J with the highest score(I, J)
    o_i = Σ_{j ∈ K(I(i))} softmax_j(q_i·k_j / √d) v_j                 (exact softmax over the kept blocks)

per head. `keep` is a fraction of the ⌈N/b⌉ key blocks when a float in (0, 1] (rounded up, at least
one) or a count of blocks when an int ≥ 1 (capped at ⌈N/b⌉): `keep: 1.0` keeps every block — softmax
attention — while `keep: 1` keeps one. Block selection runs without gradients.

The core calls only the public kernels: `dit_graft.kernels.topk_block_index` picks the blocks and
`dit_graft.kernels.block_sparse_attention` attends (Triton on CUDA; elsewhere its bounded-memory PyTorch
path, which gathers each query block's kept key blocks, chunked: memory grows with the kept blocks, not
N²; DIT_GRAFT_KERNELS=naive forces the dense reference).

FLOPs (the operator's formula): 4·N·min(N, k·b)·C for the kept pairs (every kept block counted as
full), plus 2·⌈N/b⌉²·C for the pooled block scores.

With a text prefix (FLUX's joint attention) the blocks are cut from the first image token; image query blocks
attend with one softmax over the T text keys plus their `keep` best image key blocks, text queries over every
key (CLEAR's rule). On the Triton path, when T is a multiple of b, one joint block map covers the sequence
(`TokenLayout.block_map`); otherwise the kernel's PyTorch path takes the prefix itself (`text=T`: text keys
prepended to every query block's gathered keys, text rows dense in chunks).

Inheritance: the family's adapter uses the attention module's own projections and norms, so every teacher
weight is kept; the core adds no parameters.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import field_validator

from dit_graft.kernels import block_sparse_attention, topk_block_index
from dit_graft.kernels._checks import head_dim_over
from dit_graft.kernels._dispatch import use_triton
from dit_graft.kernels.block_sparse import MAX_TRITON_HEAD_DIM
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
    register,
)


class SparseOptions(Options):
    """Options of the `sparse` operator."""

    block: Literal[16, 32, 64, 128] = 64
    keep: int | float = 0.25

    @field_validator("keep", mode="before")
    @classmethod
    def _no_bool(cls, keep):
        return block_share("keep", keep) if isinstance(keep, bool) else keep  # before pydantic reads True as 1

    @field_validator("keep")
    @classmethod
    def _keep_range(cls, keep: int | float) -> int | float:
        return block_share("keep", keep)


def kept_blocks(keep: int | float, n_blocks: int) -> int:
    """Key blocks per query block, counted exactly as the kernel counts them (a count, or ⌈fraction · n⌉ ≥ 1)."""
    return keep_count(keep, n_blocks)


class SparseCore(AttentionCore):
    """Top-k block-sparse softmax attention on [B, H, N, d] (image blocks; text rows and keys dense)."""

    op = "sparse"

    def __init__(self, options: SparseOptions) -> None:
        super().__init__(options)
        self.block = options.block
        self.keep = options.keep

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        if key_mask is not None or layout.is_cross:
            raise ValueError("the sparse operator takes no key mask and no cross-attention")
        t = layout.text
        index = topk_block_index(q[:, :, t:], k[:, :, t:], self.block, self.keep)  # (B, H, nb, nb) bool
        return text_block_sparse(q, k, v, layout, index, self.block, "sparse")


def text_block_sparse(q, k, v, layout: TokenLayout, index, block: int, op: str):
    """block_sparse_attention over the image blocks `index` keeps, CLEAR's rule with a text prefix: one joint block
    map on the Triton path when the text fills whole blocks, else the kernel's own text prefix (bounded memory)."""
    t = layout.text
    if t:
        joint = layout.block_map(index, block)
        if joint is not None and use_triton(op, q, k, v, unsupported=head_dim_over(MAX_TRITON_HEAD_DIM, q, v)):
            return block_sparse_attention(q, k, v, joint, block)
    return block_sparse_attention(q, k, v, index, block, text=t, fallback=True)


def sparse_flops(site: Site, tokens: int, options: SparseOptions) -> int:
    """4·N·min(N, k·b)·C for the kept blocks + 2·⌈N/b⌉²·C for the block scores."""
    n_blocks = math.ceil(tokens / options.block)
    keys = min(tokens, kept_blocks(options.keep, n_blocks) * options.block)
    return attention_pairs_flops(tokens * keys, site.dim) + 2 * n_blocks * n_blocks * site.dim


register(
    Operator(
        name="sparse",
        site="attention",
        summary="Exact softmax over the top-k key blocks per query block (mean-pooled q·k); inherited q/k/v/out.",
        options=SparseOptions,
        core=lambda site, options: SparseCore(options),
        needs=AttentionNeeds(text=("none", "prefix")),
        paper="SLA (Zhang et al. 2025), critical blocks; VSA; LLSA",
        flops=sparse_flops,
        cases=(Case({"block": 16, "keep": 1.0}, exact=True), Case({"block": 16, "keep": 1})),
    )
)
