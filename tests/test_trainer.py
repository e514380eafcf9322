"""The trainer's scopes, shared frozen weights, frozen dtype and activation checkpointing, in one process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import dit_graft
from dit_graft.families import FAMILIES
from dit_graft.loading import build_from_config
from dit_graft.pipeline import convert, prepare_student
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from dit_graft.training.scope import checkpoint_blocks, uncheckpoint_blocks
from dit_graft.training.stages import targets
from tests.conftest import tiny_dit, tiny_dit_inputs, tiny_recipe
from tests.test_cli import run_cli

RANK = 4


def _recipe(tmp_path, **distill):
    return validate(tiny_recipe(tmp_path, tmp_path / "out", lora={"rank": RANK}, **distill))


def _expected(teacher, trainable: str) -> int:
    """What a scope should count, from the module names alone (every block's attn1 is grafted with linear)."""
    student = apply(teacher, plan(teacher, _recipe_for(trainable)))
    params = dict(student.named_parameters())
    theirs = dict(teacher.named_parameters())
    grafted = {n: p for n, p in params.items() if ".attn1." in n}
    new = {n: p for n, p in grafted.items() if n not in theirs}
    if trainable == "all":
        return sum(p.numel() for p in params.values())
    if trainable == "grafted":
        return sum(p.numel() for p in grafted.values())
    if trainable == "new":
        return sum(p.numel() for p in new.values())
    linears = [m for n, m in student.named_modules() if ".attn1." in n and isinstance(m, torch.nn.Linear)]
    return sum(RANK * (m.in_features + m.out_features) for m in linears) + sum(p.numel() for p in new.values())


def _recipe_for(trainable: str):
    return validate(tiny_recipe("unused", "unused", trainable=trainable, lora={"rank": RANK}))


@pytest.mark.parametrize("trainable", ["new", "grafted", "all", "lora"])
def test_each_scope_trains_its_parameters_and_exports_a_complete_student(tmp_path, trainable):
    teacher = tiny_dit()
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        before = teacher(**tiny_dit_inputs()).sample
    recipe = _recipe(tmp_path, trainable=trainable, lr=1e-2)
    done = convert(recipe, tmp_path / "out", teacher=teacher)
    assert done.metrics["params_trained"] == _expected(tiny_dit(), trainable)
    exported = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    plain = apply(tiny_dit(), plan(tiny_dit(), recipe)).state_dict()
    assert exported.keys() == plain.keys()  # LoRA is merged: no adapter keys
    changed = {k for k in exported if k in original and not torch.equal(exported[k], original[k])}
    if trainable in ("new", "grafted", "lora"):
        assert changed <= {k for k in exported if ".attn1." in k}  # frozen weights are the teacher's
    if trainable in ("grafted", "lora", "all"):
        assert any(".attn1.to_q" in k for k in changed)
    if trainable == "new":
        assert not changed  # only added parameters (the depthwise conv) train
    # the teacher's outputs are unchanged by training, although the student shared its tensors
    with torch.no_grad():
        assert torch.equal(teacher.float()(**tiny_dit_inputs()).sample, before)
    reloaded = dit_graft.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(reloaded(**tiny_dit_inputs()).sample, done.student(**tiny_dit_inputs()).sample)


def test_frozen_parameters_are_the_teachers_tensors_without_gradients_or_optimizer_state(tmp_path):
    teacher = tiny_dit()
    recipe = _recipe(tmp_path, trainable="grafted", frozen_dtype="bfloat16", steps=2)
    student = apply(teacher, plan(teacher, recipe))
    scope, shared = prepare_student(teacher, student, targets(teacher, student, plan(teacher, recipe)), recipe.distill)
    ff = student.transformer_blocks[0].ff.net[0].proj.weight
    assert ff is teacher.transformer_blocks[0].ff.net[0].proj.weight and ff.dtype == torch.bfloat16
    assert not ff.requires_grad and shared == sum(p.numel() for p in teacher.parameters()) - scope.count + sum(
        p.numel() for n, p in student.named_parameters() if ".processor." in n
    )
    q = student.transformer_blocks[0].attn1.to_q.weight
    assert q.requires_grad and q.dtype == torch.float32 and q is not teacher.transformer_blocks[0].attn1.to_q.weight

    # train without exporting: the work directory keeps the checkpoints
    teacher = tiny_dit()
    convert(recipe, None, teacher=teacher, work_dir=tmp_path / "work")
    ckpt = tmp_path / "work" / "checkpoints" / "end_to_end" / "step-00000002"
    saved = torch.load(ckpt / "trainer.pt", weights_only=True)
    weights = load_file(ckpt / "student.safetensors")
    assert set(saved["optimizer"]["state"]) == set(weights) and all(".attn1." in k for k in weights)


def test_a_scope_that_matches_nothing_and_unknown_keys_are_one_line_errors(
    tmp_path, tiny_dit_dir, write_recipe, capsys
):
    data = tiny_recipe(tiny_dit_dir, tmp_path / "out", trainable="new")
    data["graft"][0].update(op="softmax", options={})  # softmax over softmax adds no parameter
    code, _, stderr = run_cli(["convert", write_recipe(data)], capsys)
    assert code == 2 and "distill.trainable: new matches no parameter" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
    for key, value in (("parallel", "zero"), ("trainable", "everything")):
        code, _, stderr = run_cli(["convert", write_recipe(data), "--set", f"distill.{key}={value}"], capsys)
        assert code == 2 and f"distill.{key}: Input should be" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", sorted(name for name, _ in FAMILIES.items()))
def test_activation_checkpointing_recomputes_each_block_with_the_same_gradients(name):
    family = FAMILIES.get(name)
    torch.manual_seed(0)
    model = family.prepare_for_training(build_from_config(family.tiny_config()).train())
    inputs = family.tiny_inputs(model)

    def grads():
        torch.manual_seed(1)  # the same dropout draws in both runs
        model.zero_grad(set_to_none=True)
        family.forward(model, inputs["x"], inputs["t"], inputs["cond"]).float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    # the first submodule of each block runs once per block forward, recomputation included
    hooks = [next(b.children()).register_forward_hook(lambda *_: calls.append(1)) for b in family.blocks(model)]
    plain = grads()
    assert len(calls) == len(family.blocks(model))
    assert checkpoint_blocks(model) == len(family.blocks(model)) > 0
    recomputed = grads()
    assert len(calls) == 3 * len(family.blocks(model))  # forward, then once more in the backward
    assert plain.keys() == recomputed.keys()
    for n in plain:
        assert torch.allclose(plain[n], recomputed[n], rtol=1e-5, atol=1e-7), n
    uncheckpoint_blocks(model)
    for h in hooks:
        h.remove()
    assert not any("forward" in vars(b) for b in family.blocks(model))
