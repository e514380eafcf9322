"""`softmax`: the teacher's own softmax attention, so a recipe can say "keep this layer" explicitly.

It installs the site's stock processor (the family's `stock_processor`: diffusers' SDPA processor, FLUX's
joint one), so a `softmax` site computes exactly what the teacher computes. `SoftmaxCore` is the same attention
as a core on [B, H, N, d] (the dense reference of the contract tests and the full-coverage form of every masked
operator): one SDPA over every key, the keys a key mask drops excluded.

FLOPs of the attention core: 4·N²·C (q·kᵀ and P·v, N² pairs, C = H·d channels); with a text prefix, 4·L²·C.
"""

from __future__ import annotations

import torch.nn.functional as F

from dit_graft.model.attention import AttentionCore
from dit_graft.operators.base import Case, Operator, Options, Site, attention_pairs_flops, key_bias, register


class SoftmaxOptions(Options):
    """No options: the attention module is kept as it is."""


class SoftmaxCore(AttentionCore):
    """Exact softmax attention over every key (the keys `key_mask` keeps)."""

    op = "softmax"

    def forward(self, q, k, v, layout, key_mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias(key_mask))


def softmax_flops(site: Site, tokens: int, options: SoftmaxOptions) -> int:
    """4·N²·C: every query-key pair."""
    return attention_pairs_flops(tokens * tokens, site.dim)


register(
    Operator(
        name="softmax",
        site="attention",
        summary="Keep the teacher's exact softmax attention (identity operator).",
        options=SoftmaxOptions,
        paper="Vaswani et al. 2017",
        flops=softmax_flops,
        cases=(Case(exact=True),),
    )
)
