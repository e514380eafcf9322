"""Planning, grafting with inheritance, the linear operator, export → reload."""

from __future__ import annotations

import json

import pytest
import torch

import dit_graft
from dit_graft.errors import IntegrityError, RecipeError
from dit_graft.export import export
from dit_graft.loading import load_model
from dit_graft.plan import GraftPlan, apply, plan
from dit_graft.recipe import validate
from tests.conftest import op_of, tiny_dit, tiny_recipe


def _inputs(batch=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 1, size, size, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        class_labels=torch.randint(0, 5, (batch,), generator=g),
    )


def _recipe(tmp_path, **edit):
    data = tiny_recipe(tmp_path, tmp_path / "out")
    data["graft"][0].update(edit)
    return validate(data)


def test_plan_is_pure_json_data_naming_real_modules(tmp_path):
    teacher = tiny_dit()
    graft_plan = plan(teacher, _recipe(tmp_path, layers=[1]))
    data = json.loads(graft_plan.model_dump_json())
    assert data["edits"][0]["modules"] == [
        {"path": "transformer_blocks.1.attn1", "layer": 1, "old": "softmax", "new": "linear"}
    ]
    assert GraftPlan.model_validate(data) == graft_plan


def test_apply_inherits_every_teacher_parameter_and_leaves_teacher_untouched(tmp_path):
    teacher = tiny_dit()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = apply(teacher, plan(teacher, _recipe(tmp_path)))
    s_state = student.state_dict()
    for k, v in before.items():
        assert torch.equal(s_state[k], v), k
        assert torch.equal(teacher.state_dict()[k], v), k
    new = sorted(set(s_state) - set(before))
    assert new == [
        f"transformer_blocks.{i}.attn1.processor.core.dwconv.{p}" for i in range(2) for p in ("bias", "weight")
    ]
    assert all(op_of(b.attn1.processor) == "linear" for b in student.transformer_blocks)
    assert not any(op_of(b.attn1.processor) == "linear" for b in teacher.transformer_blocks)


def test_a_failing_builder_leaves_the_model_untouched(tmp_path):
    teacher = tiny_dit()
    with pytest.raises(RecipeError, match="heads=3 does not divide"):  # refused at plan time
        plan(teacher, _recipe(tmp_path, options={"heads": 3}))  # 3 does not divide 16
    graft_plan = plan(teacher, _recipe(tmp_path, options={"heads": 1}))
    graft_plan.edits[0].options["heads"] = 3  # a recorded plan edited by hand: the walker refuses it too
    processors = [type(b.attn1.processor) for b in teacher.transformer_blocks]
    with pytest.raises(RecipeError, match="heads=3 does not divide"):
        apply(teacher, graft_plan, inplace=True)
    assert [type(b.attn1.processor) for b in teacher.transformer_blocks] == processors


def test_linear_processor_matches_a_direct_formula(tmp_path):
    teacher = tiny_dit()
    student = apply(teacher, plan(teacher, _recipe(tmp_path, options={"dwconv": 0, "heads": 1})))
    attn = student.transformer_blocks[0].attn1
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    attn.double()
    q, k, v = torch.relu(attn.to_q(x)), torch.relu(attn.to_k(x)), attn.to_v(x)
    expected = (q @ (k.transpose(1, 2) @ v)) / (q @ k.sum(1, keepdim=True).transpose(1, 2) + 1e-6)
    torch.testing.assert_close(attn(x), attn.to_out[0](expected), rtol=1e-10, atol=1e-10)


def test_linear_without_conv_is_permutation_equivariant_over_tokens(tmp_path):
    teacher = tiny_dit()
    student = apply(teacher, plan(teacher, _recipe(tmp_path, options={"dwconv": 0})))
    attn = student.transformer_blocks[0].attn1
    x = torch.randn(2, 16, 16)
    perm = torch.randperm(16)
    torch.testing.assert_close(attn(x)[:, perm], attn(x[:, perm]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"dwconv": 3}, {"heads": 1, "feature_map": "elu1"}, {"norm": "output_norm"}])
def test_every_new_parameter_gets_a_gradient(tmp_path, options):
    teacher = tiny_dit()
    student = apply(teacher, plan(teacher, _recipe(tmp_path, options=options)))
    student.train()
    student(**_inputs()).sample.square().mean().backward()
    for name, p in student.named_parameters():
        if ".processor." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grid_is_recorded_by_the_forward_hook_and_used_for_non_square_grids(tmp_path):
    teacher = tiny_dit()
    student = apply(teacher, plan(teacher, _recipe(tmp_path)))
    with torch.no_grad():
        student(**_inputs())
        assert student._dit_graft_grid.hw == (4, 4)
        attn = student.transformer_blocks[0].attn1
        attn.processor.core.dwconv.weight.normal_()
        student._dit_graft_grid.hw = (4, 6)  # DiT itself unpatchifies square grids only; the operator does not care
        x = torch.randn(2, 24, 16)
        full = attn(x)
        v = attn.to_v(x).transpose(1, 2).reshape(2, 16, 4, 6)  # (B, C, h, w) on the recorded 4x6 grid
        conv_part = attn.processor.core.dwconv(v).flatten(2).transpose(1, 2)
        attn.processor.core.dwconv = None
        linear_part = attn(x)
        student._dit_graft_grid.hw = None
    torch.testing.assert_close(full - linear_part, conv_part @ attn.to_out[0].weight.T, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot infer a token grid for 24 tokens"):
        student.transformer_blocks[1].attn1(x)


@pytest.mark.parametrize("options", [{"dwconv": 3}, {"heads": 1, "dwconv": 0}, {"norm": "output_norm"}])
def test_export_reload_is_bitwise_exact(tmp_path, options):
    teacher = tiny_dit()
    recipe = _recipe(tmp_path, options=options)
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".processor." in name:
                p.normal_()
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "export", {"steps": 0})
    reloaded = dit_graft.from_pretrained(out)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(student(**x).sample, reloaded(**x).sample)
    graft = json.loads((out / "graft.json").read_text())
    assert graft["operators"] == {"transformer_blocks.0.attn1": "linear", "transformer_blocks.1.attn1": "linear"}
    assert graft["dit_graft_version"] == dit_graft.__version__
    assert "base_model_relation: finetune" in (out / "README.md").read_text()
    assert not (tmp_path / ".export.tmp").exists()


def test_export_runs_in_the_stock_dit_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    teacher = tiny_dit(
        sample_size=4, in_channels=4, out_channels=8, num_embeds_ada_norm=1000
    )  # the pipeline hard-codes 1000 classes
    recipe = _recipe(tmp_path)
    graft_plan = plan(teacher, recipe)
    out = export(apply(teacher, graft_plan), graft_plan, recipe.model_dump(), tmp_path / "export")
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8)
    pipe = DiTPipeline(transformer=dit_graft.from_pretrained(out), vae=vae, scheduler=DDIMScheduler())
    images = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.5, output_type="np").images
    assert images.shape == (2, 4, 4, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_plain_diffusers_directory_loads_as_stock_class(tiny_dit_dir):
    model = dit_graft.from_pretrained(tiny_dit_dir)
    assert type(model).__name__ == "DiTTransformer2DModel"


def test_weight_integrity_errors_name_the_problem(tmp_path, tiny_dit_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dit_dir, broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["proj_out_2.weight"] = torch.zeros(3, 3)
    save_file(state, weights)
    with pytest.raises(IntegrityError, match=r"proj_out_2.weight has shape \(3, 3\)"):
        load_model(broken)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(IntegrityError, match="corrupt or truncated"):
        load_model(broken)
    weights.unlink()
    with pytest.raises(IntegrityError, match="missing weights file"):
        load_model(broken)


def test_a_deep_copy_of_a_student_records_its_own_grid(tmp_path):
    import copy

    teacher = tiny_dit()
    student = apply(teacher, plan(teacher, _recipe(tmp_path)))
    clone = copy.deepcopy(student)
    with torch.no_grad():
        clone(**_inputs())
    assert clone._dit_graft_grid.hw == (4, 4) and student._dit_graft_grid.hw is None
    assert clone.transformer_blocks[0].attn1.processor.grid is clone._dit_graft_grid


def test_half_precision_export_reloads_in_its_dtype(tmp_path):
    teacher = tiny_dit()
    recipe = _recipe(tmp_path)
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "half", dtype="bfloat16")
    reloaded = dit_graft.from_pretrained(out)
    assert all(p.dtype == torch.bfloat16 for p in reloaded.parameters())
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, student.state_dict()[k].to(torch.bfloat16)), k


def test_config_only_directory_fails_before_building_the_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", "num_layers": 10**6}))
    with pytest.raises(IntegrityError, match="missing weights file"):
        dit_graft.from_pretrained(tmp_path)
