"""Structure edits: the moe FFN (Dense2MoE) and prune_depth (ShortGPT block importance)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from hypothesis import given, settings
from hypothesis import strategies as st

import dit_graft
from dit_graft.errors import RecipeError
from dit_graft.export import export
from dit_graft.families import family_for
from dit_graft.losses import LOSSES, LossInputs
from dit_graft.operators import OPERATORS
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from tests.conftest import tiny_dit, tiny_recipe
from tests.conftest import tiny_dit_inputs as _inputs
from tests.test_cli import run_cli

TEACHER = tiny_dit()  # read-only: every test grafts a copy


def _recipe(graft, tmp_path="."):
    data = tiny_recipe(tmp_path, f"{tmp_path}/out")
    data["graft"] = graft
    return validate(data)


def _moe(options, layers="all"):
    return _recipe([{"site": "mlp", "layers": layers, "op": "moe", "options": options}])


def _ffn_site(model, layer=0):
    return family_for(model).site_map(model)[f"transformer_blocks.{layer}.ff"]


@settings(max_examples=12, deadline=None)
@given(
    experts=st.integers(1, 16),
    partition=st.sampled_from(["importance", "coactivation"]),
    tokens=st.integers(1, 9),
)
def test_moe_with_every_expert_active_is_the_dense_ffn(experts, partition, tokens):
    dense = TEACHER.transformer_blocks[0].ff
    op = OPERATORS.get("moe")
    options = op.parse_options({"experts": experts, "top_k": experts, "partition": partition, "calibration_tokens": 32})
    moe = op.build(dense, _ffn_site(TEACHER), options)
    units = sorted(torch.cat([e.fc1.weight for e in moe.experts]).tolist())
    assert units == sorted(dense.net[0].proj.weight.tolist())  # the experts partition the hidden units
    x = torch.randn(2, tokens, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(moe.double()(x), dense.double()(x), rtol=1e-12, atol=1e-12)
    dense.float()


def test_moe_router_and_experts_get_gradients_and_load_balance_is_positive():
    student = apply(TEACHER, plan(TEACHER, _moe({"experts": 4, "top_k": 2, "shared": 1})))
    out = student(**_inputs()).sample
    inputs = LossInputs(out, out.detach() + 0.1, torch.randn(2, 1, 8, 8), [], [], student_model=student)
    aux = LOSSES.get("load_balance")(inputs)
    assert torch.isfinite(aux) and aux > 0
    (LOSSES.get("eps_mse")(inputs) + aux).backward()
    ff = student.transformer_blocks[0].ff
    for name, p in ff.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert [e.fc1.out_features for e in ff.experts] == [13, 13, 13, 12] and ff.shared.fc1.out_features == 13


def test_moe_zero_router_gets_gradients_at_the_dense_start():
    student = apply(TEACHER, plan(TEACHER, _moe({"experts": 4, "top_k": 4})))
    student(**_inputs()).sample.square().mean().backward()
    assert student.transformer_blocks[1].ff.router.weight.grad.abs().sum() > 0


def test_moe_activated_parameters_and_top_k_bound():
    student = apply(TEACHER, plan(TEACHER, _moe({"experts": 4, "top_k": 1})))
    ff = student.transformer_blocks[0].ff
    expert = sum(p.numel() for p in ff.experts[0].parameters())
    assert ff.activated_parameters() == ff.router.weight.numel() + ff.bias.numel() + expert
    with pytest.raises(RecipeError, match="top_k=5 exceeds experts=4"):
        _moe({"experts": 4, "top_k": 5})


def test_moe_exports_and_reloads_bitwise(tmp_path):
    recipe = _moe({"experts": 3, "top_k": 2, "shared": 1, "partition": "coactivation"})
    graft_plan = plan(TEACHER, recipe)
    student = apply(TEACHER, graft_plan).eval()
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "moe")
    reloaded = dit_graft.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(reloaded(**_inputs()).sample, student(**_inputs()).sample)


def test_load_balance_is_a_recipe_loss_key():
    data = tiny_recipe(".", "out")
    data["distill"]["losses"] = {"load_balance": 0.01}
    assert validate(data).distill.losses.load_balance == 0.01


def _prune(keep, **options):
    return _recipe([{"site": "depth", "op": "prune_depth", "options": {"keep": keep, **options}}])


def test_prune_depth_keeps_the_most_important_blocks():
    teacher = tiny_dit(num_layers=5)
    graft_plan = plan(teacher, _prune(3, calibration_samples=4))
    edit = graft_plan.edits[0]
    assert len(edit.scores) == 5 and all(0 <= s <= 2 for s in edit.scores)
    rest = sorted(range(1, 5), key=lambda i: -edit.scores[i])[:2]
    assert edit.kept == sorted([0, *rest])  # dit pins block 0
    assert [edit.layer_map[i] for i in edit.kept] == [0, 1, 2]
    assert sum(v == "dropped" for v in edit.layer_map.values()) == 2
    student = apply(teacher, graft_plan)
    assert len(student.transformer_blocks) == 3 and student.config.num_layers == 3
    assert len(teacher.transformer_blocks) == 5 and teacher.config.num_layers == 5
    assert student.transformer_blocks[1] is not teacher.transformer_blocks[edit.kept[1]]
    torch.testing.assert_close(
        student.transformer_blocks[1].ff.net[2].weight, teacher.transformer_blocks[edit.kept[1]].ff.net[2].weight
    )


def test_prune_depth_exports_a_stock_diffusers_model(tmp_path):
    teacher = tiny_dit(num_layers=4)
    recipe = _prune(2, calibration_samples=2)
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan).eval()
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "depth")
    assert json.loads((out / "config.json").read_text())["num_layers"] == 2
    assert json.loads((out / "graft.json").read_text())["plan"]["base_config"] == {"num_layers": 4}
    stock = DiTTransformer2DModel.from_pretrained(out).eval()
    reloaded = dit_graft.from_pretrained(out)
    with torch.no_grad():
        expected = student(**_inputs()).sample
        assert torch.equal(stock(**_inputs()).sample, expected)
        assert torch.equal(reloaded(**_inputs()).sample, expected)


def test_prune_depth_then_graft_numbers_layers_in_the_pruned_model(tmp_path):
    teacher = tiny_dit(num_layers=4)
    recipe = _recipe(
        [
            {"site": "mlp", "layers": "all", "op": "mlp_ratio", "options": {"ratio": 2}},
            {"site": "depth", "op": "prune_depth", "options": {"keep": 3, "calibration_samples": 2}},
            {"site": "mlp", "layers": [2], "op": "moe", "options": {"experts": 2, "top_k": 2}},
        ]
    )
    graft_plan = plan(teacher, recipe)
    assert graft_plan.edits[2].modules[0].old == "mlp_ratio"
    student = apply(teacher, graft_plan).eval()
    assert len(student.transformer_blocks) == 3
    assert type(student.transformer_blocks[2].ff).__name__ == "MoeFeedForward"
    assert student.transformer_blocks[1].ff.net[2].in_features == 32
    kept = graft_plan.edits[1].kept
    assert graft_plan.operators_by_site() == {
        **{f"transformer_blocks.{i}.ff": "mlp_ratio" for i in range(2)},
        "transformer_blocks.2.ff": "moe",
    }, kept
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "mixed")
    with torch.no_grad():
        assert torch.equal(dit_graft.from_pretrained(out)(**_inputs()).sample, student(**_inputs()).sample)


@pytest.mark.parametrize("keep, message", [(0, "greater than or equal to 1"), (3, "keep=3 exceeds the model's 2")])
def test_prune_depth_refuses_a_bad_keep(keep, message):
    with pytest.raises(RecipeError, match=message):
        plan(TEACHER, _prune(keep))


def test_depth_edits_take_no_layers():
    with pytest.raises(RecipeError, match="graft.0.layers: a depth edit chooses its blocks"):
        _recipe([{"site": "depth", "layers": [0], "op": "prune_depth", "options": {"keep": 1}}])
    with pytest.raises(RecipeError, match="goes into depth sites, not mlp"):
        _recipe([{"site": "mlp", "op": "prune_depth", "options": {"keep": 1}}])


def test_dry_run_plans_depth_unscored_and_reports_activated_parameters(tmp_path, tiny_dit_dir, write_recipe, capsys):
    data = tiny_recipe(tiny_dit_dir, tmp_path / "out")
    data["graft"] = [
        {"site": "depth", "op": "prune_depth", "options": {"keep": 1}},
        {"site": "mlp", "layers": "all", "op": "moe", "options": {"experts": 4, "top_k": 1}},
    ]
    code, stdout, _ = run_cli(["convert", write_recipe(data), "--dry-run"], capsys)
    assert code == 0, stdout
    assert "2 → 1, dropped [1] (unscored: no weights)" in stdout
    assert "activated parameters" in stdout
    code, stdout, _ = run_cli(["operators"], capsys)
    assert code == 0 and "prune_depth" in stdout and "activated" in stdout
