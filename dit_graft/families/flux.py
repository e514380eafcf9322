"""The FLUX family adapter: diffusers `FluxTransformer2DModel` (FLUX.1: MMDiT, flow matching).

Block groups for recipes:

- `double` (the default): the double-stream blocks `transformer_blocks.{i}`, i < num_layers. Attention
  site `transformer_blocks.{i}.attn` (joint attention: text and image tokens with their own projections);
  MLP site `transformer_blocks.{i}.ff` (the image stream's FFN; the text stream's `ff_context` stays).
- `single`: the single-stream blocks `single_transformer_blocks.{i}`, i < num_single_layers. Attention site
  `single_transformer_blocks.{i}.attn` over the joint sequence; their MLP is fused into `proj_out`, so there
  is no MLP site.

Layers are numbered within a group. Depth edits (`site: depth`) rewrite one group's block list: `group:
double` (the default; config `num_layers`) or `group: single` (`num_single_layers`); no block is pinned (the
output layer reads only the image stream and the model-level time embedding). FLUX blocks carry two
residual streams, text and image, and return them as (text, image): block importance compares the joint
sequence [text; image] before and after a block (what the single blocks carry; a double block that only
turns the text stream still changes every later block's attention), a skipped block returns both streams
unchanged and a parallel pair sums both streams' residual updates.

Attention operators are FluxAttention processors acting the CLEAR way (operators/text_attention.py):
`softmax`, `linear`, `local`, `swa`, `sparse` and `sla` are implemented; `gated_conv` is refused at plan
time with the reason (no keys: image tokens would lose the text). MLP operators apply to `ff` as on DiT.

Samples live in the unpacked latent layout (B, C, H, W) with C = in_channels / 4 (16 for FLUX.1); the
adapter packs 2×2 latent patches into tokens (B, H/2 · W/2, 4C) around each model call and builds the
position ids (text ids 0; image ids (0, row, col)). Objective: flow matching, x_σ = (1 − σ) x0 + σ ε, the
model predicts v = ε − x0 (training σ ~ logit-normal); sampler: flow-match Euler with FLUX's
resolution-dependent time shift. FLUX.1-dev is guidance-distilled: the guidance scale (3.5) is part of the
conditions, and there is no null condition (no classifier-free guidance; `null_class_prob` has no effect).

Checkpoints in Black Forest Labs' original layout (the single `flux1-dev.safetensors` of the FLUX.1
release; keys `img_in.weight`, `double_blocks.{i}.img_attn.qkv.weight`, `single_blocks.{i}.linear1.weight`,
..., optionally under ComfyUI's `model.diffusion_model.` prefix) load through `load_bfl_flux`: templated
key maps to diffusers' names (the mapping of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`),
fused tensors split by the diffusers model's own widths, every key and shape checked before the model is
touched. diffusers' single-file loader (`FluxTransformer2DModel.from_single_file`) is not used: its converter
hard-codes FLUX.1's width (3072) when it splits the single-stream `linear1`, so it loads no other size (no
tiny model, so nothing testable here), and it skips unknown keys silently. The config is a local one
(`model.config`; default: the bundled FLUX.1-dev config with the block counts and the guidance embedder read
off the checkpoint's keys, which covers FLUX.1-dev and -schnell).
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch import nn

from dit_graft.diffusion import flow_euler_sample, flow_mu, flow_noise
from dit_graft.errors import IntegrityError
from dit_graft.families.base import (
    FAMILIES,
    GENERIC,
    Conditions,
    Family,
    FamilySite,
    UnsupportedOperator,
    block_paths,
)
from dit_graft.families.text import read_captions, spread, synthetic_captions
from dit_graft.operators.depth import BlockGroup, Streams
from dit_graft.operators.text_attention import JOINT_BUILDERS, JOINT_REFUSED, JointGrid

# FLUX.1-dev's defaults: 1024 px images (128×128 latents), 512 T5 tokens, guidance 3.5.
DEFAULT_LATENT = 128
EXAMPLE_TEXT_TOKENS = 512
GUIDANCE = 3.5


def _grid(model: nn.Module) -> JointGrid:
    return getattr(model, "_dit_graft_grid", None) or JointGrid()


def _sites(model: nn.Module) -> list[FamilySite]:
    grid = _grid(model)
    cfg = model.config
    dim, heads = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_attention_heads
    sites = []
    for i, block in enumerate(model.transformer_blocks):
        for path in block_paths(block, f"transformer_blocks.{i}"):  # a parallel_blocks pair: both branches
            sites.append(FamilySite(f"{path}.attn", "attention", i, dim, heads, grid, group="double"))
            sites.append(FamilySite(f"{path}.ff", "mlp", i, dim, None, grid, group="double"))
    for i, block in enumerate(model.single_transformer_blocks):
        for path in block_paths(block, f"single_transformer_blocks.{i}"):
            sites.append(FamilySite(f"{path}.attn", "attention", i, dim, heads, grid, group="single"))
    return sites


def _builders(site: FamilySite, op: str):
    if site.kind != "attention":
        return GENERIC
    if op in JOINT_REFUSED:
        raise UnsupportedOperator(
            f"operator {op!r} is not supported on the flux family's attention sites: {JOINT_REFUSED[op]} "
            f"(supported there: {', '.join(JOINT_BUILDERS)})"
        )
    return JOINT_BUILDERS.get(op)


def _install_grid(model: nn.Module) -> JointGrid:
    """Records the image grid (from img_ids) and the text length of every forward call."""
    grid = getattr(model, "_dit_graft_grid", None)
    if grid is not None:
        return grid
    grid = JointGrid()

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        text = kwargs.get("encoder_hidden_states")
        ids = kwargs.get("img_ids")
        g = module._dit_graft_grid  # the module's own grid: a deep copy shares this function, not the grid
        g.text = text.shape[1] if text is not None else None
        g.hw = None  # unknown (meta tensors, no ids): operators fall back to a square grid
        if ids is not None and not ids.is_meta:
            ids = ids[0] if ids.ndim == 3 else ids
            hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            g.hw = hw if hw[0] * hw[1] == x.shape[1] else None

    model.register_forward_pre_hook(hook, with_kwargs=True)
    object.__setattr__(model, "_dit_graft_grid", grid)
    return grid


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents → (B, H/2 · W/2, 4C) tokens of 2×2 patches, row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for (H, W) latents."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: Any, dtype=torch.float32) -> torch.Tensor:
    """(h·w, 3) position ids (0, row, col) of an h×w token grid."""
    rows = torch.arange(h, device=device, dtype=dtype)[:, None].expand(h, w)
    cols = torch.arange(w, device=device, dtype=dtype)[None, :].expand(h, w)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)


def _forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
    """x (B, C, H, W) at flow time t (B,) in [0, 1] → the velocity, (B, C, H, W)."""
    _, _, h, w = x.shape
    text = cond["prompt_embeds"]
    guidance = cond.get("guidance") if model.config.guidance_embeds else None
    out = model(
        hidden_states=pack(x),
        encoder_hidden_states=text.to(x.dtype),
        pooled_projections=cond["pooled_prompt_embeds"].to(x.dtype),
        timestep=t.to(x.dtype),
        img_ids=image_ids(h // 2, w // 2, x.device, x.dtype),
        txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
        guidance=guidance.to(x.dtype) if guidance is not None else None,
    ).sample
    return unpack(out, h, w)


def _example_inputs(model: nn.Module, batch: int, resolution: int | None, device: Any) -> dict[str, Any]:
    """Packed forward kwargs for `resolution`×`resolution` latents (default 128: 1024 px) and 512 text tokens."""
    cfg = model.config
    side = (resolution or DEFAULT_LATENT) // 2
    return dict(
        hidden_states=torch.zeros(batch, side * side, cfg.in_channels, device=device),
        encoder_hidden_states=torch.zeros(batch, EXAMPLE_TEXT_TOKENS, cfg.joint_attention_dim, device=device),
        pooled_projections=torch.zeros(batch, cfg.pooled_projection_dim, device=device),
        timestep=torch.ones(batch, device=device),
        img_ids=image_ids(side, side, "cpu").to(device),
        txt_ids=torch.zeros(EXAMPLE_TEXT_TOKENS, 3, device=device),
        guidance=torch.full((batch,), GUIDANCE, device=device) if cfg.guidance_embeds else None,
    )


@lru_cache(maxsize=4)
def _captions(source: str | None, dim: int, pooled: int) -> Conditions:
    if source is None:
        return synthetic_captions(dim, pooled)
    return read_captions(source, dim, pooled, masks=False)


def _conditions(model: nn.Module, n: int, source: str | None = None) -> Conditions:
    cfg = model.config
    cond = spread(_captions(source, cfg.joint_attention_dim, cfg.pooled_projection_dim), n)
    cond.pop("prompt_attention_mask", None)  # FLUX attends to every T5 token, padding included
    if cfg.guidance_embeds:
        cond["guidance"] = torch.full((n,), GUIDANCE)
    return cond


def _sample(
    model: nn.Module, noise: torch.Tensor, cond: Conditions, steps: int = 28, cfg: float = 1.0, null=None
) -> torch.Tensor:
    """Flow-match Euler with FLUX's time shift for the image token count; `cfg` is unused (see the module doc)."""
    tokens = noise.shape[-2] * noise.shape[-1] // 4
    return flow_euler_sample(lambda x, t: _forward(model, x, t, cond), noise, steps, mu=flow_mu(tokens))


def _latent_shape(model: nn.Module, resolution: int | None = None) -> tuple[int, int, int]:
    size = resolution or DEFAULT_LATENT
    if size % 2:
        raise ValueError(f"FLUX latents pack 2×2: the latent size must be even, got {size}")
    return (model.config.in_channels // 4, size, size)


# Black Forest Labs' layout → diffusers, one tensor to one; "{i}" a block index, "{p}" weight or bias.
BFL_TO_DIFFUSERS: dict[str, str] = {
    "img_in.{p}": "x_embedder.{p}",
    "txt_in.{p}": "context_embedder.{p}",
    "time_in.in_layer.{p}": "time_text_embed.timestep_embedder.linear_1.{p}",
    "time_in.out_layer.{p}": "time_text_embed.timestep_embedder.linear_2.{p}",
    "vector_in.in_layer.{p}": "time_text_embed.text_embedder.linear_1.{p}",
    "vector_in.out_layer.{p}": "time_text_embed.text_embedder.linear_2.{p}",
    "guidance_in.in_layer.{p}": "time_text_embed.guidance_embedder.linear_1.{p}",
    "guidance_in.out_layer.{p}": "time_text_embed.guidance_embedder.linear_2.{p}",
    "final_layer.linear.{p}": "proj_out.{p}",
    "double_blocks.{i}.img_mod.lin.{p}": "transformer_blocks.{i}.norm1.linear.{p}",
    "double_blocks.{i}.txt_mod.lin.{p}": "transformer_blocks.{i}.norm1_context.linear.{p}",
    "double_blocks.{i}.img_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_q.weight",
    "double_blocks.{i}.img_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_k.weight",
    "double_blocks.{i}.txt_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_added_q.weight",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_added_k.weight",
    "double_blocks.{i}.img_attn.proj.{p}": "transformer_blocks.{i}.attn.to_out.0.{p}",
    "double_blocks.{i}.txt_attn.proj.{p}": "transformer_blocks.{i}.attn.to_add_out.{p}",
    "double_blocks.{i}.img_mlp.0.{p}": "transformer_blocks.{i}.ff.net.0.proj.{p}",
    "double_blocks.{i}.img_mlp.2.{p}": "transformer_blocks.{i}.ff.net.2.{p}",
    "double_blocks.{i}.txt_mlp.0.{p}": "transformer_blocks.{i}.ff_context.net.0.proj.{p}",
    "double_blocks.{i}.txt_mlp.2.{p}": "transformer_blocks.{i}.ff_context.net.2.{p}",
    "single_blocks.{i}.modulation.lin.{p}": "single_transformer_blocks.{i}.norm.linear.{p}",
    "single_blocks.{i}.norm.query_norm.scale": "single_transformer_blocks.{i}.attn.norm_q.weight",
    "single_blocks.{i}.norm.key_norm.scale": "single_transformer_blocks.{i}.attn.norm_k.weight",
    "single_blocks.{i}.linear2.{p}": "single_transformer_blocks.{i}.proj_out.{p}",
}

# Fused tensors → consecutive row blocks, one per diffusers tensor (row counts from the diffusers model).
BFL_SPLITS: dict[str, tuple[str, ...]] = {
    "double_blocks.{i}.img_attn.qkv.{p}": tuple(f"transformer_blocks.{{i}}.attn.to_{n}.{{p}}" for n in "qkv"),
    "double_blocks.{i}.txt_attn.qkv.{p}": tuple(f"transformer_blocks.{{i}}.attn.add_{n}_proj.{{p}}" for n in "qkv"),
    "single_blocks.{i}.linear1.{p}": (
        *(f"single_transformer_blocks.{{i}}.attn.to_{n}.{{p}}" for n in "qkv"),
        "single_transformer_blocks.{i}.proj_mlp.{p}",
    ),
}

# BFL's final modulation rows are (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift).
BFL_SWAPPED_HALVES: dict[str, str] = {"final_layer.adaLN_modulation.1.{p}": "norm_out.linear.{p}"}

# ComfyUI saves the same tensors under this prefix.
BFL_PREFIX = "model.diffusion_model."


def is_bfl_flux(keys) -> bool:
    """Whether state-dict key names are Black Forest Labs' FLUX layout (read from a safetensors header)."""
    keys = {k.removeprefix(BFL_PREFIX) for k in keys}
    return "img_in.weight" in keys and any(k.startswith("double_blocks.") for k in keys)


def bfl_config(keys, base: dict[str, Any]) -> dict[str, Any]:
    """`base` (FLUX.1-dev's config) with the block counts and the guidance embedder a BFL checkpoint's keys show."""
    keys = {k.removeprefix(BFL_PREFIX) for k in keys}
    count = lambda prefix: len({k.split(".")[1] for k in keys if k.startswith(prefix)})
    return {
        **base,
        "num_layers": count("double_blocks."),
        "num_single_layers": count("single_blocks."),
        "guidance_embeds": "guidance_in.in_layer.weight" in keys,
    }


def _bfl_entries(shapes: dict[str, torch.Size], config) -> dict[str, tuple[str, tuple[str, ...]]]:
    """BFL key → (copy | split | swap, diffusers keys) for this config, skipping targets the model lacks."""
    blocks = {"double_blocks": config["num_layers"], "single_blocks": config["num_single_layers"]}
    entries = {}
    for kind, table in (("copy", BFL_TO_DIFFUSERS), ("split", BFL_SPLITS), ("swap", BFL_SWAPPED_HALVES)):
        for source, targets in table.items():
            targets = (targets,) if isinstance(targets, str) else targets
            layers = range(blocks[source.split(".")[0]]) if "{i}" in source else [None]
            params = ("weight", "bias") if "{p}" in source else [None]
            for i in layers:
                for p in params:
                    names = tuple(t.format(i=i, p=p) for t in targets)
                    if all(n in shapes for n in names):
                        entries[source.format(i=i, p=p)] = (kind, names)
    return entries


def convert_bfl_flux_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A BFL-layout state dict → `model`'s (a FluxTransformer2DModel) state dict; every key and shape checked.

    Works on meta tensors too: a dry run checks a checkpoint's header this way.
    """
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = {k.removeprefix(BFL_PREFIX): v for k, v in state.items()}
    entries = _bfl_entries(shapes, model.config)
    unknown = sorted(set(state) - set(entries))
    if unknown:
        more = f" (+{len(unknown) - 1} more)" if unknown[1:] else ""
        raise IntegrityError(f"unknown key {unknown[0]!r}{more} for this FLUX config (model.config sets it)")
    missing = [k for k in entries if k not in state]
    if missing:
        more = f" (+{len(missing) - 1} more)" if missing[1:] else ""
        raise IntegrityError(f"the BFL FLUX checkpoint lacks {missing[0]!r}{more}")
    out: dict[str, torch.Tensor] = {}
    for source, (kind, targets) in entries.items():
        tensor = state[source]
        if kind == "split":
            rows = [shapes[t][0] for t in targets]
            expected = (sum(rows), *shapes[targets[0]][1:])
            if tuple(tensor.shape) != expected:
                raise IntegrityError(f"{source!r}: shape {tuple(tensor.shape)}, expected {expected} to split {rows}")
            parts = tensor.split(rows, dim=0)
        elif kind == "swap":
            shift, scale = tensor.chunk(2, dim=0)
            parts = (torch.cat([scale, shift], dim=0),)
        else:
            parts = (tensor,)
        for target, part in zip(targets, parts, strict=True):
            if part.shape != shapes[target]:
                raise IntegrityError(
                    f"{source!r} → {target!r}: shape {tuple(part.shape)}, the model expects {tuple(shapes[target])}"
                )
            out[target] = part
    unfilled = [k for k in shapes if k not in out]
    if unfilled:
        raise IntegrityError(f"diffusers key {unfilled[0]!r} has no source in the BFL FLUX checkpoint")
    return out


def load_bfl_flux(header: dict[str, list[int]], config: dict[str, Any], read, meta: bool = False) -> nn.Module:
    """A FluxTransformer2DModel from a BFL-layout checkpoint: `header` maps its keys to shapes, `read()` loads it.

    The model is built without weights and the keys and shapes are checked from the header alone (all a dry run
    does); then `read()` loads the tensors, which are converted and assigned in the model's dtype.
    """
    from dit_graft.loading import build_from_config

    with init_empty_weights(include_buffers=meta):
        model = build_from_config(config)
    convert_bfl_flux_state_dict({k: torch.empty(s, device="meta") for k, s in header.items()}, model)
    if meta:
        return model.eval()
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    converted = convert_bfl_flux_state_dict(read(), model)
    model.load_state_dict({k: v.to(dtypes[k]) for k, v in converted.items()}, strict=True, assign=True)
    return model.eval()


# Double blocks take and return (text, image). Single blocks do too in current diffusers; older releases pass
# them the joint sequence [text; image] and get it back, one stream.
TEXT_IMAGE = Streams(("encoder_hidden_states", "hidden_states"))
_SINGLE_ARGS = inspect.signature(FluxSingleTransformerBlock.forward).parameters
SINGLE_STREAMS = TEXT_IMAGE if "encoder_hidden_states" in _SINGLE_ARGS else Streams()

FLUX = FAMILIES.register("flux")(
    Family(
        name="flux",
        classes=("FluxTransformer2DModel",),
        objective="flow_velocity",
        sites=_sites,
        install_grid=_install_grid,
        example_inputs=_example_inputs,
        forward=_forward,
        num_layers=lambda model: len(model.transformer_blocks) + len(model.single_transformer_blocks),
        blocks=lambda model: [*model.transformer_blocks, *model.single_transformer_blocks],
        sample=_sample,
        conditions=_conditions,
        null_conditions=lambda model, source=None: None,
        noise=lambda model, x0, gen: flow_noise(x0, gen),
        latent_shape=_latent_shape,
        vae_scale=lambda model: 8,
        groups=("double", "single"),
        builders=_builders,
        depth_groups=(
            BlockGroup("double", "transformer_blocks", "num_layers", TEXT_IMAGE),
            BlockGroup("single", "single_transformer_blocks", "num_single_layers", SINGLE_STREAMS),
        ),
    )
)
