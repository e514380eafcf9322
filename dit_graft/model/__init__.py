"""The bottom layer: what families and operators share, depending on neither.

Sites, token grids and layouts, block groups and streams, conditions, the attention adapter/core interface,
the abstract `Family` and its registry, and the checkpoint-layout registry. Imports torch, diffusers,
safetensors, accelerate and dit_graft's leaf modules (errors, registry) only.
"""

from dit_graft.model.attention import (
    AttentionAdapter,
    AttentionCore,
    AttentionNeeds,
    AttnContext,
    GraftedAttnProcessor,
    from_heads,
    to_heads,
)
from dit_graft.model.checkpoints import LAYOUTS, CheckpointLayout, detect_layout, register_layout
from dit_graft.model.conditions import (
    Conditions,
    cat_conditions,
    conditions_to,
    drop_to_null,
    expand_null,
    num_conditions,
    take_rows,
)
from dit_graft.model.family import (
    FAMILIES,
    Family,
    all_groups,
    count_flops,
    family_for,
    family_for_class,
    param_count,
    register_family,
)
from dit_graft.model.layout import TokenLayout
from dit_graft.model.site import AttentionCaps, BlockGroup, Site, Streams, TokenGrid, block_paths

__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "AttentionAdapter",
    "AttentionCaps",
    "AttentionCore",
    "AttentionNeeds",
    "AttnContext",
    "BlockGroup",
    "CheckpointLayout",
    "Conditions",
    "Family",
    "GraftedAttnProcessor",
    "Site",
    "Streams",
    "TokenGrid",
    "TokenLayout",
    "all_groups",
    "block_paths",
    "cat_conditions",
    "conditions_to",
    "count_flops",
    "detect_layout",
    "drop_to_null",
    "expand_null",
    "family_for",
    "family_for_class",
    "from_heads",
    "num_conditions",
    "param_count",
    "register_family",
    "register_layout",
    "take_rows",
    "to_heads",
]
