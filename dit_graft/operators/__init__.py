"""Operators: each module registers itself in OPERATORS on import."""

from dit_graft.operators import conv_mlp, gated_conv, linear, local, mlp_ratio, sla, softmax, sparse, swa  # noqa: F401
from dit_graft.operators.base import OPERATORS, Operator, Options, Site, TokenGrid

__all__ = ["OPERATORS", "Operator", "Options", "Site", "TokenGrid"]
