"""The contract suite, generated from the registries: every operator × every family's tiny model.

For each family (its `tiny_config()`), each block group with sites of the operator's kind, and each of the
operator's declared `cases`, an operator either

- is refused at plan time with its reason (a RecipeError naming the operator and why), or
- plans, applies and runs: the student's output has the teacher's shape; where the case is `exact` (full
  coverage), it equals the teacher's output; the export reloads (`dit_graft.from_pretrained`) to a model whose
  output is bitwise the student's.

Used by tests/test_contract.py (every registered operator) and by the extension test (a toy operator from a
temporary module).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import dit_graft
from dit_graft.errors import RecipeError
from dit_graft.export import export
from dit_graft.families import FAMILIES
from dit_graft.model.io import build_from_config
from dit_graft.operators import OPERATORS
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate

_MODELS: dict[str, torch.nn.Module] = {}


def tiny_model(family_name: str) -> torch.nn.Module:
    """The family's tiny model, seeded, with every all-zero weight (adaLN-Zero gates, zero-init outputs) made
    small and random so that every block matters; cached (callers do not modify it: `apply` copies)."""
    if family_name not in _MODELS:
        torch.manual_seed(0)
        model = build_from_config(FAMILIES.get(family_name).tiny_config())
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.05)
        _MODELS[family_name] = model.eval()
    return _MODELS[family_name]


@dataclass
class Outcome:
    family: str
    group: str
    op: str
    options: dict
    refused: str | None = None  # the reason, when refused at plan time
    exact: bool = False


def groups_with(family_name: str, kind: str) -> list[str]:
    family = FAMILIES.get(family_name)
    model = tiny_model(family_name)
    return [g for g in family.groups if any(s.group == g and s.kind == kind for s in family.sites(model))]


def _recipe(group: str, op: str, options: dict):
    edit = {"site": OPERATORS.get(op).site, "group": group, "layers": "all", "op": op, "options": options}
    return validate({"model": {"source": "unused"}, "graft": [edit]})


def _forward(family, model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return family.forward(model, inputs["x"], inputs["t"], inputs["cond"])


def run_contract(family_name: str, op_name: str, out: Path) -> list[Outcome]:
    """Runs every case of `op_name` on every block group of `family_name` that has sites of its kind."""
    family = FAMILIES.get(family_name)
    op = OPERATORS.get(op_name)
    teacher = tiny_model(family_name)
    inputs = family.tiny_inputs(teacher)
    reference = _forward(family, teacher, inputs)
    outcomes = []
    exported = False
    for group in groups_with(family_name, op.site):
        for case in op.cases:
            if not case.applies(family_name, group):
                continue
            outcome = Outcome(family_name, group, op_name, case.options, exact=case.exact)
            outcomes.append(outcome)
            try:
                graft_plan = plan(teacher, _recipe(group, op_name, case.options))
            except RecipeError as e:
                message = str(e)
                assert f"{op_name!r}" in message or "options" in message, message
                reason = message.split(": ", 1)[-1]
                assert len(reason) > 10, f"refused without a reason: {message}"
                outcome.refused = reason
                continue
            student = apply(teacher, graft_plan)
            got = _forward(family, student, inputs)
            assert got.shape == reference.shape, (family_name, group, op_name, case)
            assert torch.isfinite(got).all(), (family_name, group, op_name, case)
            if case.exact:
                where = f"{family_name} {group} {op_name} {case.options}"
                torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
            if not exported:  # one export per (family, operator): bitwise reload
                exported = True
                path = export(student, graft_plan, {"model": {"source": "tiny"}}, out / f"{family_name}-{op_name}")
                reloaded = dit_graft.from_pretrained(path)
                assert torch.equal(_forward(family, reloaded, inputs), got), (family_name, op_name, "reload")
    return outcomes
