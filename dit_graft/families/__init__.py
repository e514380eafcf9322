"""Family adapters: each module registers itself in FAMILIES on import."""

from dit_graft.families import dit  # noqa: F401
from dit_graft.families.base import FAMILIES, Family, count_flops, family_for, family_for_class, param_count

__all__ = ["FAMILIES", "Family", "count_flops", "family_for", "family_for_class", "param_count"]
