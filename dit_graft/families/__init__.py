"""Family adapters, one module each (`dit_graft.families.<name>`), registered in FAMILIES when imported.

`dit_graft.builtin` imports every bundled family module; this package's `__init__` re-exports only the registry
API from `families.base`, which imports no family module, so no family import runs another.
"""

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
