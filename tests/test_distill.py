"""Distillation internals: loss terms, gradient accumulation, dataset data, full-size dry runs."""

from __future__ import annotations

import json

import pytest
import torch

from dit_graft.losses import LOSSES, LossInputs
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from dit_graft.training.run import distill
from tests.conftest import tiny_dit, tiny_recipe
from tests.test_cli import run_cli


def test_every_loss_term_is_zero_for_identical_outputs_and_positive_otherwise():
    out = torch.randn(2, 2, 4, 4)
    noise = torch.randn(2, 1, 4, 4)
    feats = [torch.randn(2, 3, 5)]
    same = LossInputs(out, out.clone(), noise, feats, [f.clone() for f in feats])
    other = LossInputs(out, out + 1, noise, feats, [f + 1 for f in feats])
    for name in ("eps_mse", "sigma_mse", "feature_mse"):
        assert LOSSES.get(name)(same) == 0
        assert LOSSES.get(name)(other) > 0
    assert LOSSES.get("task")(LossInputs(torch.cat([noise, noise], dim=1), out, noise, [], [])) == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"losses": {"eps_mse": 1.0, "sigma_mse": 0.5, "feature_mse": 0.1, "task": 0.1}, "grad_accum": 2},
        {"data": "dataset", "dataset": "digits"},
        {"mixed_precision": "bf16"},
    ],
)
def test_distillation_reduces_the_loss_and_changes_only_the_student(tmp_path, overrides):
    on_digits = overrides.get("data") == "dataset"  # the digits are 16x16 with 10 classes
    teacher = tiny_dit(sample_size=16, num_embeds_ada_norm=10) if on_digits else tiny_dit()
    recipe = validate(tiny_recipe(tmp_path, tmp_path / "out", steps=40, lr=2e-2, **overrides))
    student = apply(teacher, plan(teacher, recipe))
    with torch.no_grad():  # start the new parameters away from the teacher so there is something to learn
        for name, p in student.named_parameters():
            if ".processor." in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = distill(teacher, student, recipe.distill, tmp_path / "work")
    first, last = result.log[:5], result.log[-5:]
    assert sum(r["eps_mse"] for r in last) < 0.5 * sum(r["eps_mse"] for r in first)  # task has a floor
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert set(result.log[0]) >= {"step", "loss", "lr", *(k for k, w in recipe.distill.losses if w > 0)}


def test_dry_run_on_full_size_dit_xl_2_loads_no_weights(tmp_path, write_recipe, capsys):
    config = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "sample_size": 32,
        "patch_size": 2,
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
    }
    model_dir = tmp_path / "dit-xl-2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))  # no weights at all
    data = tiny_recipe(model_dir, tmp_path / "out")
    data["graft"][0].update(layers="0-13", options={"heads": 2})
    code, stdout, stderr = run_cli(["convert", write_recipe(data), "--dry-run"], capsys)
    assert code == 0, stderr
    assert "transformer_blocks.13.attn1" in stdout and "transformer_blocks.14.attn1" not in stdout
    assert "749.83M" in stdout  # the diffusers layout's parameter count (see families/dit_original.py)


def test_distillation_leaves_the_teacher_trainable_for_later_students(tmp_path):
    teacher = tiny_dit()
    recipe = validate(tiny_recipe(tmp_path, tmp_path / "out", steps=2))
    distill(teacher, apply(teacher, plan(teacher, recipe)), recipe.distill, tmp_path / "w1")
    second = apply(teacher, plan(teacher, recipe))
    assert all(p.requires_grad for p in teacher.parameters())
    distill(teacher, second, recipe.distill, tmp_path / "w2")
