"""Registers every bundled operator and family: importing a module registers it in OPERATORS or FAMILIES.

The root package imports this module, so any `import dit_graft...` finds the registries full. Add a new
operator or family module here (docs/extending.md).
"""

from dit_graft.families import dit, dit_original, flux, pixart, wan  # noqa: F401
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
