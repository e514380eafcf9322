"""Original facebookresearch/DiT checkpoints → diffusers DiTTransformer2DModel."""

from __future__ import annotations

import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file

from dit_graft.errors import InputError, IntegrityError
from dit_graft.families.dit_original import (
    convert_original_dit_state_dict,
    infer_original_dit_config,
    load_original_dit,
    read_checkpoint,
)

SMALL = dict(depth=3, hidden=64, patch=2, in_channels=4, input_size=8, num_classes=10)
SMALL_HEADS = 4


def original_shapes(depth, hidden, patch, in_channels, input_size, num_classes, learn_sigma=True, mlp_ratio=4):
    """Names and shapes of the original DiT state dict (class dropout on: one extra label row)."""
    out_channels = in_channels * 2 if learn_sigma else in_channels
    tokens = (input_size // patch) ** 2
    shapes = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_channels, hidden),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        for name, rows, cols in [
            ("attn.qkv", 3 * hidden, hidden),
            ("attn.proj", hidden, hidden),
            ("mlp.fc1", mlp_ratio * hidden, hidden),
            ("mlp.fc2", hidden, mlp_ratio * hidden),
            ("adaLN_modulation.1", 6 * hidden, hidden),
        ]:
            shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{i}.{name}.bias"] = (rows,)
    return shapes


def sincos_2d(dim, grid):
    """The fixed 2-D sin-cos table of the original DiT (first half encodes the column, second the row)."""

    def sincos_1d(half_dim, pos):  # (M,) → (M, half_dim)
        omega = 1.0 / 10000 ** (torch.arange(half_dim // 2, dtype=torch.float64) / (half_dim / 2))
        angle = pos[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)  # (T, D)


def random_original(seed=0, **size):
    """A small original-layout state dict of random numbers (adaLN not zeroed, so every path matters)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in original_shapes(**size).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        sd[name] = (
            torch.randn(shape, generator=g) / math.sqrt(fan_in)
            if len(shape) > 1
            else 0.1 * torch.randn(shape, generator=g)
        )
    sd["y_embedder.embedding_table.weight"] = torch.randn(sd["y_embedder.embedding_table.weight"].shape, generator=g)
    grid = size["input_size"] // size["patch"]
    sd["pos_embed"] = sincos_2d(size["hidden"], grid).float()[None]  # (1, T, D)
    return sd


def original_dit_forward(sd, x, t, y, heads):
    """The original DiT forward, written from the paper's code structure, on a plain state dict."""

    def linear(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    n, hidden, p = x.shape[0], sd["pos_embed"].shape[-1], sd["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)  # (N, D, H/p, W/p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (N, T, D)
    tokens, head_dim = h.shape[1], hidden // heads

    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)  # (128,)
    args = t[:, None].float() * freqs[None]  # (N, 128)
    t_emb = linear(F.silu(linear(torch.cat([args.cos(), args.sin()], dim=-1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = F.silu(t_emb + sd["y_embedder.embedding_table.weight"][y])  # (N, D)

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(c, f"{b}.adaLN_modulation.1").chunk(
            6, dim=1
        )
        qkv = linear(modulate(norm(h), shift_msa, scale_msa), f"{b}.attn.qkv")  # (N, T, 3D)
        q, k, v = qkv.reshape(n, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # 3 × (N, H, T, hd)
        attn = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)  # (N, H, T, T)
        a = (attn @ v).transpose(1, 2).reshape(n, tokens, hidden)  # (N, T, D)
        h = h + gate_msa[:, None] * linear(a, f"{b}.attn.proj")
        m = linear(modulate(norm(h), shift_mlp, scale_mlp), f"{b}.mlp.fc1")
        h = h + gate_mlp[:, None] * linear(F.gelu(m, approximate="tanh"), f"{b}.mlp.fc2")

    shift, scale = linear(c, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(norm(h), shift, scale), "final_layer.linear")  # (N, T, p*p*C)
    grid, out_channels = int(tokens**0.5), h.shape[-1] // (p * p)
    h = h.reshape(n, grid, grid, p, p, out_channels).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
    return h.reshape(n, out_channels, grid * p, grid * p)


def test_dit_xl2_converts_on_meta_and_counts_parameters():
    shapes = original_shapes(depth=28, hidden=1152, patch=2, in_channels=4, input_size=32, num_classes=1000)
    original = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = infer_original_dit_config(original)
    assert config == {
        **config,
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "sample_size": 32,
        "patch_size": 2,
        "num_embeds_ada_norm": 1000,
        "norm_eps": 1e-6,
    }
    converted = convert_original_dit_state_dict(original, config)
    with torch.device("meta"):
        model = DiTTransformer2DModel(**config)
    model.load_state_dict(converted, strict=True, assign=True)

    n_original = sum(t.numel() for t in original.values())
    n_diffusers = sum(p.numel() for p in model.parameters())
    embedders = sum(original[k].numel() for k in original if k.startswith(("t_embedder.", "y_embedder.")))
    assert embedders == 2_777_472
    assert n_original == 675_129_632  # includes the frozen 294,912-entry pos_embed Parameter
    assert n_diffusers == 749_826_464
    assert n_diffusers == n_original - original["pos_embed"].numel() + 27 * embedders


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_converted_model_matches_original_forward(tmp_path, suffix):
    sd = random_original(**SMALL)
    path = tmp_path / f"dit{suffix}"
    save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)  # (N, C, H, W)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([3, 0, 9, 10])  # 10: the null (CFG) class
    expected = original_dit_forward(sd, x, t, y, SMALL_HEADS)

    model = load_original_dit(path, num_heads=SMALL_HEADS)  # the original frequencies by default
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=y).sample
    # float32; only the attention kernel (SDPA vs explicit softmax) and summation orders differ.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    stock = load_original_dit(path, num_heads=SMALL_HEADS, original_timesteps=False)
    with torch.no_grad():
        stock_out = stock(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(stock_out[:1], expected[:1], rtol=1e-4, atol=1e-5)  # t = 0: frequencies irrelevant
    assert (stock_out[3] - expected[3]).norm() > 1e-2 * expected[3].norm()  # t = 999: stock frequencies differ


def test_timestep_frequencies_original_vs_diffusers():
    t = torch.arange(1000)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    original = torch.cat([args.cos(), args.sin()], dim=-1)  # (1000, 256)
    stock = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    shifted = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(shifted, original)
    assert (stock - original).abs().max() > 1.9
    assert (stock[0] - original[0]).abs().max() == 0


def test_training_checkpoint_is_unwrapped_preferring_ema(tmp_path):
    ema = {"a": torch.ones(2)}
    path = tmp_path / "0400000.pt"
    torch.save(
        {"model": {"a": torch.zeros(2)}, "ema": ema, "opt": {"state": {}}, "args": argparse.Namespace(x=1)}, path
    )
    assert torch.equal(read_checkpoint(path)["a"], ema["a"])


def small_meta():
    return {k: torch.empty(s, device="meta") for k, s in original_shapes(**SMALL).items()}


def convert(sd):
    return convert_original_dit_state_dict(sd, infer_original_dit_config(sd, num_heads=SMALL_HEADS))


def test_missing_key_is_named():
    sd = small_meta()
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(IntegrityError, match=re.escape("'blocks.1.mlp.fc2.bias'")):
        convert(sd)


def test_extra_key_is_named():
    sd = small_meta()
    sd["blocks.0.attn.q_norm.weight"] = torch.empty(16, device="meta")
    with pytest.raises(IntegrityError, match=re.escape("unknown key 'blocks.0.attn.q_norm.weight'")):
        convert(sd)


def test_missing_block_is_named():
    sd = {k: v for k, v in small_meta().items() if not k.startswith("blocks.1.")}
    with pytest.raises(IntegrityError, match=re.escape("'blocks.1.*'")):
        convert(sd)


@pytest.mark.parametrize(
    "key, shape, expected",
    [
        ("blocks.2.attn.proj.weight", (64, 63), (64, 64)),
        ("blocks.0.mlp.fc1.weight", (128, 64), (256, 64)),
        ("t_embedder.mlp.0.weight", (64, 128), (64, 256)),
    ],
)
def test_wrong_shape_names_key_and_both_shapes(key, shape, expected):
    sd = small_meta()
    sd[key] = torch.empty(shape, device="meta")
    with pytest.raises(IntegrityError, match=re.escape(f"{key!r}")) as err:
        convert(sd)
    assert str(tuple(shape)) in str(err.value) and str(expected) in str(err.value)


def test_wrong_qkv_shape_is_named():
    sd = small_meta()
    sd["blocks.1.attn.qkv.weight"] = torch.empty(3 * 64, 32, device="meta")
    with pytest.raises(IntegrityError, match=re.escape("'blocks.1.attn.qkv.weight'")):
        convert(sd)


def test_learned_pos_embed_is_refused():
    sd = random_original(**SMALL)
    sd["pos_embed"] = sd["pos_embed"] + 0.01
    with pytest.raises(IntegrityError, match="'pos_embed' differs"):
        convert(sd)


def test_unknown_hidden_size_needs_num_heads():
    with pytest.raises(InputError, match="pass num_heads"):
        infer_original_dit_config(small_meta())


def test_truncated_safetensors_is_refused(tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file({"a": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(IntegrityError, match=re.escape(str(path))):
        read_checkpoint(path)


class _RunsCode:
    """Unpickles into a call: harmless here (print), but the same route reaches os.system."""

    def __reduce__(self):
        return (print, ("PICKLE-PAYLOAD-RAN",))


def test_code_running_pickle_is_refused_not_executed(tmp_path, capsys):
    path = tmp_path / "dit.pt"
    torch.save({"x_embedder.proj.bias": torch.zeros(2), "payload": _RunsCode()}, path)
    with pytest.raises(IntegrityError, match="refused to unpickle") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and "GLOBAL print" in str(err.value)
    assert "PICKLE-PAYLOAD-RAN" not in capsys.readouterr().out


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(IntegrityError, match=re.escape(str(path))):
        load_original_dit(path)


def test_non_tensor_entry_is_refused(tmp_path):
    path = tmp_path / "dit.pt"
    torch.save({"pos_embed": torch.zeros(1), "step": 3}, path)
    with pytest.raises(IntegrityError, match="'step' is a int"):
        read_checkpoint(path)


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_garbage_pt_is_refused(tmp_path, content):
    path = tmp_path / "dit.pt"
    path.write_bytes(content)
    with pytest.raises(IntegrityError, match=re.escape(str(path))):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "graft",
    [
        [{"site": "attention", "layers": "all", "op": "softmax"}],  # the identity operator
        [{"site": "depth", "op": "prune_depth", "options": {"keep": 3}}],  # depth-only: the stock class could load it
    ],
)
def test_an_original_checkpoint_converts_exports_and_reloads_to_the_original_function(tmp_path, graft):
    """No recipe key: the layout's timestep frequencies are applied on load, recorded in the plan, re-applied."""
    import json

    import dit_graft
    from dit_graft.export import export
    from dit_graft.loading import load_model
    from dit_graft.plan import apply, plan
    from dit_graft.recipe import validate

    sd = random_original(**SMALL)
    path = tmp_path / "DiT-small.safetensors"
    save_file(sd, path)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 17, 500, 999]), torch.tensor([3, 0, 9, 10])
    expected = original_dit_forward(sd, x, t, y, SMALL_HEADS)

    recipe = validate({"model": {"source": str(path), "num_heads": SMALL_HEADS}, "graft": graft})
    teacher = load_model(path, num_heads=SMALL_HEADS)
    graft_plan = plan(teacher, recipe)
    assert graft_plan.runtime == {"original_timestep_frequencies": True}
    out = export(apply(teacher, graft_plan), graft_plan, recipe.model_dump(), tmp_path / "student")
    assert json.loads((out / "graft.json").read_text())["plan"]["runtime"] == {"original_timestep_frequencies": True}
    assert "cannot express them" in (out / "README.md").read_text()
    reloaded = dit_graft.from_pretrained(out)
    with torch.no_grad():
        got = reloaded(x, timestep=t, class_labels=y).sample
        stock = DiTTransformer2DModel.from_pretrained(out)(x, timestep=t, class_labels=y).sample
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5
    assert (stock - expected).norm() > 1e-2 * expected.norm()  # the stock class alone: other frequencies
