"""`softmax`: the teacher's own softmax attention, so a recipe can say "keep this layer" explicitly."""

from __future__ import annotations

from dit_graft.operators.base import Operator, Options, register


class SoftmaxOptions(Options):
    """No options: the attention module is kept as it is."""


register(
    Operator(
        name="softmax",
        site="attention",
        summary="Keep the teacher's exact softmax attention (identity operator).",
        options=SoftmaxOptions,
        build=lambda old, site, options: None,
        paper="Vaswani et al. 2017",
    )
)
