"""Family adapters: each module registers itself in FAMILIES on import."""

from dit_graft.families import dit, dit_original, flux, pixart, wan  # noqa: F401
from dit_graft.families.base import (
    FAMILIES,
    Conditions,
    Family,
    FamilySite,
    all_groups,
    count_flops,
    family_for,
    family_for_class,
    param_count,
)

__all__ = [
    "FAMILIES",
    "Conditions",
    "Family",
    "FamilySite",
    "all_groups",
    "count_flops",
    "family_for",
    "family_for_class",
    "param_count",
]
