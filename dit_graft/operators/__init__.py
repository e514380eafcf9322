"""Operators, one module each (`dit_graft.operators.<name>`), registered in OPERATORS when imported.

`dit_graft.builtin` imports every bundled operator module; this package's `__init__` re-exports only the
registry API from `operators.base`, which imports no operator module, so no operator import runs another.
"""

from dit_graft.operators.base import OPERATORS, Case, Operator, Options, Site, TokenGrid, UnsupportedOperator

__all__ = ["OPERATORS", "Case", "Operator", "Options", "Site", "TokenGrid", "UnsupportedOperator"]
