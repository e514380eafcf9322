"""docs/extending.md kept honest: a toy operator from a temporary module goes through the contract suite."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from dit_graft.families import FAMILIES
from dit_graft.operators import OPERATORS
from tests.contract import run_contract

TOY = '''
"""A toy attention operator, written as docs/extending.md says: uniform attention over the keys it may see."""

import torch

from dit_graft.model.attention import AttentionCore, AttentionNeeds
from dit_graft.operators.base import Case, Operator, Options, attention_pairs_flops, register


class ToyOptions(Options):
    scale: float = 1.0


class ToyCore(AttentionCore):
    op = "toy_uniform"

    def __init__(self, options):
        super().__init__(options)
        self.gain = torch.nn.Parameter(torch.full((1,), options.scale))

    def forward(self, q, k, v, layout, key_mask=None):
        weights = torch.ones(q.shape[2], k.shape[2], dtype=v.dtype, device=v.device)
        if key_mask is not None:
            weights = weights * key_mask[:, None, :, None].transpose(-1, -2).to(v.dtype)
        weights = weights / weights.sum(-1, keepdim=True)
        return self.gain * (weights @ v)


register(
    Operator(
        name="toy_uniform",
        site="attention",
        summary="Uniform attention over every key (a test operator).",
        options=ToyOptions,
        core=lambda site, options: ToyCore(options),
        needs=AttentionNeeds(text=("none", "cross")),
        flops=lambda site, tokens, options: attention_pairs_flops(tokens * tokens, site.dim) // 2,
        cases=(Case({"scale": 1.0}), Case({"scale": 0.5})),
    )
)
'''


@pytest.fixture
def toy_operator(tmp_path):
    path = tmp_path / "toy_operator.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_operator", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_operator"] = module
    spec.loader.exec_module(module)
    try:
        yield OPERATORS.get("toy_uniform")
    finally:
        OPERATORS.unregister("toy_uniform")
        sys.modules.pop("toy_operator", None)


def test_a_toy_operator_from_a_temporary_module_runs_through_the_contract_suite(toy_operator, tmp_path):
    outcomes = [o for name, _ in FAMILIES.items() for o in run_contract(name, "toy_uniform", tmp_path / name)]
    ran = {(o.family, o.group) for o in outcomes if o.refused is None}
    refused = {(o.family, o.group): o.refused for o in outcomes if o.refused is not None}
    assert ("dit", "blocks") in ran and ("pixart", "cross") in ran  # self and cross-attention
    assert refused[("flux", "double")] and "joint text-image sequence" in refused[("flux", "double")]
    assert toy_operator.summary.startswith("Uniform attention")


def test_the_toy_operator_is_gone_afterwards():
    assert "toy_uniform" not in OPERATORS
