"""`sparse`: top-k block-sparse softmax attention (SLA's critical blocks, Zhang et al. 2025; VSA; LLSA's level 1).

Tokens are cut into consecutive blocks of b = `block` tokens (the last block is short when b does
not divide N). For query block I and key block J, with q̄_I and k̄_J the means of their q and k rows,

    score(I, J) = q̄_I · k̄_J,   K(I) = the `keep` key blocks J with the highest score(I, J)
    o_i = Σ_{j ∈ K(I(i))} softmax_j(q_i·k_j / √d) v_j                 (exact softmax over the kept blocks)

per head. `keep` is a fraction of the ⌈N/b⌉ key blocks when a float in (0, 1] (rounded up, at least
one) or a count of blocks when an int ≥ 1 (capped at ⌈N/b⌉): `keep: 1.0` keeps every block — softmax
attention — while `keep: 1` keeps one. Block selection runs without gradients.

The processor calls only the public kernels: `dit_graft.kernels.topk_block_index` picks the blocks and
`dit_graft.kernels.block_sparse_attention` attends (Triton on CUDA; elsewhere the PyTorch reference,
which computes densely and masks). Off CUDA the reference materialises [B, h, N, N] scores, so the
processor calls it a few heads at a time (at most 2²⁸ scores per call); the result is the same.

FLOPs (the operator's formula): 4·N·min(N, k·b)·C for the kept pairs (every kept block counted as
full), plus 2·⌈N/b⌉²·C for the pooled block scores.

Inheritance: the processor uses the Attention's own to_q/to_k/to_v/to_out (and norm_q/norm_k when
present), so every teacher weight is kept; it adds no parameters.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import field_validator
from torch import nn

from dit_graft.kernels import block_sparse_attention, topk_block_index
from dit_graft.kernels.block_sparse.index import keep_count
from dit_graft.operators.base import (
    Operator,
    Options,
    Site,
    attention_output,
    attention_pairs_flops,
    block_share,
    check_self_attention,
    register,
    self_attention_qkv,
)

# Scores one call of the dense reference may hold (2²⁸ fp32 = 1 GiB); the Triton kernel holds none.
REFERENCE_SCORES = 2**28


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


class SparseAttnProcessor(nn.Module):
    """Top-k block-sparse softmax self-attention with the Attention's projections."""

    def __init__(self, options: SparseOptions) -> None:
        super().__init__()
        self.block = options.block
        self.keep = options.keep

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q, k, v = self_attention_qkv(attn, hidden_states, encoder_hidden_states, attention_mask, "sparse")
        b, h, n, _ = q.shape
        index = topk_block_index(q, k, self.block, self.keep)  # (B, H, ⌈N/b⌉, ⌈N/b⌉) bool
        step = h if q.is_cuda else max(1, REFERENCE_SCORES // (b * n * n))
        o = torch.cat(
            [
                block_sparse_attention(
                    q[:, s : s + step], k[:, s : s + step], v[:, s : s + step], index[:, s : s + step], self.block
                )
                for s in range(0, h, step)
            ],
            dim=1,
        )  # (B, H, N, d)
        return attention_output(attn, o, q.dtype)


def build_sparse(old: nn.Module, site: Site, options: SparseOptions) -> SparseAttnProcessor:
    check_self_attention(old, "sparse")
    return SparseAttnProcessor(options)


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
        build=build_sparse,
        paper="SLA (Zhang et al. 2025), critical blocks; VSA; LLSA",
        flops=sparse_flops,
    )
)
