"""PixArt and FLUX families on tiny configs: plan, joint-attention processors, convert → export → reload → pipeline."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel
from safetensors.torch import load_file, save_file

import dit_graft
from dit_graft.cost import model_cost
from dit_graft.errors import IntegrityError, RecipeError
from dit_graft.export import export
from dit_graft.families import count_flops, family_for
from dit_graft.loading import build_from_config, bundled_models, load_model, read_config, resolve_source
from dit_graft.model.layout import TokenLayout
from dit_graft.plan import apply, plan
from dit_graft.recipe import bundled_recipes, validate
from dit_graft.training.run import distill
from tests.conftest import _tiny_config, op_of
from tests.test_cli import run_cli

TINY_PIXART = _tiny_config("pixart")
TINY_FLUX = _tiny_config("flux")


def _nudge(model):
    """Random-init models start with zero adaLN gates in places: make every block matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and ("norm" in name or "proj_out" in name):
                p.normal_(0, 0.05)
    return model.eval()


def tiny_pixart():
    torch.manual_seed(0)
    return _nudge(PixArtTransformer2DModel(**TINY_PIXART))


def tiny_flux(**overrides):
    torch.manual_seed(0)
    return _nudge(FluxTransformer2DModel(**{**TINY_FLUX, **overrides}))


def _recipe(graft, **distill_options):
    distill = {"steps": 3, "batch_size": 2, "pool_size": 4, "pool_steps": 2, "warmup": 1, "log_every": 1}
    return validate({"model": {"source": "unused"}, "graft": graft, "distill": {**distill, **distill_options}})


PIXART_GRAFT = [
    {"site": "attention", "op": "linear", "options": {"dwconv": 3}},
    {"site": "mlp", "layers": [1], "op": "mlp_ratio", "options": {"ratio": 2}},
]
FLUX_GRAFT = [
    {"site": "attention", "group": "double", "op": "local", "options": {"window": 1.5}},
    {"site": "attention", "group": "single", "layers": "0", "op": "linear", "options": {"heads": 1}},
    {"site": "attention", "group": "single", "layers": "1", "op": "local", "options": {"window": 2}},
]


def test_sites_groups_and_plans_name_the_real_modules():
    pixart, flux = tiny_pixart(), tiny_flux()
    p = plan(pixart, _recipe(PIXART_GRAFT))
    assert [m.path for m in p.edits[0].modules] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert [m.path for m in p.edits[1].modules] == ["transformer_blocks.1.ff"]
    cross = plan(pixart, _recipe([{"site": "attention", "group": "cross", "op": "softmax"}]))
    assert [m.path for m in cross.edits[0].modules] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    f = plan(flux, _recipe(FLUX_GRAFT))
    assert [m.path for m in f.edits[0].modules] == ["transformer_blocks.0.attn"]
    assert [m.path for m in f.edits[1].modules] == ["single_transformer_blocks.0.attn"]
    assert [m.path for m in f.edits[2].modules] == ["single_transformer_blocks.1.attn"]
    with pytest.raises(RecipeError, match=r"layer 1 out of range \(the model has layers 0-0\)"):
        plan(flux, _recipe([{"site": "attention", "group": "double", "layers": [1], "op": "linear"}]))


@pytest.mark.parametrize(
    "model, edit, message",
    [
        (tiny_flux, {"site": "attention", "op": "gated_conv"}, "'gated_conv' is not supported on the flux .*no keys"),
        (tiny_flux, {"site": "attention", "group": "single", "op": "gated_conv"}, "lose their only path to the text"),
        (
            tiny_pixart,
            {"site": "attention", "group": "cross", "op": "local"},
            "'local' is not supported on the pixart family's cross .*cross-attention",
        ),
        (tiny_pixart, {"site": "attention", "group": "double", "op": "linear"}, "has no block group 'double'"),
        (tiny_flux, {"site": "mlp", "group": "single", "op": "mlp_ratio"}, "single blocks have no mlp sites"),
    ],
)
def test_unsupported_operators_and_groups_are_refused_before_any_mutation(model, edit, message):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    processors = {n: type(p) for n, p in m.attn_processors.items()}
    with pytest.raises(RecipeError, match=message):
        plan(m, _recipe([edit]))
    assert {n: type(p) for n, p in m.attn_processors.items()} == processors
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_pixart_cross_attention_is_graftable_by_choice():
    teacher = tiny_pixart()
    edit = {"site": "attention", "group": "cross", "layers": [0], "op": "linear", "options": {"dwconv": 0, "heads": 1}}
    student = apply(teacher, plan(teacher, _recipe([edit])))
    assert op_of(student.transformer_blocks[0].attn2.processor) == "linear"
    assert type(student.transformer_blocks[1].attn2.processor).__name__ == "AttnProcessor2_0"
    assert type(student.transformer_blocks[0].attn1.processor).__name__ == "AttnProcessor2_0"
    attn = student.transformer_blocks[0].attn2.double()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 5, 16, generator=g, dtype=torch.float64), torch.randn(2, 4, 16, generator=g).double()
    bias = torch.tensor([[0.0, 0, 0, -10000], [0, 0, -10000, -10000]], dtype=torch.float64)[:, None]  # (B, 1, T)
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=ctx, attention_mask=bias)
        q, k, v = torch.relu(attn.to_q(x)), torch.relu(attn.to_k(ctx)), attn.to_v(ctx)  # one head of 16
        k = k * (bias[:, 0, :, None] == 0)
        expected = attn.to_out[0]((q @ (k.transpose(1, 2) @ v)) / (q @ k.sum(1, keepdim=True).transpose(1, 2) + 1e-6))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        ctx[1, 2:] = 100.0  # masked caption tokens do not matter
        torch.testing.assert_close(attn(x, encoder_hidden_states=ctx, attention_mask=bias), out, rtol=0, atol=0)
    with pytest.raises(RecipeError, match="dwconv: 0"):
        apply(teacher, plan(teacher, _recipe([{**edit, "options": {}}])))


def test_recipes_reject_unknown_groups():
    with pytest.raises(RecipeError, match="graft.0.group: unknown block group 'triple'"):
        _recipe([{"site": "attention", "group": "triple", "op": "linear"}])


def _joint_inputs(model, text=5, h=3, w=4, seed=0):
    """Double-stream inputs of a FluxAttention in float64, and the model's RoPE for them."""
    from dit_graft.families.flux import image_ids

    g = torch.Generator().manual_seed(seed)
    dim = model.transformer_blocks[0].attn.to_q.in_features
    image = torch.randn(2, h * w, dim, generator=g, dtype=torch.float64)
    words = torch.randn(2, text, dim, generator=g, dtype=torch.float64)
    cos, sin = model.pos_embed(torch.cat([torch.zeros(text, 3), image_ids(h, w, "cpu")]))
    return image, words, (cos.double(), sin.double())


@pytest.mark.parametrize("op", ["linear", "local"])
def test_kept_softmax_rows_use_rope_exactly_like_the_teachers_processor(op):
    teacher = tiny_flux().double()
    edits = [{"site": "attention", "group": g, "op": op, "options": {"window": 1}} for g in ("double", "single")]
    if op == "linear":
        for e in edits:
            e["options"] = {"dwconv": 3}
    student = apply(teacher, plan(teacher, _recipe(edits)))
    image, words, rope = _joint_inputs(teacher)
    t_double, s_double = teacher.transformer_blocks[0].attn, student.transformer_blocks[0].attn
    student._dit_graft_grid.text, student._dit_graft_grid.hw = 5, (3, 4)  # what the model's hook records
    with torch.no_grad():
        t_img, t_txt = t_double(image, words, image_rotary_emb=rope)
        s_img, s_txt = s_double(image, words, image_rotary_emb=rope)
        torch.testing.assert_close(s_txt, t_txt, rtol=0, atol=1e-12)  # text queries: softmax over every key
        assert (s_img - t_img).abs().max() > 1e-3  # image queries: the operator
        no_rope = s_double(image, words)[1]
        assert (no_rope - t_txt).abs().max() > 1e-3  # so RoPE really is what makes them agree
        joint = torch.cat([words, image], 1)
        t_single = teacher.single_transformer_blocks[0].attn(joint, image_rotary_emb=rope)
        s_single = student.single_transformer_blocks[0].attn(joint, image_rotary_emb=rope)
    torch.testing.assert_close(s_single[:, :5], t_single[:, :5], rtol=0, atol=1e-12)
    assert (s_single[:, 5:] - t_single[:, 5:]).abs().max() > 1e-3


def test_local_covering_the_grid_and_explicit_softmax_reproduce_the_teacher_bitwise():
    teacher = tiny_flux()
    fam = family_for(teacher)
    cond = fam.conditions(teacher, 2)
    x, t = torch.randn(2, 4, 8, 6), torch.rand(2)
    with torch.no_grad():
        reference = fam.forward(teacher, x, t, cond)
        for op, options in (("local", {"window": 100}), ("softmax", {})):
            edits = [{"site": "attention", "group": g, "op": op, "options": options} for g in ("double", "single")]
            student = apply(teacher, plan(teacher, _recipe(edits)))
            assert torch.equal(fam.forward(student, x, t, cond), reference), op
            assert student._dit_graft_grid.hw == (4, 3) and student._dit_graft_grid.text == 16


def test_local_processor_masks_the_clear_pattern_and_counts_only_kept_pairs():
    teacher = tiny_flux(num_single_layers=0)
    student = apply(teacher, plan(teacher, _recipe([{"site": "attention", "op": "local", "options": {"window": 1.2}}])))
    processor = student.transformer_blocks[0].attn.processor
    assert op_of(processor) == "local"
    mask = processor.core.mask(TokenLayout(text=5, grid=(2, 3)), torch.device("cpu"))  # 5 text tokens, 2x3 grid
    assert mask[:5].all() and mask[:, :5].all()  # text queries see everything; every query sees the text
    expected = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 1, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[5:8, 5:], expected)  # radius 1.2: self and the 4-neighbours
    # FLOPs: the dense SDPA the CPU path runs is replaced by the kept pairs only
    before, after = model_cost(teacher.to("meta"), 8), model_cost(student.to("meta"), 8)  # 4x4 image, 512 text tokens
    _, measured = count_flops(student, family_for(student).example_inputs(student, 1, 8, "meta"))
    text, n, c = 512, 16, 16
    pairs_kept = text * (text + n) + n * text + 16 + 2 * 24  # image-image pairs: 16 self + 2 per grid edge
    dense = 4 * (text + n) ** 2 * c
    site = "transformer_blocks.0.attn"
    assert before["attention_flops"][site] == after["attention_flops"][site] + dense - 4 * pairs_kept * c
    assert before["attention_flops"][site] == measured[site]  # the teacher's formula is what is measured
    assert before["flops"] - after["flops"] == dense - 4 * pairs_kept * c
    assert site in after["attention_formula"]


def _captions_file(path, n=3, tokens=6, dim=24, pooled=None):
    g = torch.Generator().manual_seed(5)
    data = {"prompt_embeds": torch.randn(n, tokens, dim, generator=g), "prompt_attention_mask": torch.ones(n, tokens)}
    data["negative_prompt_embeds"] = torch.zeros(1, tokens, dim)
    data["negative_prompt_attention_mask"] = torch.ones(1, tokens)
    if pooled:
        data["pooled_prompt_embeds"] = torch.randn(n, pooled, generator=g)
    save_file(data, str(path))
    return path


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_distill_export_reload_is_bitwise_exact(tmp_path, family):
    teacher, graft = (tiny_pixart(), PIXART_GRAFT) if family == "pixart" else (tiny_flux(), FLUX_GRAFT)
    pooled = TINY_FLUX["pooled_projection_dim"] if family == "flux" else None
    conditions = str(_captions_file(tmp_path / "captions.safetensors", pooled=pooled))
    recipe = _recipe(graft, conditions=conditions, null_class_prob=0.5, lr=1e-2, resolution=64)
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".processor." in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = distill(teacher, student, recipe.distill, tmp_path / "work")
    assert len(result.log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.log)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    cached = load_file(str(tmp_path / "work" / "pool.safetensors"))
    assert cached["images"].shape == (4, 4, 8, 8)  # 64 px → 8x8 latents (VAE factor 8)
    assert torch.equal(cached["cond.prompt_embeds"][3], cached["cond.prompt_embeds"][0])  # 3 captions, cycled
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "export", {"steps": 3})
    reloaded = dit_graft.from_pretrained(out)
    fam = family_for(teacher)
    cond = fam.conditions(teacher, 2, conditions)
    x = torch.randn(2, 4, 8, 8)
    t = torch.rand(2) if family == "flux" else torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(fam.forward(student, x, t, cond), fam.forward(reloaded, x, t, cond))
    assert json.loads((out / "graft.json").read_text())["plan"]["family"] == family
    if family == "flux":
        assert op_of(reloaded.single_transformer_blocks[0].attn.processor) == "linear"


def _pixart_pipeline(transformer):
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8)
    return PixArtSigmaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )


def _flux_pipeline(transformer):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8, shift_factor=0.0)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_convert_cli_and_the_familys_diffusers_pipeline(tmp_path, family, write_recipe, capsys):
    teacher, graft = (tiny_pixart(), PIXART_GRAFT) if family == "pixart" else (tiny_flux(), FLUX_GRAFT)
    teacher.save_pretrained(tmp_path / "teacher")
    distill = {"steps": 2, "batch_size": 2, "pool_size": 2, "pool_steps": 1, "warmup": 1, "resolution": 64}
    data = {"model": {"source": str(tmp_path / "teacher")}, "graft": graft, "distill": distill}
    code, _, stderr = run_cli(["convert", write_recipe(data), "--out", tmp_path / "student"], capsys)
    assert code == 0, stderr
    student = dit_graft.from_pretrained(tmp_path / "student")
    g = torch.Generator().manual_seed(0)
    if family == "pixart":
        embeds, mask = torch.randn(2, 6, 24, generator=g), torch.ones(2, 6)
        images = _pixart_pipeline(student)(
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            negative_prompt=None,
            negative_prompt_embeds=torch.zeros(2, 6, 24),
            negative_prompt_attention_mask=mask,
            num_inference_steps=2,
            guidance_scale=4.5,
            use_resolution_binning=False,
            output_type="np",
        ).images
    else:
        images = _flux_pipeline(student)(
            prompt_embeds=torch.randn(2, 6, 24, generator=g),
            pooled_prompt_embeds=torch.randn(2, 12, generator=g),
            height=8,
            width=8,
            num_inference_steps=2,
            guidance_scale=3.5,
            output_type="np",
        ).images
    assert images.shape == (2, 8, 8, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_full_size_configs_on_the_meta_device():
    counts = {}
    for name in ("configs/dit-xl-2-256", "configs/pixart-sigma-1024", "configs/flux-dev"):
        assert name in bundled_models()
        model = build_from_config(read_config(resolve_source(f"bundled:{name}")), meta=True)
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts == {
        "configs/dit-xl-2-256": 749_826_464,  # diffusers layout; 675,129,632 in the original (families/dit_original.py)
        "configs/pixart-sigma-1024": 610_856_096,
        "configs/flux-dev": 11_901_408_320,
    }
    with pytest.raises(IntegrityError, match="bundled config without weights.*black-forest-labs/FLUX.1-dev"):
        load_model(resolve_source("bundled:configs/flux-dev"))  # refused before a 12B model is built


def test_bundled_full_size_recipes_validate_and_dry_run(capsys):
    names = {p.name: p for p in bundled_recipes()}
    expected = {
        "pixart-sigma-lit.yaml": "1 edit(s), 28 module(s) on PixArtTransformer2DModel",
        "flux-clear.yaml": "2 edit(s), 57 module(s) on FluxTransformer2DModel",
        "flux-lit.yaml": "2 edit(s), 57 module(s) on FluxTransformer2DModel",
        "dit-xl-2-lit.yaml": "1 edit(s), 28 module(s) on DiTTransformer2DModel",
    }
    for name, summary in expected.items():
        code, stdout, stderr = run_cli(["validate", names[name]], capsys)
        assert code == 0 and summary in stdout, stderr
    code, stdout, stderr = run_cli(
        ["convert", names["pixart-sigma-lit.yaml"], "--dry-run", "--resolution", "256,512"], capsys
    )
    assert code == 0, stderr
    assert "610.86M" in stdout and "cost per image by resolution" in stdout and "no weights loaded" in stdout
    assert "transformer_blocks.27.attn1" in stdout and "attn2" not in stdout
    code, _, stderr = run_cli(["convert", names["flux-clear.yaml"], "--dry-run", "--resolution", "100"], capsys)
    assert code == 2 and "a multiple of 16 px" in stderr
    code, _, stderr = run_cli(["convert", names["flux-clear.yaml"], "--resolution", "512"], capsys)
    assert code == 2 and "only with --dry-run" in stderr
    code, _, stderr = run_cli(
        ["convert", names["flux-clear.yaml"], "--set", "model.source=bundled:configs/flux-dev"], capsys
    )
    assert code == 3 and "bundled config without weights" in stderr  # a real conversion needs the hub id


def test_flow_euler_recovers_x0_under_the_exact_velocity():
    from dit_graft.diffusion import flow_euler_sample, flow_noise

    x0, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    velocity = lambda x, t: (x - x0) / t.view(-1, 1, 1, 1)  # v = ε − x0 on the straight path x_σ = (1 − σ)x0 + σε
    torch.testing.assert_close(flow_euler_sample(velocity, noise, steps=3, mu=1.0), x0)
    xt, sigma, target = flow_noise(x0, torch.Generator().manual_seed(0))
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(target, (xt - x0) / s)  # the training target is that velocity
    assert ((sigma > 0) & (sigma < 1)).all()


def test_yaml_groups_round_trip(tmp_path):
    text = yaml.safe_dump({"model": {"source": "x"}, "graft": FLUX_GRAFT})
    recipe = validate(yaml.safe_load(text))
    assert [e.group for e in recipe.graft] == ["double", "single", "single"]
