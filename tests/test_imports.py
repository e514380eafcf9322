"""The package's import structure: no import cycles (function-level imports included), the model layer at the
bottom, and no family named outside dit_graft/families/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dit_graft
from dit_graft.families import FAMILIES

ROOT = Path(dit_graft.__file__).parent
PACKAGE = "dit_graft"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement that can run: module level, in functions and classes; not under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The dit_graft modules an import statement executes: the named module, its packages, imported submodules.

    A module's own ancestor packages count too (an edge to `a.b` from `a.b.c`): a package `__init__` that imports
    its own modules, which import their siblings through it, is a cycle that only import order keeps working. So
    package `__init__`s re-export only from modules that import no sibling, and `dit_graft.builtin` (imported by
    the root package, which alone is left out) registers the operator and family modules.
    """
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        if not name:
            continue
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # the packages' __init__ run too
    return {t for t in out if t in MODULES and t != module and t != PACKAGE}


def import_graph() -> dict[str, set[str]]:
    return {m: _targets_of(m) for m in MODULES}


def _targets_of(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    return set().union(*(_targets(module, node) for node in _imports(tree)))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_walker_sees_function_level_imports_and_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    inner = ast.parse("def f():\n    from dit_graft.plan import apply\nif TYPE_CHECKING:\n    import dit_graft.cli\n")
    assert [_targets("dit_graft.loading", n) for n in _imports(inner)] == [{"dit_graft.plan"}]


def test_dit_graft_has_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


LOWER = {
    "dit_graft.model": {"dit_graft.model", "dit_graft.errors", "dit_graft.registry"},
    "dit_graft.operators": {"dit_graft.model", "dit_graft.operators", "dit_graft.errors", "dit_graft.registry"},
    "dit_graft.families": {
        "dit_graft.model",
        "dit_graft.families",
        "dit_graft.errors",
        "dit_graft.registry",
        "dit_graft.diffusion",
    },
}


# operators.prune_depth's learnable search lives in dit_graft.depth_search, which imports only the model layer
@pytest.mark.parametrize("layer", sorted(LOWER))
def test_the_model_layer_operators_and_families_import_nothing_above_them(layer):
    allowed = LOWER[layer]
    bad = []
    for module, targets in import_graph().items():
        if module == layer or module.startswith(layer + "."):
            for t in targets:
                learnable_search = layer == "dit_graft.operators" and t == "dit_graft.depth_search"
                if not any(t == a or t.startswith(a + ".") for a in allowed) and not learnable_search:
                    bad.append(f"{module} → {t}")
    assert not bad, ", ".join(sorted(bad))


# the modules that define a family or one of its checkpoint layouts (families/base.py and text.py are generic)
FAMILY_MODULES = {
    m
    for m, path in MODULES.items()
    if m.startswith("dit_graft.families.")
    and ("register_family(" in path.read_text() or "register_layout(" in path.read_text())
}


def _family_words() -> set[str]:
    words = set()
    for name, family in FAMILIES.items():
        words.add(name)
        words.update(family.classes)
    return words


def _family_tests(path: Path, words: set[str]) -> list[str]:
    """Where a file compares something with a family's name or class name, or imports one family's module."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for c in consts:
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value in words:
                        found.append(f"{path.name}:{node.lineno} compares with {c.value!r}")
        if isinstance(node, ast.ImportFrom) and node.module in FAMILY_MODULES:
            found.append(f"{path.name}:{node.lineno} imports {node.module}")
    return found


def test_the_family_name_test_finds_one():
    words = {"flux", "FluxTransformer2DModel"}
    probe = ROOT.parent / "tests" / "_probe_family_names.py"
    probe.write_text(
        "from dit_graft.families.flux import pack\nfrom dit_graft.families.base import take_rows\n"
        'if family != "flux" or type(m).__name__ in ("FluxTransformer2DModel",):\n    pass\n'
    )
    try:
        assert len(_family_tests(probe, words)) == 3
    finally:
        probe.unlink()


def test_no_family_is_named_outside_the_families():
    words = _family_words()
    found = []
    for module, path in sorted(MODULES.items()):
        if module.startswith("dit_graft.families"):
            continue
        found += _family_tests(path, words)
    assert not found, "family-specific code outside dit_graft/families/: " + "; ".join(found)
