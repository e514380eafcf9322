"""`softmax`: the teacher's own softmax attention, so a recipe can say "keep this layer" explicitly.

FLOPs of the attention core: 4·N²·C (q·kᵀ and P·v, N² pairs, C = H·d channels).
"""

from __future__ import annotations

from dit_graft.operators.base import Operator, Options, Site, attention_pairs_flops, register


class SoftmaxOptions(Options):
    """No options: the attention module is kept as it is."""


def softmax_flops(site: Site, tokens: int, options: SoftmaxOptions) -> int:
    """4·N²·C: every query-key pair."""
    return attention_pairs_flops(tokens * tokens, site.dim)


register(
    Operator(
        name="softmax",
        site="attention",
        summary="Keep the teacher's exact softmax attention (identity operator).",
        options=SoftmaxOptions,
        build=lambda old, site, options: None,
        paper="Vaswani et al. 2017",
        flops=softmax_flops,
    )
)
