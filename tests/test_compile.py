"""torch.compile(fullgraph=True): every operator's module, and depth-edited and MoE students, compile without a
graph break and compute what they compute eagerly.

The default run traces with the `aot_eager` backend (dynamo and AOTAutograd: a graph break fails `fullgraph`
whatever the backend, and the traced graph is what runs), one grafted module per operator and case on the
tiny DiT; `-m slow` adds every family and inductor's generated code on whole students.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dit_graft.errors import RecipeError
from dit_graft.families import FAMILIES
from dit_graft.operators import OPERATORS
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from tests.contract import tiny_model

BACKEND = "aot_eager"
FAMILY_NAMES = sorted(FAMILIES)
MODULE_OPERATORS = sorted(name for name, op in OPERATORS.items() if op.site in ("attention", "mlp"))
DEPTH_OPERATORS = sorted(name for name, op in OPERATORS.items() if op.site == "depth")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.sample if hasattr(out, "sample") else out


def _student(family_name: str, graft: list[dict]):
    teacher = tiny_model(family_name)
    return apply(teacher, plan(teacher, validate({"model": {"source": "unused"}, "graft": graft})))


def _calls(family, model, paths: list[str], inputs) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each module at `paths` is first called with in one eager forward."""
    seen: dict[str, tuple[tuple, dict]] = {}

    def hook(path):
        def record(module, args, kwargs):
            seen.setdefault(path, (args, kwargs))

        return record

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in paths]
    with torch.no_grad():
        family.forward(model, inputs["x"], inputs["t"], inputs["cond"])
    for h in handles:
        h.remove()
    return seen


def assert_module_compiles(family_name: str, op_name: str, options: dict, backend: str = BACKEND) -> int:
    """Grafts `op_name` on the first block group that takes it; each grafted module compiles with fullgraph
    and gives its eager output (relative error ≤ 1e-5). Returns how many modules were checked (0: refused)."""
    family = FAMILIES.get(family_name)
    op = OPERATORS.get(op_name)
    teacher = tiny_model(family_name)
    groups = [g for g in family.groups if any(s.group == g and s.kind == op.site for s in family.sites(teacher))]
    for group in groups:
        edit = {"site": op.site, "group": group, "layers": [0], "op": op_name, "options": options}
        try:
            student = _student(family_name, [edit])
        except RecipeError:
            continue  # refused at plan time, with its reason (the contract suite checks the reason)
        inputs = family.tiny_inputs(student)
        paths = [
            m.path
            for e in plan(teacher, validate({"model": {"source": "u"}, "graft": [edit]})).edits
            for m in e.modules
        ]
        calls = _calls(family, student, paths, inputs)
        for path, (args, kwargs) in calls.items():
            module = student.get_submodule(path)
            torch._dynamo.reset()
            with torch.no_grad():
                eager = _first(module(*args, **kwargs))
                compiled = _first(torch.compile(module, fullgraph=True, backend=backend)(*args, **kwargs))
            assert _rel(compiled, eager) <= 1e-5, (family_name, group, op_name, options, path)
        assert calls, f"{op_name} on {family_name} {group}: no grafted module ran"
        return len(calls)
    return 0


def assert_student_compiles(family_name: str, graft: list[dict], backend: str = BACKEND, regional=False) -> None:
    """The student compiles in place with fullgraph (whole, or block by block as `eval --compile` does) and gives
    its eager output (relative error ≤ 1e-5)."""
    from dit_graft.evaluate import compile_models

    family = FAMILIES.get(family_name)
    student = _student(family_name, graft)
    inputs = family.tiny_inputs(student)
    with torch.no_grad():
        eager = family.forward(student, inputs["x"], inputs["t"], inputs["cond"])
        compiled_student = copy.deepcopy(student)
        torch._dynamo.reset()
        if regional:
            compile_models(backend, compiled_student)
        else:
            compiled_student.compile(fullgraph=True, backend=backend)
        compiled = family.forward(compiled_student, inputs["x"], inputs["t"], inputs["cond"])
    assert _rel(compiled, eager) <= 1e-5, (family_name, graft)


@pytest.mark.parametrize("op_name", MODULE_OPERATORS)
def test_every_operator_module_compiles(op_name):
    """On the DiT, or on the first family that takes the operator (tile needs Wan's 3-D grid)."""
    for family_name in ["dit", *FAMILY_NAMES]:
        cases = [c for c in OPERATORS.get(op_name).cases if not c.only or family_name in c.only]
        if sum(assert_module_compiles(family_name, op_name, case.options) for case in cases):
            return
    assert op_name == "softmax", f"{op_name}: no family took it"


DEPTH_OPTIONS = {"prune_depth": {"keep": 1}}  # options for the 2-block tiny DiT (default: the operator's own)


@pytest.mark.parametrize("op_name", DEPTH_OPERATORS)
def test_depth_edited_students_compile(op_name):
    assert_student_compiles("dit", [{"site": "depth", "op": op_name, "options": DEPTH_OPTIONS.get(op_name, {})}])


def test_moe_student_compiles():
    graft = [
        {"site": "mlp", "op": "moe", "options": {"experts": 2, "top_k": 1, "shared": 1}},
        {"site": "depth", "op": "prune_depth", "options": {"keep": 1}},
    ]
    assert_student_compiles("dit", graft)


def test_flux_moe_and_parallel_student_compiles_block_by_block():
    graft = [
        {"site": "mlp", "group": "double", "op": "moe", "options": {"experts": 2, "top_k": 1}},
        {"site": "depth", "group": "single", "op": "parallel_blocks", "options": {}},
    ]
    assert_student_compiles("flux", graft, regional=True)


@pytest.mark.slow
@pytest.mark.parametrize("family_name", FAMILY_NAMES)
@pytest.mark.parametrize("op_name", MODULE_OPERATORS)
def test_every_operator_module_compiles_on_every_family(family_name, op_name):
    for case in OPERATORS.get(op_name).cases:
        assert_module_compiles(family_name, op_name, case.options)


@pytest.mark.slow
@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_students_compile_with_inductor(family_name):
    family = FAMILIES.get(family_name)
    teacher = tiny_model(family_name)
    group = family.groups[0]
    graft = [{"site": "mlp", "group": group, "op": "moe", "options": {"experts": 2, "top_k": 1}}]
    attention = {"site": "attention", "group": group, "op": "linear", "options": {}}
    try:
        plan(teacher, validate({"model": {"source": "u"}, "graft": [attention]}))
        graft.append(attention)
    except RecipeError:
        pass
    if family.depth_groups:
        graft.append(
            {"site": "depth", "group": family.depth_groups[0].name, "op": "prune_depth", "options": {"keep": 1}}
        )
    assert_student_compiles(family_name, graft, backend="inductor", regional=True)


def test_eval_compiles_student_and_teacher_side_by_side():
    from dit_graft.evaluate import evaluate

    teacher = copy.deepcopy(tiny_model("dit"))
    student = _student("dit", [{"site": "attention", "op": "linear"}, {"site": "mlp", "op": "prune_width"}])
    report, s, t = evaluate(student, teacher, 2, 2, 1.0, batch=2, compile=BACKEND)
    eager, se, te = evaluate(
        _student("dit", [{"site": "attention", "op": "linear"}, {"site": "mlp", "op": "prune_width"}]),
        copy.deepcopy(tiny_model("dit")),
        2,
        2,
        1.0,
        batch=2,
    )
    assert report["compiled"] == BACKEND and eager["compiled"] is None
    assert report["latency_ratio"] is not None and any("torch.compile" in n for n in report["notes"])
    assert _rel(s.images, se.images) <= 1e-5 and _rel(t.images, te.images) <= 1e-5


@pytest.mark.slow
def test_cli_eval_compile_reports_compiled_student_and_teacher(tmp_path, capsys):
    import json

    from dit_graft.export import export
    from tests.test_cli import run_cli

    teacher = tiny_model("dit")
    teacher.save_pretrained(tmp_path / "teacher")
    recipe = validate({"model": {"source": "unused"}, "graft": [{"site": "mlp", "op": "moe"}]})
    graft_plan = plan(teacher, recipe)
    export(apply(teacher, graft_plan), graft_plan, recipe.model_dump(), tmp_path / "student")
    args = ["eval", tmp_path / "student", "--teacher", tmp_path / "teacher", "--samples", 2, "--steps", 2]
    code, out, err = run_cli([*args, "--batch", 2, "--compile", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["compiled"] == "inductor" and report["latency_ratio"] > 0
