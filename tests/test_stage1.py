"""Stage 1 (activation distillation), automatic layer selection and `dit-graft plan`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import dit_graft
from dit_graft.autoselect import placeholder, resolve
from dit_graft.errors import RecipeError
from dit_graft.families import family_for
from dit_graft.plan import PlannedEdit, apply, depth_spans, plan
from dit_graft.recipe import validate
from dit_graft.training.data import training_batch, training_pool
from dit_graft.training.run import Target, activation_distill, relative_error, targets
from dit_graft.training.stages import Recorder
from tests.conftest import op_of, tiny_dit, tiny_recipe
from tests.test_cli import run_cli


def _recipe(graft: list[dict], **distill) -> object:
    data = tiny_recipe("unused", "unused", **distill)
    data["graft"] = graft
    return validate(data)


def _module_error(teacher, student, target: Target, pool, cfg) -> float:
    """The relative error of one target on a fixed batch (its own generator: independent of training)."""
    family = family_for(teacher)
    gen = torch.Generator().manual_seed(123)
    xt, t, _, y = training_batch(teacher, pool, family.null_conditions(teacher), 8, 0.0, gen, "cpu")
    rec = Recorder(teacher, [target])
    try:
        with torch.no_grad():
            family.forward(student, xt[:1], t[:1], {k: v[:1] for k, v in y.items()})
            family.forward(teacher, xt, t, y)
            args, kwargs = rec.inputs[target.first]
            return relative_error(student.get_submodule(target.student)(*args, **kwargs), rec.outputs[target.last])
    finally:
        rec.remove()


def test_targets_follow_sites_and_depth_spans():
    teacher = tiny_dit(num_layers=6)
    recipe = _recipe(
        [
            {"site": "attention", "layers": [0, 2, 4], "op": "linear"},
            {"site": "depth", "op": "prune_depth", "options": {"keep": 4}},
        ]
    )
    gp = plan(teacher, recipe)
    student = apply(teacher, gp)
    kept = gp.edits[1].kept
    got = targets(teacher, student, gp)
    spans = depth_spans(gp.edits[1])
    assert [s[0] for s in spans] == kept and sum(map(len, spans)) == 6
    assert [x for s in spans for x in s] == list(range(6))  # every old block once, in order
    for tgt in got:
        if tgt.first == tgt.last:  # a grafted attention site, in a block that stands for one teacher block
            new = int(tgt.student.split(".")[1])
            assert tgt.first == f"transformer_blocks.{kept[new]}.attn1" and len(spans[new]) == 1
            assert kept[new] in (0, 2, 4)
        else:  # a kept block standing in for itself and the dropped blocks after it
            new = int(tgt.student.split(".")[1])
            assert tgt.first == f"transformer_blocks.{spans[new][0]}"
            assert tgt.last == f"transformer_blocks.{spans[new][-1]}"
    assert {int(t.student.split(".")[1]) for t in got if t.first != t.last} == {
        j for j, s in enumerate(spans) if len(s) > 1
    }


def test_depth_spans_derived_for_plans_without_spans():
    edit = PlannedEdit(
        index=0,
        site="depth",
        op="prune_depth",
        options={},
        layers=[1, 3],
        modules=[],
        kept=[1, 3],
        layer_map={0: "dropped", 1: 0, 2: "dropped", 3: 1, 4: "dropped"},
    )
    assert depth_spans(edit) == [[0, 1, 2], [3, 4]]


def test_activation_distillation_lowers_each_modules_error(tmp_path):
    teacher = tiny_dit(num_layers=2)
    recipe = _recipe(
        [{"site": "attention", "layers": "all", "op": "linear", "options": {"dwconv": 3}}],
        stages=["activation", "end_to_end"],
        activation={"steps": 30, "batch_size": 8, "lr": 3e-3},
    )
    gp = plan(teacher, recipe)
    student = apply(teacher, gp)
    pool = training_pool(teacher, recipe.distill, tmp_path)
    tlist = targets(teacher, student, gp)
    assert [t.student for t in tlist] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    before = [_module_error(teacher, student, t, pool, recipe.distill) for t in tlist]
    frozen = {k: v.clone() for k, v in student.state_dict().items() if ".ff." in k or "norm1" in k}
    result = activation_distill(teacher, student, tlist, recipe.distill, pool, work_dir=tmp_path)
    after = [_module_error(teacher, student, t, pool, recipe.distill) for t in tlist]
    assert all(a < 0.7 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert set(result.errors) == {t.name for t in tlist}
    for k, v in frozen.items():  # only the target modules train
        assert torch.equal(student.state_dict()[k], v), k
    # the stage's final checkpoint is reloaded on resume instead of training again
    again = apply(teacher, gp)
    resumed = activation_distill(teacher, again, tlist, recipe.distill, pool, work_dir=tmp_path, resume=True)
    assert resumed.resumed and resumed.errors == result.errors
    for k, v in student.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


@pytest.mark.parametrize("loss", ["l1", "huber"])
def test_an_exact_graft_stays_exact_under_every_loss(tmp_path, loss):
    """Softmax grafted over softmax reproduces the teacher: the loss is 0 and training keeps it so."""
    teacher = tiny_dit(num_layers=2)
    recipe = _recipe([{"site": "attention", "layers": [1], "op": "softmax"}], activation={"steps": 3, "loss": loss})
    gp = plan(teacher, recipe)
    student = apply(teacher, gp)
    pool = training_pool(teacher, recipe.distill, tmp_path)
    result = activation_distill(teacher, student, targets(teacher, student, gp), recipe.distill, pool)
    assert all(r["loss"] < 1e-10 for r in result.log)
    assert max(result.errors.values()) < 1e-10


def test_block_span_target_for_a_merged_block(tmp_path):
    """A plan whose block stands for two teacher blocks regresses the pair's output from its input."""
    teacher = tiny_dit(num_layers=4)
    gp = plan(teacher, _recipe([{"site": "depth", "op": "prune_depth", "options": {"keep": 3}}]))
    student = apply(teacher, gp)
    tlist = targets(teacher, student, gp)
    assert len(tlist) == 1 and tlist[0].first != tlist[0].last
    cfg = _recipe([{"site": "attention", "op": "linear"}], activation={"steps": 25, "lr": 2e-3}).distill
    pool = training_pool(teacher, cfg, tmp_path)
    before = _module_error(teacher, student, tlist[0], pool, cfg)
    activation_distill(teacher, student, tlist, cfg, pool)
    assert _module_error(teacher, student, tlist[0], pool, cfg) < 0.8 * before


def _muted(model, layers):
    """Zeroes the attention output projection of `layers`: grafting their attention changes nothing."""
    with torch.no_grad():
        for i in layers:
            out = model.transformer_blocks[i].attn1.to_out[0]
            out.weight.zero_()
            out.bias.zero_()
    return model


def test_auto_layers_choose_the_least_sensitive(tmp_path):
    teacher = _muted(tiny_dit(num_layers=4), [1, 2])
    recipe = _recipe(
        [{"site": "attention", "op": "linear", "layers": {"auto": {"fraction": 0.5, "steps": 2, "samples": 4}}}]
    )
    pool = training_pool(teacher, recipe.distill, tmp_path)
    resolved, (sel,) = resolve(teacher, recipe, pool)
    assert resolved.graft[0].layers == [1, 2] == sel.chosen
    assert sel.sensitivity[1] == 0 and sel.sensitivity[2] == 0
    assert min(sel.sensitivity[0], sel.sensitivity[3]) > 0
    with pytest.raises(RecipeError, match="automatic layers"):
        plan(teacher, recipe)  # unresolved auto layers never reach a plan


def test_auto_layers_after_a_depth_edit_and_placeholder(tmp_path):
    teacher = tiny_dit(num_layers=6)
    recipe = _recipe(
        [
            {"site": "depth", "op": "prune_depth", "options": {"keep": 4}},
            {
                "site": "mlp",
                "op": "mlp_ratio",
                "options": {"ratio": 2},
                "layers": {"auto": {"fraction": 0.25, "steps": 0, "samples": 2}},
            },
        ]
    )
    pool = training_pool(teacher, recipe.distill, tmp_path)
    resolved, (sel,) = resolve(teacher, recipe, pool)
    assert sorted(sel.sensitivity) == [0, 1, 2, 3] and len(sel.chosen) == 1
    student = apply(teacher, plan(teacher, resolved))
    assert len(student.transformer_blocks) == 4
    meta, notes = placeholder(teacher, recipe)
    assert meta.graft[1].layers == [0] and "auto chooses 1 of 4" in notes[0]


def test_cli_plan_then_convert_with_both_stages(tmp_path, write_recipe, capsys):
    src = tmp_path / "teacher"
    _muted(tiny_dit(num_layers=4), [0, 3]).save_pretrained(src, safe_serialization=True)
    out = tmp_path / "student"
    data = tiny_recipe(src, out, stages=["activation", "end_to_end"], activation={"steps": 3})
    data["graft"][0]["layers"] = {"auto": {"fraction": 0.5, "steps": 2, "samples": 4}}
    recipe = write_recipe(data)

    code, stdout, stderr = run_cli(["convert", recipe, "--dry-run"], capsys)
    assert code == 0, stderr
    assert "auto chooses 2 of 4 layers" in stderr

    code, stdout, stderr = run_cli(["plan", recipe, "--out", tmp_path / "plan"], capsys)
    assert code == 0, stderr
    resolved = yaml.safe_load((tmp_path / "plan" / "recipe.yaml").read_text())
    assert resolved["graft"][0]["layers"] == [0, 3]
    assert json.loads((tmp_path / "plan" / "sensitivity.json").read_text())[0]["chosen"] == [0, 3]
    assert (tmp_path / "plan" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "plan" / ".work").exists()

    code, stdout, stderr = run_cli(["convert", recipe], capsys)
    assert code == 0, stderr
    graft = json.loads((out / "graft.json").read_text())
    assert graft["recipe"]["graft"][0]["layers"] == [0, 3]
    assert set(graft["metrics"]["layer_sensitivity"]["graft.0"]) == {"0", "1", "2", "3"}
    grafted = {"transformer_blocks.0.attn1", "transformer_blocks.3.attn1"}
    assert set(graft["metrics"]["stage1_relative_error"]) == grafted
    student = dit_graft.from_pretrained(out)
    assert [op_of(b.attn1.processor) for b in student.transformer_blocks] == [
        "linear",
        "AttnProcessor2_0",
        "AttnProcessor2_0",
        "linear",
    ]


def test_stage_one_only_and_recipe_errors(tmp_path, tiny_dit_dir, write_recipe, capsys):
    out = tmp_path / "student"
    recipe = write_recipe(tiny_recipe(tiny_dit_dir, out, stages=["activation"], activation={"steps": 2}))
    code, _, stderr = run_cli(["convert", recipe], capsys)
    assert code == 0, stderr
    graft = json.loads((out / "graft.json").read_text())
    assert graft["metrics"]["steps"] == 0 and graft["metrics"]["stage1_relative_error"]
    bad = tiny_recipe(tiny_dit_dir, out, stages=["end_to_end", "activation"])
    code, _, stderr = run_cli(["validate", write_recipe(bad, "bad.yaml")], capsys)
    assert code == 2 and "distill.stages" in stderr and "Traceback" not in stderr
    bad = tiny_recipe(tiny_dit_dir, out)
    bad["graft"][0]["layers"] = {"auto": {"fraction": 1.5}}
    code, _, stderr = run_cli(["validate", write_recipe(bad, "bad2.yaml")], capsys)
    assert code == 2 and "graft.0.layers: auto.fraction: Input should be less than or equal to 1" in stderr


def test_feature_loss_after_a_depth_edit_matches_each_spans_last_block(tmp_path):
    from dit_graft.training.run import distill
    from dit_graft.training.stages import feature_blocks

    teacher = tiny_dit(num_layers=4)
    recipe = _recipe(
        [{"site": "depth", "op": "prune_depth", "options": {"keep": 2}}],
        losses={"eps_mse": 1.0, "sigma_mse": 1.0, "feature_mse": 1.0},
        steps=2,
    )
    gp = plan(teacher, recipe)
    student = apply(teacher, gp)
    spans = depth_spans(gp.edits[0])
    assert feature_blocks(teacher, gp) == [teacher.transformer_blocks[s[-1]] for s in spans]
    assert feature_blocks(teacher, None) == list(teacher.transformer_blocks)
    result = distill(teacher, student, recipe.distill, tmp_path, graft_plan=gp)
    assert all(r["feature_mse"] > 0 for r in result.log)


def test_flux_targets_and_feature_blocks_follow_a_depth_edit_in_the_single_group():
    from dit_graft.training.stages import feature_blocks
    from tests.test_families import tiny_flux

    teacher = tiny_flux(num_layers=2, num_single_layers=4)
    recipe = _recipe(
        [
            {"site": "attention", "group": "single", "layers": [1, 3], "op": "linear"},
            {"site": "attention", "group": "double", "layers": [1], "op": "linear"},
            {"site": "depth", "group": "single", "op": "parallel_blocks", "options": {"pairs": [1]}},
        ]
    )
    gp = plan(teacher, recipe)
    student = apply(teacher, gp)
    assert gp.edits[2].group == "single" and gp.edits[2].spans == [[0], [1, 2], [3]]
    assert targets(teacher, student, gp) == [
        Target(
            "single_transformer_blocks.2.attn", "single_transformer_blocks.3.attn", "single_transformer_blocks.3.attn"
        ),
        Target("transformer_blocks.1.attn", "transformer_blocks.1.attn", "transformer_blocks.1.attn"),
        # the pair stands for single blocks 1 and 2 (its grafted attention is covered by the span)
        Target("single_transformer_blocks.1", "single_transformer_blocks.1", "single_transformer_blocks.2"),
    ]
    t_single = list(teacher.single_transformer_blocks)
    matched = feature_blocks(teacher, gp)
    assert matched == [*teacher.transformer_blocks, t_single[0], t_single[2], t_single[3]]
    assert len(matched) == len(family_for(student).blocks(student))
