"""The Wan family: adapters against diffusers' WanAttnProcessor, the sampler against WanPipeline, Wan's original
checkpoint layout against diffusers' own converter, the bundled full-size configs, and a tiny Wan end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dit_graft
from dit_graft.errors import IntegrityError
from dit_graft.families.wan import (
    SAMPLING,
    TINY_LATENT,
    TINY_WAN,
    VIDEO_SIZES,
    WAN,
    Sampling,
    convert_original_wan_state_dict,
    expert_sigma_range,
    latent_frames,
    link_experts,
    original_wan_config,
    released_model,
    sampling,
    scheduler,
    set_sampling,
    shifted_sigma,
    tiny_wan,
    to_original_wan_state_dict,
    video_latent,
)
from dit_graft.loading import build_from_config, read_config, resolve_source
from dit_graft.model.attention import AttentionCore, GraftedAttnProcessor
from dit_graft.model.checkpoints import detect_layout
from tests.test_cli import run_cli

# An I2V-shaped tiny Wan: CLIP image tokens (width 8) through add_k_proj/add_v_proj in every attn2.
TINY_I2V = dict(image_dim=8, added_kv_proj_dim=24)


class SoftmaxCore(AttentionCore):
    """Plain SDPA: the core under which an adapter must reproduce the teacher exactly."""

    op = "softmax"

    def __init__(self) -> None:
        super().__init__()
        self.layouts = []

    def forward(self, q, k, v, layout, key_mask=None):
        self.layouts.append(layout)
        return F.scaled_dot_product_attention(q, k, v)


def _inputs(image: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(
        hidden_states=torch.randn(2, 4, *TINY_LATENT, generator=g),
        timestep=torch.tensor([300.0, 950.0]),
        encoder_hidden_states=torch.randn(2, 512, TINY_WAN["text_dim"], generator=g),
        return_dict=False,
    )
    if image:
        kwargs["encoder_hidden_states_image"] = torch.randn(2, 5, 8, generator=g)
    return kwargs


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_adapters_with_a_softmax_core_reproduce_wans_processor_exactly(image):
    model = tiny_wan(**(TINY_I2V if image else {}))
    WAN.install_grid(model)
    kwargs = _inputs(image)
    with torch.no_grad():
        reference = model(**kwargs)[0]
    cores = {}
    for site in WAN.sites(model):
        if site.kind == "attention":
            cores[site.path] = SoftmaxCore()
            model.get_submodule(site.path).set_processor(GraftedAttnProcessor(site.adapter, cores[site.path]))
    with torch.no_grad():
        out = model(**kwargs)[0]
    assert torch.equal(out, reference)
    grid = (3, 2, 3)  # TINY_LATENT (3, 4, 6) under the (1, 2, 2) patch
    assert cores["blocks.1.attn1"].layouts[0].grid == grid and cores["blocks.1.attn1"].layouts[0].context is None
    assert cores["blocks.1.attn2"].layouts[0].context == 512 and cores["blocks.1.attn2"].layouts[0].grid == grid


def test_sites_groups_caps_and_depth_group():
    model = tiny_wan()
    sites = WAN.sites(model)
    assert [(s.path, s.kind, s.group) for s in sites[:3]] == [
        ("blocks.0.attn1", "attention", "self"),
        ("blocks.0.ffn", "mlp", "self"),
        ("blocks.0.attn2", "attention", "cross"),
    ]
    assert sites[0].attention.grid_dims == 3 and sites[0].attention.text == "none"
    assert sites[2].attention.text == "cross" and sites[2].attention.grid_dims == 3  # the queries are the grid
    assert WAN.depth_group(None).attr == "blocks" and WAN.num_layers(model) == 2
    assert type(WAN.stock_processor(sites[0])).__name__ == "WanAttnProcessor"


def test_video_geometry():
    model = build_from_config(read_config(resolve_source("bundled:configs/wan2.1-t2v-1.3b")), meta=True)
    five = build_from_config(read_config(resolve_source("bundled:configs/wan2.2-ti2v-5b")), meta=True)
    assert latent_frames(81) == 21 and latent_frames(1) == 1
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        latent_frames(80)
    assert video_latent(model, *VIDEO_SIZES["480p×81"]) == (21, 60, 104)  # 21 · 30 · 52 = 32,760 tokens
    assert video_latent(model, *VIDEO_SIZES["720p×81"]) == (21, 90, 160)
    assert video_latent(five, *VIDEO_SIZES["480p×81"]) == (21, 30, 52)  # Wan2.2's VAE: 16× spatially
    assert WAN.cost_sizes(model) == {"480p×81": (21, 60, 104), "720p×81": (21, 90, 160)}
    assert WAN.cost_sizes(five) == {"480p×81": (21, 30, 52), "720p×81": (21, 44, 80)}  # 5B's 720p: 704×1280
    assert WAN.latent_shape(model) == (16, 21, 60, 104) and WAN.latent_shape(five) == (48, 21, 30, 52)
    assert WAN.latent_shape(model, 8) == (16, 21, 8, 8) and WAN.latent_shape(model, (3, 4, 6)) == (16, 3, 4, 6)
    with pytest.raises(ValueError, match="multiples of 16×16 px"):
        video_latent(model, 81, 480, 840)


def test_bundled_full_size_configs_count_the_published_sizes():
    counts = {}
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b"):
        model = build_from_config(read_config(resolve_source(f"bundled:configs/{name}")), meta=True)
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts == {
        "wan2.1-t2v-1.3b": 1_418_996_800,  # 1.42B
        "wan2.1-t2v-14b": 14_288_491_584,  # 14.29B
        "wan2.2-ti2v-5b": 4_999_787_712,  # 5.00B
        "wan2.2-t2v-a14b": 14_288_491_584,  # each of the two experts
    }


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_original_layout_converts_exactly_and_agrees_with_diffusers_converter(image):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = tiny_wan(seed=3, **(TINY_I2V if image else {}))
    original = to_original_wan_state_dict(model)
    assert "blocks.1.self_attn.q.weight" in original and "head.modulation" in original
    assert ("blocks.0.cross_attn.k_img.weight" in original) == image
    assert detect_layout(original.keys()).name == "original-wan"
    config = original_wan_config({k: v.shape for k, v in original.items()}, num_heads=2)
    for key in ("in_channels", "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers", "attention_head_dim"):
        assert config[key] == TINY_WAN[key], key
    assert config["image_dim"] == (8 if image else None)
    rebuilt = build_from_config(config)
    rebuilt.load_state_dict(convert_original_wan_state_dict(original, rebuilt), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    ours = convert_original_wan_state_dict({"model.diffusion_model." + k: v for k, v in original.items()}, rebuilt)
    theirs = convert_wan_transformer_to_diffusers(dict(original))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(rebuilt(**_inputs(image))[0], model(**_inputs(image))[0])


def test_original_layout_errors_name_the_key():
    model = tiny_wan()
    original = to_original_wan_state_dict(model)
    with pytest.raises(IntegrityError, match="unknown key 'blocks.0.extra.weight'"):
        convert_original_wan_state_dict({**original, "blocks.0.extra.weight": torch.zeros(1)}, model)
    missing = {k: v for k, v in original.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(IntegrityError, match="lacks 'blocks.1.ffn.2.bias'"):
        convert_original_wan_state_dict(missing, model)
    with pytest.raises(IntegrityError, match="'blocks.0.self_attn.q.weight' → 'blocks.0.attn1.to_q.weight': shape"):
        convert_original_wan_state_dict({**original, "blocks.0.self_attn.q.weight": torch.zeros(24, 23)}, model)
    shapes = {k: v.shape for k, v in original.items()}
    with pytest.raises(IntegrityError, match="width 24 is no multiple of Wan's head width 128: set model.num_heads"):
        original_wan_config(shapes)  # 24 is no multiple of Wan's head width 128
    with pytest.raises(IntegrityError, match="set model.num_heads"):
        original_wan_config(shapes, num_heads=5)


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4
    ).eval()


def _pipeline(transformer, shift: float = 3.0, **extra):
    """WanPipeline around `transformer` with the tiny VAE and UniPC at `shift` (extra: transformer_2, ...)."""
    from diffusers import WanPipeline

    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=_tiny_vae(), scheduler=scheduler(shift), transformer=transformer, **extra
    )


def _generate(pipe, embeds, negative="zeros", **kwargs):
    """The pipeline's frames for a 32×48 video of 9 frames (kwargs override), with zero negative captions by default
    (None: no negative captions)."""
    if negative == "zeros":
        negative = torch.zeros(1, 512, TINY_WAN["text_dim"])
    if negative is not None:
        kwargs["negative_prompt_embeds"] = negative
    return pipe(prompt_embeds=embeds, **{"height": 32, "width": 48, "num_frames": 9, **kwargs}).frames


def test_sampler_is_wan_pipelines_denoising_loop():
    model = tiny_wan()
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 3, 4, 6, generator=g)
    embeds = torch.randn(2, 512, TINY_WAN["text_dim"], generator=g)
    negative = torch.randn(1, 512, TINY_WAN["text_dim"], generator=g)
    ours = WAN.sample(model, latents, {"prompt_embeds": embeds}, steps=4, cfg=5.0, null={"prompt_embeds": negative})
    theirs = _generate(
        _pipeline(model),
        embeds,
        negative.expand(2, -1, -1),
        latents=latents,
        num_inference_steps=4,
        guidance_scale=5.0,
        output_type="latent",
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    plain = WAN.sample(model, latents, {"prompt_embeds": embeds}, steps=4)
    assert not torch.allclose(plain, ours)


def test_noise_conditions_and_experts():
    model = tiny_wan()
    x0 = torch.randn(64, 4, 3, 4, 6)
    xt, sigma, target = WAN.noise(model, x0, torch.Generator().manual_seed(0))
    s = sigma.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(xt, x0 + s * target)  # x_σ = (1 − σ) x0 + σ ε, target ε − x0
    assert sigma.min() >= 0 and sigma.max() <= 1 and sigma.median() > 0.6  # shift 3 spends time at high noise
    lo, hi = expert_sigma_range(1, 0.875)
    model._dit_graft_sigma_range = (lo, hi)
    _, sigma, _ = WAN.noise(model, x0, torch.Generator().manual_seed(0))
    assert sigma.max() < 0.875 and expert_sigma_range(0, 0.875) == (0.875, 1.0)
    with pytest.raises(ValueError, match="image-conditioned"):
        WAN.conditions(tiny_wan(**TINY_I2V, in_channels=8), 2)
    cond = WAN.conditions(model, 10)
    assert set(cond) == {"prompt_embeds"} and cond["prompt_embeds"].shape == (10, 512, TINY_WAN["text_dim"])
    assert torch.equal(WAN.null_conditions(model)["prompt_embeds"], torch.zeros(1, 512, TINY_WAN["text_dim"]))


def test_tiny_wan_converts_end_to_end_and_runs_in_wan_pipeline(tmp_path, write_recipe, capsys):
    tiny_wan(num_layers=3).save_pretrained(tmp_path / "teacher")
    data = {
        "model": {"source": str(tmp_path / "teacher")},
        "graft": [
            {"site": "mlp", "layers": [1], "op": "mlp_ratio", "options": {"ratio": 0.5}},
            {"site": "depth", "op": "prune_depth", "options": {"keep": 2, "calibration_samples": 2}},
        ],
        "distill": {"steps": 2, "batch_size": 2, "pool_size": 2, "pool_steps": 2, "warmup": 1, "resolution": 32},
    }
    code, _, stderr = run_cli(["convert", write_recipe(data), "--out", tmp_path / "student"], capsys)
    assert code == 0, stderr
    graft = json.loads((tmp_path / "student" / "graft.json").read_text())
    assert graft["plan"]["family"] == "wan"
    student = dit_graft.from_pretrained(tmp_path / "student")
    again = dit_graft.from_pretrained(tmp_path / "student")
    assert len(student.blocks) == 2 and student.config.num_layers == 2  # prune_depth kept 2 of 3 blocks
    assert sorted(b.ffn.net[2].in_features for b in student.blocks) in (
        [12, 32],
        [32, 32],
    )  # mlp_ratio 0.5: 12 hidden units
    for k, v in student.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(student(**_inputs())[0], again(**_inputs())[0])
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 512, TINY_WAN["text_dim"], generator=g)
    video = _generate(_pipeline(student), embeds, num_inference_steps=2, output_type="np")
    assert video.shape == (1, 9, 32, 48, 3) and torch.isfinite(torch.from_numpy(video)).all()


def test_linked_a14b_experts_sample_as_wan_pipeline_with_transformer_2():

    high, low = tiny_wan(seed=1), tiny_wan(seed=2)
    link_experts(high, low, 0.875)
    assert high._dit_graft_sigma_range == (0.875, 1.0) and low._dit_graft_sigma_range == (0.0, 0.875)
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(1, 4, 3, 4, 6, generator=g)
    embeds = torch.randn(1, 512, TINY_WAN["text_dim"], generator=g)
    ours = WAN.sample(low, latents, {"prompt_embeds": embeds}, steps=4, cfg=4.0)  # either expert samples the pair
    pipe = _pipeline(high, transformer_2=low, boundary_ratio=0.875)
    theirs = _generate(
        pipe,
        embeds,
        latents=latents,
        num_inference_steps=4,  # timesteps 1000, 900 (high), 750, 500 (low)
        guidance_scale=4.0,
        output_type="latent",
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    alone = WAN.sample(tiny_wan(seed=2), latents, {"prompt_embeds": embeds}, steps=4, cfg=4.0)
    assert not torch.allclose(alone, ours)


def test_one_recipe_converts_both_a14b_experts(tmp_path, write_recipe, capsys):

    for sub, seed in (("transformer", 1), ("transformer_2", 2)):
        tiny_wan(seed=seed).save_pretrained(tmp_path / "teacher" / sub)
    data = {
        "model": {
            "source": str(tmp_path / "teacher"),
            "experts": {"subfolders": ["transformer", "transformer_2"], "boundary": 0.875},
        },
        "graft": [{"site": "mlp", "layers": [0], "op": "mlp_ratio", "options": {"ratio": 0.5}}],
        "distill": {"steps": 2, "batch_size": 2, "pool_size": 2, "pool_steps": 2, "warmup": 1, "resolution": 32},
    }
    code, _, stderr = run_cli(["convert", write_recipe(data), "--out", tmp_path / "student"], capsys)
    assert code == 0, stderr
    index = json.loads((tmp_path / "student" / "experts.json").read_text())
    assert index == {"subfolders": ["transformer", "transformer_2"], "boundary_ratio": 0.875}
    high, low = (dit_graft.from_pretrained(tmp_path / "student" / sub) for sub in index["subfolders"])
    assert high.blocks[0].ffn.net[2].in_features == low.blocks[0].ffn.net[2].in_features == 12
    recipe = json.loads((tmp_path / "student" / "transformer_2" / "graft.json").read_text())["recipe"]
    assert recipe["model"]["subfolder"] == "transformer_2" and recipe["model"]["experts"] is None
    pipe = _pipeline(high, transformer_2=low, boundary_ratio=index["boundary_ratio"])
    embeds = torch.randn(1, 512, TINY_WAN["text_dim"])
    video = _generate(pipe, embeds, num_frames=5, num_inference_steps=4, output_type="np")
    assert video.shape == (1, 5, 32, 48, 3) and torch.isfinite(torch.from_numpy(video)).all()


def test_original_single_file_loads_with_its_config_read_off_the_keys(tmp_path):
    from safetensors.torch import save_file

    from dit_graft.loading import load_model

    model = tiny_wan(seed=4)
    path = tmp_path / "wan2.1_t2v_tiny.safetensors"
    save_file(
        {"model.diffusion_model." + k: v.contiguous() for k, v in to_original_wan_state_dict(model).items()}, path
    )
    loaded = load_model(path, num_heads=2)
    assert type(loaded).__name__ == "WanTransformer3DModel" and loaded.config.num_attention_heads == 2
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert load_model(path, num_heads=2, meta=True).blocks[0].attn1.to_q.weight.is_meta
    with pytest.raises(IntegrityError, match="wan2.1_t2v_tiny.safetensors: width 24 .*set model.num_heads"):
        load_model(path)


class PerFrameCore(AttentionCore):
    """Softmax within each latent frame, the mask built from the tiny grid's sizes (not from the layout)."""

    op = "per-frame"

    def forward(self, q, k, v, layout, key_mask=None):
        frame = torch.arange(q.shape[2]) // (2 * 3)  # (3, 2, 3) grid, frame-major as Wan flattens (F, H, W)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=frame[:, None] == frame[None, :])


@pytest.mark.parametrize(
    "op, options",
    [("tile", {"group": 1, "global_frames": 0}), ("local", {"window": 8.0, "shape": "square", "temporal_window": 0})],
)
def test_grid_operators_read_wans_frames_from_the_layout(op, options):
    from dit_graft.plan import apply, plan
    from dit_graft.recipe import validate

    teacher = tiny_wan()
    recipe = validate({"model": {"source": "x"}, "graft": [{"site": "attention", "op": op, "options": options}]})
    student = apply(teacher, plan(teacher, recipe))
    reference = tiny_wan()  # the teacher's weights (same seed), every attn1 on the per-frame core
    WAN.install_grid(reference)
    for site in WAN.sites(reference):
        if site.path.endswith("attn1"):
            reference.get_submodule(site.path).set_processor(GraftedAttnProcessor(site.adapter, PerFrameCore()))
    inputs = WAN.tiny_inputs(teacher)
    with torch.no_grad():
        ours = WAN.forward(student, inputs["x"], inputs["t"], inputs["cond"])
        theirs = WAN.forward(reference, inputs["x"], inputs["t"], inputs["cond"])
        full = WAN.forward(teacher, inputs["x"], inputs["t"], inputs["cond"])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - full).abs().max() > 1e-3  # the per-frame pattern is not the full attention


def test_a_linked_partner_samples_in_the_experts_dtype_and_keeps_its_own_weights():
    high, low = tiny_wan(seed=1), tiny_wan(seed=2).to(torch.bfloat16)
    link_experts(high, low, 0.875)
    before = {k: v.clone() for k, v in high.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = WAN.sample(low, torch.randn(1, 4, 3, 4, 6, generator=g), {"prompt_embeds": torch.randn(1, 512, 16)}, steps=3)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in high.state_dict().items())


def test_per_token_timesteps_of_ti2v_equal_one_per_sample_for_text_to_video():

    model = tiny_wan()
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 3, 4, 6, generator=g)
    embeds = torch.randn(1, 512, TINY_WAN["text_dim"], generator=g)
    ours = WAN.sample(model, latents, {"prompt_embeds": embeds}, steps=3)
    pipe = _pipeline(model, expand_timesteps=True)  # Wan2.2 TI2V-5B's pipeline: a timestep per token
    theirs = _generate(
        pipe, embeds, None, latents=latents, num_inference_steps=3, guidance_scale=1.0, output_type="latent"
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_experts_of_a_family_without_them_are_refused(tmp_path, write_recipe, capsys):
    from tests.conftest import tiny_dit

    for sub in ("a", "b"):
        tiny_dit().save_pretrained(tmp_path / "teacher" / sub)
    data = {
        "model": {"source": str(tmp_path / "teacher"), "experts": {"subfolders": ["a", "b"], "boundary": 0.5}},
        "graft": [{"site": "mlp", "layers": [0], "op": "mlp_ratio", "options": {"ratio": 2.0}}],
        "distill": {"steps": 1, "batch_size": 2, "pool_size": 2, "pool_steps": 1},
    }
    code, _, stderr = run_cli(["convert", write_recipe(data), "--out", tmp_path / "student"], capsys)
    assert code == 2 and "model.experts: the dit family has no timestep experts" in stderr
    assert not (tmp_path / "student").exists()
    data["model"]["experts"]["boundary"] = 1.5
    code, _, stderr = run_cli(["validate", write_recipe(data)], capsys)
    assert code == 2 and "boundary" in stderr


@pytest.mark.parametrize(
    "edit",
    [
        {"op": "parallel_blocks", "options": {"pairs": "all"}},
        {"op": "prune_depth", "options": {"method": "contiguous", "keep": 2, "calibration_samples": 2}},
        {
            "op": "prune_depth",
            "options": {"method": "learnable", "group_size": 2, "keep_per_group": 1, "search_steps": 5},
        },
    ],
    ids=["parallel", "contiguous", "learnable"],
)
def test_depth_edits_act_on_wans_blocks_and_reload_bitwise(tmp_path, edit):
    from dit_graft.export import export
    from dit_graft.plan import apply, plan
    from dit_graft.recipe import validate

    teacher = tiny_wan(num_layers=4)
    graft = [{"site": "depth", **edit}, {"site": "attention", "layers": "all", "op": "sla"}]
    recipe = validate({"model": {"source": "unused"}, "graft": graft})
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    assert len(student.blocks) == 2 and len([s for s in WAN.sites(student) if s.path.endswith("attn1")]) >= 2
    reloaded = dit_graft.from_pretrained(export(student, graft_plan, recipe.model_dump(), tmp_path / "out", {}))
    inputs = WAN.tiny_inputs(teacher)
    with torch.no_grad():
        ours = WAN.forward(student, inputs["x"], inputs["t"], inputs["cond"])
        assert torch.equal(ours, WAN.forward(reloaded, inputs["x"], inputs["t"], inputs["cond"]))


def test_each_bundled_config_samples_with_its_released_flow_shift_and_guidance():
    """Shift and guidance per model, as the authors' configs give them (Wan2.1 generate.py, Wan2.2 wan/configs)."""
    assert SAMPLING == {
        "wan2.1-t2v-1.3b": Sampling(3.0, 5.0),
        "wan2.1-t2v-14b": Sampling(5.0, 5.0),
        "wan2.2-ti2v-5b": Sampling(5.0, 5.0),
        "wan2.2-t2v-a14b": Sampling(12.0, 4.0, 3.0),
    }
    models = {
        name: build_from_config(read_config(resolve_source(f"bundled:configs/{name}")), meta=True) for name in SAMPLING
    }
    high, low = models["wan2.2-t2v-a14b"], build_from_config(dict(models["wan2.2-t2v-a14b"].config), meta=True)
    assert released_model(high) == "wan2.1-t2v-14b"  # the same architecture, until linked as experts
    link_experts(high, low, 0.875)
    for name, model in models.items():
        assert released_model(model) == name and sampling(model) == SAMPLING[name]
        options = {"flow_shift": SAMPLING[name].flow_shift}
        if SAMPLING[name].guidance_2 is not None:
            options["guidance_2"] = SAMPLING[name].guidance_2
        assert WAN.runtime_options(model) == options  # recorded in graft.json
    assert sampling(low) == SAMPLING["wan2.2-t2v-a14b"]
    assert sampling(tiny_wan()) == Sampling(3.0, 5.0, None)  # other sizes: WanPipeline's defaults


@pytest.mark.parametrize("shift", [3.0, 5.0, 12.0])
def test_sampler_is_wan_pipeline_with_unipc_at_the_models_flow_shift(shift):

    model = set_sampling(tiny_wan(), flow_shift=shift)
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 4, 3, 4, 6, generator=g)
    embeds = torch.randn(1, 512, TINY_WAN["text_dim"], generator=g)
    ours = WAN.sample(model, latents, {"prompt_embeds": embeds}, steps=4, cfg=5.0)
    pipe = _pipeline(model, shift)
    theirs = _generate(pipe, embeds, latents=latents, num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if shift != 3.0:  # the shift matters: the default scheduler gives another video
        other = WAN.sample(
            set_sampling(tiny_wan(), flow_shift=3.0), latents, {"prompt_embeds": embeds}, steps=4, cfg=5.0
        )
        assert not torch.allclose(other, ours, atol=1e-4)


def test_training_noise_uses_the_models_flow_shift():
    x0 = torch.randn(256, 4, 3, 4, 6)
    for shift in (3.0, 12.0):
        model = set_sampling(tiny_wan(), flow_shift=shift)
        gen = torch.Generator().manual_seed(0)
        _, sigma, _ = WAN.noise(model, x0, gen)
        u = torch.rand(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        torch.testing.assert_close(sigma, shifted_sigma(u, shift).float())
    high, low = set_sampling(tiny_wan(seed=1), flow_shift=12.0), set_sampling(tiny_wan(seed=2), flow_shift=12.0)
    link_experts(high, low, 0.875)
    _, sigma, _ = WAN.noise(low, x0, torch.Generator().manual_seed(0))
    assert sigma.max() < 0.875 and sampling(low).flow_shift == 12.0


def test_a14b_experts_take_their_own_guidance_scales_as_wan_pipelines_guidance_scale_2():

    high, low = tiny_wan(seed=1), tiny_wan(seed=2)
    for model in (high, low):
        set_sampling(model, flow_shift=12.0, guidance_2=3.0)
    link_experts(high, low, 0.875)
    g = torch.Generator().manual_seed(8)
    latents = torch.randn(1, 4, 3, 4, 6, generator=g)
    embeds = torch.randn(1, 512, TINY_WAN["text_dim"], generator=g)
    ours = WAN.sample(high, latents, {"prompt_embeds": embeds}, steps=4, cfg=4.0)
    pipe = _pipeline(high, 12.0, transformer_2=low, boundary_ratio=0.875)
    theirs = _generate(
        pipe, embeds, latents=latents, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0,
        output_type="latent",
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    same = WAN.sample(high, latents, {"prompt_embeds": embeds}, steps=4, cfg=4.0, cfg_2=4.0)
    assert not torch.allclose(same, ours, atol=1e-4)
    unguided = WAN.sample(high, latents, {"prompt_embeds": embeds}, steps=4)  # the pool: no guidance anywhere
    assert torch.isfinite(unguided).all()


def test_recipe_options_set_the_flow_shift_and_the_export_keeps_it(tmp_path, write_recipe, capsys):
    tiny_wan().save_pretrained(tmp_path / "teacher")
    data = {
        "model": {"source": str(tmp_path / "teacher"), "options": {"flow_shift": 7.0}},
        "graft": [{"site": "mlp", "layers": [0], "op": "mlp_ratio", "options": {"ratio": 0.5}}],
        "distill": {"steps": 1, "batch_size": 2, "pool_size": 2, "pool_steps": 2, "warmup": 1, "resolution": 32},
    }
    code, _, stderr = run_cli(["convert", write_recipe(data), "--out", tmp_path / "student"], capsys)
    assert code == 0, stderr
    graft = json.loads((tmp_path / "student" / "graft.json").read_text())
    assert graft["plan"]["runtime"] == {"flow_shift": 7.0}
    assert sampling(dit_graft.from_pretrained(tmp_path / "student")).flow_shift == 7.0
    data["model"]["options"] = {"shift": 7.0}
    code, _, stderr = run_cli(["convert", write_recipe(data), "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "model.options: the wan family has no runtime option 'shift'" in stderr
    with pytest.raises(ValueError, match="flow_shift is a positive number"):
        set_sampling(tiny_wan(), flow_shift=0)
