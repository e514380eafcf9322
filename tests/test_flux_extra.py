"""FLUX: swa, sparse and sla on the joint sequence (CLEAR way), their FLOPs, and single-file BFL checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from safetensors.torch import save_file

import dit_graft
from dit_graft.cost import model_cost
from dit_graft.errors import InputError, IntegrityError
from dit_graft.export import export
from dit_graft.families import family_for
from dit_graft.loading import ASSETS, load_model, read_config
from dit_graft.operators import OPERATORS
from dit_graft.operators import sparse as sparse_module
from dit_graft.plan import apply, plan
from dit_graft.training.run import distill
from tests.conftest import op_of
from tests.test_cli import run_cli
from tests.test_families import _joint_inputs, _recipe, tiny_flux

H, W = 4, 8  # a 4x8 image grid: 32 image tokens, two blocks of 16


def _graft(op, options, seed=0):
    """A float64 tiny FLUX and its student with `op` on every attention site; proj_l (sla) randomised."""
    teacher = tiny_flux().double()
    edits = [{"site": "attention", "group": g, "op": op, "options": options} for g in ("double", "single")]
    student = apply(teacher, plan(teacher, _recipe(edits)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".processor." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return teacher, student


def _outputs(model, image, words, rope, text):
    """(double-stream image out, its text out, single-stream joint out) of the first blocks' attention."""
    grid = getattr(model, "_dit_graft_grid", None)  # the student's; the teacher's processors need none
    if grid is not None:
        grid.text, grid.hw = text, (H, W)  # what the model's hook records
    with torch.no_grad():
        img, txt = model.transformer_blocks[0].attn(image, words, image_rotary_emb=rope)
        joint = model.single_transformer_blocks[0].attn(torch.cat([words, image], 1), image_rotary_emb=rope)
    return img, txt, joint


FULL = [
    ("swa", {"window": 62}),  # ⌊62/2⌋ = N − 1: every image key
    ("sparse", {"block": 16, "keep": 1.0}),
    ("sparse", {"block": 16, "keep": 2}),
    ("sla", {"block": 16, "critical": 1.0, "negligible": 0}),
]


@pytest.mark.parametrize("text", [16, 5])  # text fills whole blocks (the kernel path) or not (the masked path)
@pytest.mark.parametrize("op, options", FULL)
def test_full_coverage_is_the_teachers_joint_softmax_with_rope(op, options, text):
    teacher, student = _graft(op, options)
    image, words, rope = _joint_inputs(teacher, text=text, h=H, w=W)
    expected = _outputs(teacher, image, words, rope, text)
    got = _outputs(student, image, words, rope, text)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=0, atol=1e-12)
    assert (_outputs(student, image, words, None, text)[1] - expected[1]).abs().max() > 1e-3  # RoPE matters


def _qkv(attn, hidden, context, rope):
    """q, k, v (B, H, L, d) of the joint [text; image] sequence: the FluxAttention's modules, diffusers' RoPE."""
    split = lambda x: x.unflatten(-1, (attn.heads, attn.head_dim))
    q, k, v = attn.norm_q(split(attn.to_q(hidden))), attn.norm_k(split(attn.to_k(hidden))), split(attn.to_v(hidden))
    if context is not None:
        q = torch.cat([attn.norm_added_q(split(attn.add_q_proj(context))), q], 1)
        k = torch.cat([attn.norm_added_k(split(attn.add_k_proj(context))), k], 1)
        v = torch.cat([split(attn.add_v_proj(context)), v], 1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _top_block(q, k, text):
    """(B, H, 2, 2) bool: the one image key block with the highest mean-pooled q·k per image query block."""
    pool = lambda x: x[:, :, text:].unflatten(2, (2, 16)).mean(3)  # (B, H, 2, d)
    scores = pool(q) @ pool(k).transpose(-1, -2)
    return F.one_hot(scores.argmax(-1), 2).bool()


def _reference(op, processor, q, k, v, text):
    """The operator's joint attention (B, H, L, d), written out: masked softmax (+ SLA's linear part)."""
    n = q.shape[2] - text
    image = torch.ones(q.shape[0], q.shape[1], n, n, dtype=torch.bool)
    if op == "swa":
        i = torch.arange(n)
        image = image & ((i[:, None] - i[None, :]).abs() <= 2)  # window 5
    else:
        image = _top_block(q, k, text).repeat_interleave(16, -2).repeat_interleave(16, -1)
    mask = torch.ones(*image.shape[:2], text + n, text + n, dtype=torch.bool)
    mask[:, :, text:, text:] = image
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    o = scores.softmax(-1) @ v
    if op == "sla":  # the other image block is marginal: ReLU linear attention over it, through proj_l
        marginal = ~image
        weights = (F.relu(q[:, :, text:]) @ F.relu(k[:, :, text:]).transpose(-1, -2)) * marginal
        linear = weights @ v[:, :, text:] / (weights.sum(-1, keepdim=True) + 1e-6)
        o[:, :, text:] += linear @ processor.core.proj_l.weight.T
    return o


PARTIAL = [
    ("swa", {"window": 5}),
    ("sparse", {"block": 16, "keep": 1}),
    ("sla", {"block": 16, "critical": 1, "negligible": 0}),
]


@pytest.mark.parametrize("text", [16, 5])
@pytest.mark.parametrize("op, options", PARTIAL)
def test_partial_coverage_matches_the_written_out_operator(op, options, text, monkeypatch):
    teacher, student = _graft(op, options, seed=1)
    image, words, rope = _joint_inputs(teacher, text=text, h=H, w=W)
    calls = []
    kernel = sparse_module.block_sparse_attention
    monkeypatch.setattr(sparse_module, "block_sparse_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    img, txt, joint = _outputs(student, image, words, rope, text)
    for attn, hidden, context, got in (
        (student.transformer_blocks[0].attn, image, words, (txt, img)),
        (student.single_transformer_blocks[0].attn, torch.cat([words, image], 1), None, (joint,)),
    ):
        with torch.no_grad():
            q, k, v = _qkv(attn, hidden, context, rope)
            o = _reference(op, attn.processor, q, k, v, text).transpose(1, 2).flatten(2)  # (B, L, C)
            expected = (o,) if context is None else (attn.to_add_out(o[:, :text]), attn.to_out[0](o[:, text:]))
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    reference_softmax = _outputs(teacher, image, words, rope, text)[2]
    assert (joint[:, text:] - reference_softmax[:, text:]).abs().max() > 1e-3  # the image rows really differ
    assert len(calls) == (2 if op == "sparse" else 0)  # the block-sparse kernel runs, with or without whole text blocks


@pytest.mark.parametrize(
    "op, options",
    [("swa", {"window": 3}), ("sparse", {"block": 16, "keep": 1}), ("sla", {"block": 16, "critical": 1})],
)
def test_cost_counts_the_text_rows_and_the_operators_image_work(op, options):
    teacher = tiny_flux().to("meta")
    edits = [{"site": "attention", "group": g, "op": op, "options": options} for g in ("double", "single")]
    student = apply(teacher, plan(teacher, _recipe(edits)))
    before, after = model_cost(teacher, 16), model_cost(student, 16)  # 8x8 image tokens, 512 text tokens
    n, c = 64, 16
    operator = OPERATORS.get(op)
    site = family_for(student).site_map(student)["transformer_blocks.0.attn"]
    image_core = operator.flops(site, n, operator.parse_options(options))
    if op == "swa":
        assert image_core == 4 * (3 * n - 2) * c  # |i − j| ≤ 1 on 64 tokens
    saved = 4 * n * n * c - image_core  # text rows and image-to-text pairs are the teacher's
    assert saved > 0
    for path in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"):
        assert before["attention_flops"][path] - after["attention_flops"][path] == saved, path
        assert path in after["attention_formula"]
    assert before["flops"] - after["flops"] == 3 * saved


def test_convert_export_reload_is_bitwise_exact(tmp_path):
    teacher = tiny_flux()
    graft = [
        {"site": "attention", "group": "double", "op": "swa", "options": {"window": 9}},
        {"site": "attention", "group": "single", "layers": [0], "op": "sparse", "options": {"block": 16, "keep": 2}},
        {"site": "attention", "group": "single", "layers": [1], "op": "sla", "options": {"block": 16, "critical": 1}},
    ]
    recipe = _recipe(graft, lr=1e-2, resolution=128)  # 16x16 latents: 64 image tokens, 4 blocks; 16 text tokens
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    result = distill(teacher, student, recipe.distill, tmp_path / "work")
    assert len(result.log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.log)
    assert student.single_transformer_blocks[1].attn.processor.core.proj_l.weight.abs().sum() > 0  # it trained
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "export", {"steps": 3})
    reloaded = dit_graft.from_pretrained(out)
    processors = [op_of(b.attn.processor) for b in (*reloaded.transformer_blocks, *reloaded.single_transformer_blocks)]
    assert processors == ["swa", "sparse", "sla"]
    fam = family_for(teacher)
    cond, x, t = fam.conditions(teacher, 2), torch.randn(2, 4, 16, 16), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(fam.forward(student, x, t, cond), fam.forward(reloaded, x, t, cond))


# ---- single-file checkpoints in Black Forest Labs' layout


def _to_bfl(model) -> dict[str, torch.Tensor]:
    """The tiny FLUX's weights in BFL's layout: the inverse of diffusers' converter, written out for this config."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for bfl, ours in (
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("final_layer.linear", "proj_out"),
        ("double_blocks.0.img_mod.lin", "transformer_blocks.0.norm1.linear"),
        ("double_blocks.0.txt_mod.lin", "transformer_blocks.0.norm1_context.linear"),
        ("double_blocks.0.img_attn.proj", "transformer_blocks.0.attn.to_out.0"),
        ("double_blocks.0.txt_attn.proj", "transformer_blocks.0.attn.to_add_out"),
        ("double_blocks.0.img_mlp.0", "transformer_blocks.0.ff.net.0.proj"),
        ("double_blocks.0.img_mlp.2", "transformer_blocks.0.ff.net.2"),
        ("double_blocks.0.txt_mlp.0", "transformer_blocks.0.ff_context.net.0.proj"),
        ("double_blocks.0.txt_mlp.2", "transformer_blocks.0.ff_context.net.2"),
        *((f"single_blocks.{i}.modulation.lin", f"single_transformer_blocks.{i}.norm.linear") for i in range(2)),
        *((f"single_blocks.{i}.linear2", f"single_transformer_blocks.{i}.proj_out") for i in range(2)),
    ):
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = sd.pop(f"{ours}.{p}")
    for side in ("img", "txt"):
        for p in ("weight", "bias"):
            names = ("to_q", "to_k", "to_v") if side == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
            out[f"double_blocks.0.{side}_attn.qkv.{p}"] = torch.cat(
                [sd.pop(f"transformer_blocks.0.attn.{n}.{p}") for n in names]
            )
        norms = ("norm_q", "norm_k") if side == "img" else ("norm_added_q", "norm_added_k")
        for bfl, ours in zip(("query_norm", "key_norm"), norms, strict=True):
            out[f"double_blocks.0.{side}_attn.norm.{bfl}.scale"] = sd.pop(f"transformer_blocks.0.attn.{ours}.weight")
    for i in range(2):
        block = f"single_transformer_blocks.{i}"
        for p in ("weight", "bias"):
            parts = [sd.pop(f"{block}.attn.to_{n}.{p}") for n in "qkv"] + [sd.pop(f"{block}.proj_mlp.{p}")]
            out[f"single_blocks.{i}.linear1.{p}"] = torch.cat(parts)
        out[f"single_blocks.{i}.norm.query_norm.scale"] = sd.pop(f"{block}.attn.norm_q.weight")
        out[f"single_blocks.{i}.norm.key_norm.scale"] = sd.pop(f"{block}.attn.norm_k.weight")
    for p in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])  # BFL: (shift, scale)
    assert not sd, f"unmapped: {sorted(sd)}"
    return out


@pytest.fixture
def bfl_checkpoint(tmp_path):
    model = tiny_flux()
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(_to_bfl(model), str(path))
    model.save_config(tmp_path / "config")
    return model, path, tmp_path / "config"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])  # BFL's release, ComfyUI's prefix
def test_a_bfl_checkpoint_loads_to_the_same_model(tmp_path, bfl_checkpoint, prefix):
    original, path, config = bfl_checkpoint
    if prefix:
        from safetensors.torch import load_file

        save_file({prefix + k: v for k, v in load_file(str(path)).items()}, str(path))
    loaded = load_model(path, config=config)
    assert type(loaded).__name__ == "FluxTransformer2DModel" and not loaded.training
    reference = original.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    fam = family_for(original)
    cond, x, t = fam.conditions(original, 2), torch.randn(2, 4, 8, 6), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(fam.forward(loaded, x, t, cond), fam.forward(original, x, t, cond))


def test_a_dry_run_reads_only_the_header(bfl_checkpoint, monkeypatch):
    _, path, config = bfl_checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("tensors read")

    monkeypatch.setattr("dit_graft.loading.read_safetensors", refuse)
    model = load_model(path, meta=True, config=config)
    assert next(model.parameters()).is_meta and model.config.num_single_layers == 2
    with pytest.raises(AssertionError, match="tensors read"):
        load_model(path, config=config)


def test_recipes_name_the_config_and_the_cli_converts_from_a_bfl_file(tmp_path, bfl_checkpoint, write_recipe, capsys):
    _, path, config = bfl_checkpoint
    graft = [{"site": "attention", "group": "single", "op": "sparse", "options": {"block": 16, "keep": 1}}]
    distill_options = {"steps": 1, "batch_size": 2, "pool_size": 2, "pool_steps": 1, "warmup": 0, "resolution": 64}
    data = {"model": {"source": str(path), "config": str(config)}, "graft": graft, "distill": distill_options}
    code, stdout, stderr = run_cli(["convert", write_recipe(data), "--out", tmp_path / "student"], capsys)
    assert code == 0, stderr
    student = dit_graft.from_pretrained(tmp_path / "student")
    assert op_of(student.single_transformer_blocks[1].attn.processor) == "sparse"
    # without model.config every dimension is read off the keys and shapes: the same model, any width
    code, _, stderr = run_cli(["inspect", path], capsys)
    assert code == 0, stderr
    inferred = load_model(path)
    assert {k: inferred.config[k] for k in config_keys(config)} == {
        k: read_config(config)[k] for k in config_keys(config)
    }
    original = load_model(path, config=config)
    assert all(torch.equal(v, inferred.state_dict()[k]) for k, v in original.state_dict().items())


def config_keys(directory):
    return [k for k in read_config(directory) if not k.startswith("_")]


def test_the_config_is_read_off_the_keys_and_shapes_at_flux1_width():
    from dit_graft.families.flux import bfl_config

    shapes = {
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.in_layer.weight": (3072, 256),
        "final_layer.linear.weight": (64, 3072),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "double_blocks.18.img_mod.lin.weight": (18432, 3072),
        "single_blocks.37.linear1.weight": (21504, 3072),
    }
    config = bfl_config(shapes)
    flux_dev = json.loads((ASSETS / "configs" / "flux-dev" / "config.json").read_text())
    assert {k: v for k, v in config.items() if k in flux_dev} == {
        k: v for k, v in flux_dev.items() if not k.startswith("_name")
    }
    assert config["out_channels"] is None


def test_bad_or_foreign_single_files_are_refused_in_one_line(tmp_path, bfl_checkpoint):
    original, path, config = bfl_checkpoint
    foreign = tmp_path / "unet.safetensors"
    save_file({"down.0.conv.weight": torch.zeros(2, 2), "up.0.conv.weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(
        InputError, match=r"not a checkpoint layout dit-graft reads \(bfl-flux, diffusers, original-dit"
    ):
        load_model(foreign)
    from safetensors.torch import load_file

    state = load_file(str(path))
    del state["single_blocks.1.linear2.bias"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(
        IntegrityError, match=r"cut.safetensors: the BFL FLUX checkpoint lacks 'single_blocks.1.linear2"
    ):
        load_model(tmp_path / "cut.safetensors", config=config)
    diffusers_file = tmp_path / "diffusers.safetensors"
    save_file(original.state_dict(), str(diffusers_file))
    with pytest.raises(InputError, match="carries no config; set model.config"):
        load_model(diffusers_file)
    loaded = load_model(diffusers_file, config=config)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(InputError, match="only single-file checkpoints take a config"):
        load_model(config, config=config)


@pytest.mark.parametrize("op, options", PARTIAL[1:])
def test_the_joint_kernel_path_agrees_with_the_reference_kernels(op, options, monkeypatch):
    """Triton (the CPU interpreter here) and the naive kernels give the same outputs and input gradients."""
    from dit_graft.kernels._dispatch import triton_interpreting

    if not torch.cuda.is_available() and not triton_interpreting():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")
    teacher = tiny_flux()
    edits = [{"site": "attention", "group": "double", "op": op, "options": options}]
    student = apply(teacher, plan(teacher, _recipe(edits)))
    attn = student.transformer_blocks[0].attn
    image, words, rope = _joint_inputs(teacher, text=16, h=H, w=W)
    image, words, rope = image.float(), words.float(), tuple(r.float() for r in rope)
    outputs = {}
    for backend in ("naive", "triton"):
        monkeypatch.setenv("DIT_GRAFT_KERNELS", backend)
        x = image.clone().requires_grad_()
        img, txt = attn(x, words, image_rotary_emb=rope)
        (img.square().sum() + txt.square().sum()).backward()
        outputs[backend] = (img.detach(), txt.detach(), x.grad)
    for got, expected in zip(outputs["triton"], outputs["naive"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
