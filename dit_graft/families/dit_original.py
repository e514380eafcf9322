"""Loads checkpoints in the original facebookresearch/DiT layout into diffusers' DiTTransformer2DModel.

Layout differences (original → diffusers):

- `blocks.{i}.attn.qkv` is one fused (3D, D) linear; diffusers has separate `to_q`, `to_k`, `to_v`. The fused rows
  are ordered [q; k; v] with heads contiguous inside each, so a plain 3-way split along dim 0 is exact.
- The original has ONE timestep embedder (`t_embedder`) and ONE label table (`y_embedder`) shared by all blocks.
  Diffusers gives every block its own `norm1.emb` (CombinedTimestepLabelEmbeddings) and the final layer reuses block
  0's, so the shared tensors are fanned out into every block. DiT-XL/2 counts 675,129,632 parameters in the original
  layout (294,912 of them the frozen sin-cos `pos_embed`) and 749,826,464 in diffusers': +27 copies of the
  2,777,472-parameter embedders (timestep MLP 1,624,320 + 1001×1152 label table) − the pos_embed, which diffusers
  recomputes as a non-persistent buffer. Compute and output are unchanged: the copies hold the same numbers.
- `pos_embed` is a frozen Parameter in the original and a non-persistent buffer diffusers recomputes from the config,
  so the converter checks the checkpoint's values against diffusers' and drops the key.
- `final_layer.adaLN_modulation.1` → `proj_out_1`, `final_layer.linear` → `proj_out_2`.
- The original LayerNorms inside blocks use eps 1e-6; diffusers' `norm3` takes `norm_eps` (default 1e-5), so the
  inferred config sets `norm_eps=1e-6` (the other norms are hard-coded 1e-6 in both).

Timestep embedding: the original computes freqs = exp(−ln(10000)·i/half), i < half = 128, and [cos, sin]; diffusers'
CombinedTimestepLabelEmbeddings uses Timesteps(flip_sin_to_cos=True, downscale_freq_shift=1), whose frequencies are
exp(−ln(10000)·i/(half − 1)). Same order, different frequencies: the 256-d sinusoid features differ by up to 1.98
(max abs over t = 0..999; relative L2 error 0.13 at t = 100, 1.01 at t = 999), which no weight change can absorb.
`use_original_timestep_frequencies` sets `downscale_freq_shift = 0` on every block, making the features identical to
the original (max abs difference 0 in float32). Loading an original-layout checkpoint applies it by default (the
`original-dit` checkpoint layout's `finish`), so the loaded model computes the original function. That attribute
is not in the diffusers config: dit-graft records it as a runtime option of the DiT family in graft.json and
re-applies it in `dit_graft.from_pretrained`; the stock `DiTTransformer2DModel` loads such an export with its own
frequencies (the model card says so).
"""

from __future__ import annotations

import math
import re
from os import PathLike

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from dit_graft.errors import InputError, IntegrityError
from dit_graft.families.dit import use_original_timestep_frequencies
from dit_graft.model.checkpoints import CheckpointLayout, register_layout
from dit_graft.model.io import meta_state, read_checkpoint

# One original tensor → one diffusers tensor; "{}" is the block index.
ORIGINAL_TO_DIFFUSERS: dict[str, str] = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "blocks.{}.attn.proj.weight": "transformer_blocks.{}.attn1.to_out.0.weight",
    "blocks.{}.attn.proj.bias": "transformer_blocks.{}.attn1.to_out.0.bias",
    "blocks.{}.mlp.fc1.weight": "transformer_blocks.{}.ff.net.0.proj.weight",
    "blocks.{}.mlp.fc1.bias": "transformer_blocks.{}.ff.net.0.proj.bias",
    "blocks.{}.mlp.fc2.weight": "transformer_blocks.{}.ff.net.2.weight",
    "blocks.{}.mlp.fc2.bias": "transformer_blocks.{}.ff.net.2.bias",
    "blocks.{}.adaLN_modulation.1.weight": "transformer_blocks.{}.norm1.linear.weight",
    "blocks.{}.adaLN_modulation.1.bias": "transformer_blocks.{}.norm1.linear.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}

# Fused qkv → (to_q, to_k, to_v), split in thirds along dim 0.
QKV_SPLITS: dict[str, tuple[str, str, str]] = {
    f"blocks.{{}}.attn.qkv.{p}": tuple(f"transformer_blocks.{{}}.attn1.to_{n}.{p}" for n in "qkv")
    for p in ("weight", "bias")
}

# Shared original embedders → a copy in every block (same tensor object in each).
SHARED_TO_PER_BLOCK: dict[str, str] = {
    "t_embedder.mlp.0.weight": "transformer_blocks.{}.norm1.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "transformer_blocks.{}.norm1.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "transformer_blocks.{}.norm1.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "transformer_blocks.{}.norm1.emb.timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "transformer_blocks.{}.norm1.emb.class_embedder.embedding_table.weight",
}

# Fixed buffers diffusers recomputes: checked against diffusers' values, then dropped.
RECOMPUTED = ("pos_embed",)

# Hidden size → attention heads for the published DiT sizes (XL, L, B, S); heads cannot be read off shapes.
HEADS_BY_HIDDEN = {1152: 16, 1024: 16, 768: 12, 384: 6}

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def infer_original_dit_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """A DiTTransformer2DModel config read off the shapes of an original-layout state dict."""
    probes = ("x_embedder.proj.weight", "final_layer.linear.weight", "pos_embed", "y_embedder.embedding_table.weight")
    for key in probes:
        if key not in state_dict:
            raise IntegrityError(f"original DiT checkpoint lacks {key!r}")
    patch_w = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    if patch_w.ndim != 4 or patch_w.shape[2] != patch_w.shape[3]:
        raise IntegrityError(f"'x_embedder.proj.weight' has shape {tuple(patch_w.shape)}, expected (D, C, p, p)")
    hidden, in_channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]

    tokens = state_dict["pos_embed"].shape[1]  # (1, T, D)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise IntegrityError(f"'pos_embed' has {tokens} tokens, not a square grid")

    out_rows = state_dict["final_layer.linear.weight"].shape[0]  # (p*p*out, D)
    if out_rows % (patch * patch):
        raise IntegrityError(f"'final_layer.linear.weight' has {out_rows} rows, not a multiple of patch² = {patch**2}")

    layers = sorted({int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))})
    if not layers:
        raise IntegrityError("original DiT checkpoint has no 'blocks.*' keys")
    for i, layer in enumerate(layers):
        if layer != i:
            raise IntegrityError(f"original DiT checkpoint lacks 'blocks.{i}.*' (highest block is {layers[-1]})")

    if num_heads is None:
        if hidden not in HEADS_BY_HIDDEN:
            sizes = sorted(HEADS_BY_HIDDEN)
            raise InputError(f"hidden size {hidden} is not a published DiT size {sizes}: pass num_heads")
        num_heads = HEADS_BY_HIDDEN[hidden]
    if num_heads <= 0 or hidden % num_heads:
        raise InputError(f"num_heads={num_heads} does not divide hidden size {hidden}")

    return {
        "num_attention_heads": num_heads,
        "attention_head_dim": hidden // num_heads,
        "in_channels": in_channels,
        "out_channels": out_rows // (patch * patch),
        "num_layers": len(layers),
        "sample_size": grid * patch,
        "patch_size": patch,
        # Rows = classes + 1 null (CFG) row; a table trained without one loads with every row still addressable.
        "num_embeds_ada_norm": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        "norm_eps": 1e-6,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "dropout": 0.0,
    }


def original_dit_keys(num_layers: int) -> list[str]:
    """Every key an original-layout state dict with num_layers blocks must hold."""
    templates = [*ORIGINAL_TO_DIFFUSERS, *QKV_SPLITS, *SHARED_TO_PER_BLOCK, *RECOMPUTED]
    blocks = [t.format(i) for i in range(num_layers) for t in templates if "{}" in t]
    return [t for t in templates if "{}" not in t] + blocks


def _diffusers_shapes(config: dict) -> tuple[dict[str, torch.Size], torch.Size]:
    """Parameter shapes and the pos_embed buffer shape of the diffusers model config describes (built on meta)."""
    with torch.device("meta"):
        model = DiTTransformer2DModel(**config)
    return {k: v.shape for k, v in model.state_dict().items()}, model.pos_embed.pos_embed.shape


def _check_pos_embed(pos_embed: torch.Tensor, expected: torch.Size, config: dict) -> None:
    """Checks the checkpoint's fixed sin-cos table against the one diffusers recomputes (values skipped on meta)."""
    if pos_embed.shape != expected:
        raise IntegrityError(f"'pos_embed' has shape {tuple(pos_embed.shape)}, diffusers expects {tuple(expected)}")
    if pos_embed.is_meta:
        return
    grid = config["sample_size"] // config["patch_size"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ref = get_2d_sincos_pos_embed(dim, grid, base_size=grid, device="cpu", output_type="pt")  # (T, D)
    tol = max(1e-4, 2 * torch.finfo(pos_embed.dtype).eps)
    err = (pos_embed[0].detach().to("cpu", torch.float32) - ref.float()).abs().max().item()
    if not err <= tol:
        raise IntegrityError(
            f"'pos_embed' differs from the sin-cos table diffusers recomputes by {err:.3g} (> {tol:.1g}): "
            "a learned or differently laid out position embedding cannot be dropped"
        )


def _put(out: dict, shapes: dict, source: str, target: str, tensor: torch.Tensor) -> None:
    """Stores one converted tensor after checking its shape against the diffusers model's."""
    if target not in shapes:
        raise IntegrityError(f"{source!r} maps to {target!r}, which the diffusers model does not have")
    if tensor.shape != shapes[target]:
        raise IntegrityError(
            f"{source!r} → {target!r}: shape {tuple(tensor.shape)}, diffusers expects {tuple(shapes[target])}"
        )
    if target in out:
        raise IntegrityError(f"{target!r} would be written twice (second time from {source!r})")
    out[target] = tensor


def convert_original_dit_state_dict(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Original-layout state dict → DiTTransformer2DModel state dict; every key and shape checked (meta tensors ok).

    Fanned-out embedder tensors are the same object in every block: load_state_dict copies them, but clone them
    before writing this dict to safetensors directly.
    """
    num_layers = config["num_layers"]
    required = original_dit_keys(num_layers)
    unknown = sorted(set(state_dict) - set(required))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise IntegrityError(f"unknown key {unknown[0]!r}{more} in original DiT checkpoint ({num_layers} blocks)")
    missing = [k for k in required if k not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise IntegrityError(f"original DiT checkpoint lacks {missing[0]!r}{more}")

    shapes, pos_shape = _diffusers_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        m = _BLOCK_KEY.match(key)
        template, index = (f"blocks.{{}}.{m.group(2)}", int(m.group(1))) if m else (key, None)
        if template in ORIGINAL_TO_DIFFUSERS:
            _put(out, shapes, key, ORIGINAL_TO_DIFFUSERS[template].format(index), tensor)
        elif template in QKV_SPLITS:
            targets = [t.format(index) for t in QKV_SPLITS[template]]
            fused = (3 * shapes[targets[0]][0], *shapes[targets[0]][1:])  # (3D, D) or (3D,)
            if tensor.shape != fused:
                raise IntegrityError(f"{key!r}: shape {tuple(tensor.shape)}, expected {fused} to split into q, k, v")
            for target, part in zip(targets, tensor.chunk(3, dim=0), strict=True):  # 3 × (D, D) or 3 × (D,)
                _put(out, shapes, key, target, part)
        elif template in SHARED_TO_PER_BLOCK:
            for i in range(num_layers):
                _put(out, shapes, key, SHARED_TO_PER_BLOCK[template].format(i), tensor)
        elif template in RECOMPUTED:
            _check_pos_embed(tensor, pos_shape, config)
        else:  # unreachable after the key check; kept so that a new template cannot be silently skipped
            raise IntegrityError(f"no mapping for original DiT key {key!r}")

    unfilled = [k for k in shapes if k not in out]
    if unfilled:
        raise IntegrityError(f"diffusers key {unfilled[0]!r} has no source in the original DiT checkpoint")
    return out


def load_original_dit(
    path: str | PathLike, num_heads: int | None = None, *, original_timesteps: bool = True
) -> DiTTransformer2DModel:
    """An original-layout DiT checkpoint as a DiTTransformer2DModel in eval mode (strict load).

    `original_timesteps` (default): the original timestep frequencies, so the model computes the original function.
    """
    state_dict = read_checkpoint(path)
    config = infer_original_dit_config(state_dict, num_heads)
    converted = convert_original_dit_state_dict(state_dict, config)
    model = DiTTransformer2DModel(**config)
    model.load_state_dict(converted, strict=True)
    if original_timesteps:
        use_original_timestep_frequencies(model)
    return model.eval()


def _diffusers_config(model) -> dict:
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def is_original_dit(keys) -> bool:
    return "x_embedder.proj.weight" in keys and any(k.startswith("blocks.") for k in keys)


register_layout(
    CheckpointLayout(
        name="original-dit",
        family="dit",
        detect=is_original_dit,
        convert=lambda state, model: convert_original_dit_state_dict(state, _diffusers_config(model)),
        infer_config=lambda shapes, hints: {
            "_class_name": "DiTTransformer2DModel",
            **infer_original_dit_config(meta_state(shapes), hints.get("num_heads")),
        },
        pickle=True,
        finish=use_original_timestep_frequencies,
    )
)
