"""Re-exports of the model layer under their older names (the family interface now lives in dit_graft.model).

`Family` is the abstract class in `dit_graft.model.family`; sites, block groups and conditions helpers are in
`dit_graft.model.site` and `dit_graft.model.conditions`. This module adds nothing and imports nothing above the
model layer.
"""

from __future__ import annotations

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
from dit_graft.model.site import Site, block_paths

FamilySite = Site  # sites name their block group themselves now

__all__ = [
    "FAMILIES",
    "Conditions",
    "Family",
    "FamilySite",
    "Site",
    "all_groups",
    "block_paths",
    "cat_conditions",
    "conditions_to",
    "count_flops",
    "drop_to_null",
    "expand_null",
    "family_for",
    "family_for_class",
    "num_conditions",
    "param_count",
    "register_family",
    "take_rows",
]
