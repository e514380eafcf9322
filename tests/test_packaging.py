"""Packaging: every subpackage is listed in pyproject (kernels/ maps to dit_graft.kernels)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for top, name in (("dit_graft", "dit_graft"), ("kernels", "dit_graft.kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


def test_kernels_import_under_the_package_name_only():
    import dit_graft.kernels

    assert Path(dit_graft.kernels.__file__).parent == ROOT / "kernels"
