"""Operators: each module registers itself in OPERATORS on import."""

from dit_graft.operators import (  # noqa: F401
    conv_mlp,
    gated_conv,
    linear,
    local,
    mlp_ratio,
    moe,
    parallel_blocks,
    prune_depth,
    sla,
    softmax,
    sparse,
    swa,
    tile,
)
from dit_graft.operators.base import OPERATORS, Case, Operator, Options, Site, TokenGrid, UnsupportedOperator

__all__ = ["OPERATORS", "Case", "Operator", "Options", "Site", "TokenGrid", "UnsupportedOperator"]
