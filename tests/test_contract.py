"""Contract tests generated from the registries: every operator × every family (see tests/contract.py)."""

from __future__ import annotations

import pytest

from dit_graft.families import FAMILIES
from dit_graft.operators import OPERATORS
from tests.contract import groups_with, run_contract, tiny_model

GRAFT_OPERATORS = [name for name, op in OPERATORS.items() if op.site in ("attention", "mlp")]


@pytest.mark.parametrize("family", [name for name, _ in FAMILIES.items()])
def test_every_family_has_a_tiny_config_with_graftable_sites(family):
    model = tiny_model(family)
    assert groups_with(family, "attention"), f"{family}: no attention sites"
    assert sum(p.numel() for p in model.parameters()) < 200_000  # tiny: the suite stays fast on a CPU


@pytest.mark.parametrize("op", GRAFT_OPERATORS)
@pytest.mark.parametrize("family", [name for name, _ in FAMILIES.items()])
def test_operator_runs_or_is_refused_with_a_reason(family, op, tmp_path):
    outcomes = run_contract(family, op, tmp_path)
    if OPERATORS.get(op).site == "attention" and op == "softmax":
        assert all(o.refused is None for o in outcomes), outcomes  # the teacher's attention fits every site


def test_the_refusals_are_the_declared_ones(tmp_path):
    """Where the registries say an operator cannot go, the suite sees a refusal (and nowhere else)."""
    flux = {o.group: o.refused for o in run_contract("flux", "gated_conv", tmp_path)}
    assert all(reason and "no keys" in reason for reason in flux.values()), flux
    dit = run_contract("dit", "gated_conv", tmp_path)
    assert all(o.refused is None for o in dit)
    pixart = {(o.group, str(o.options)): o.refused for o in run_contract("pixart", "local", tmp_path)}
    assert all(r is None for (g, _), r in pixart.items() if g == "self")
    assert all(r and "cross-attention" in r for (g, _), r in pixart.items() if g == "cross")
