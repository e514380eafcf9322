"""The FLUX family adapter: diffusers `FluxTransformer2DModel` (FLUX.1: MMDiT, flow matching).

Block groups for recipes:

- `double` (the default): the double-stream blocks `transformer_blocks.{i}`, i < num_layers. Attention
  site `transformer_blocks.{i}.attn` (joint attention: text and image tokens with their own projections);
  MLP site `transformer_blocks.{i}.ff` (the image stream's FFN; the text stream's `ff_context` stays).
- `single`: the single-stream blocks `single_transformer_blocks.{i}`, i < num_single_layers. Attention site
  `single_transformer_blocks.{i}.attn` over the joint sequence; their MLP is fused into `proj_out`, so there
  is no MLP site.

Layers are numbered within a group. Attention operators are FluxAttention processors acting the CLEAR way
(operators/text_attention.py): `softmax`, `linear` and `local` are implemented; any other attention
operator is refused at plan time. MLP operators apply to `ff` as on DiT.

Samples live in the unpacked latent layout (B, C, H, W) with C = in_channels / 4 (16 for FLUX.1); the
adapter packs 2×2 latent patches into tokens (B, H/2 · W/2, 4C) around each model call and builds the
position ids (text ids 0; image ids (0, row, col)). Objective: flow matching, x_σ = (1 − σ) x0 + σ ε, the
model predicts v = ε − x0 (training σ ~ logit-normal); sampler: flow-match Euler with FLUX's
resolution-dependent time shift. FLUX.1-dev is guidance-distilled: the guidance scale (3.5) is part of the
conditions, and there is no null condition (no classifier-free guidance; `null_class_prob` has no effect).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn

from dit_graft.diffusion import flow_euler_sample, flow_mu, flow_noise
from dit_graft.families.base import FAMILIES, GENERIC, Conditions, Family, FamilySite
from dit_graft.families.text import read_captions, spread, synthetic_captions
from dit_graft.operators.text_attention import JOINT_BUILDERS, JointGrid

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
    for i, _ in enumerate(model.transformer_blocks):
        sites.append(FamilySite(f"transformer_blocks.{i}.attn", "attention", i, dim, heads, grid, group="double"))
        sites.append(FamilySite(f"transformer_blocks.{i}.ff", "mlp", i, dim, None, grid, group="double"))
    for i, _ in enumerate(model.single_transformer_blocks):
        path = f"single_transformer_blocks.{i}.attn"
        sites.append(FamilySite(path, "attention", i, dim, heads, grid, group="single"))
    return sites


def _builders(site: FamilySite, op: str):
    if site.kind == "attention":
        return JOINT_BUILDERS.get(op)
    return GENERIC


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
    )
)
