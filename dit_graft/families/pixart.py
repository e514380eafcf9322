"""The PixArt family adapter: diffusers `PixArtTransformer2DModel` (PixArt-α/Σ: T5 cross-attention, learned σ).

Each block is a BasicTransformerBlock: self-attention `attn1`, cross-attention `attn2` to the caption
tokens, MLP `ff`. Block groups for recipes:

- `self` (the default): `transformer_blocks.{i}.attn1` (attention sites) and `transformer_blocks.{i}.ff`
  (MLP sites); every operator applies as on DiT.
- `cross`: `transformer_blocks.{i}.attn2`, an attention site kept as softmax unless an edit names this group
  (`group: cross`). `softmax` and `linear` (over the caption tokens the mask keeps; `dwconv: 0`) are
  implemented there; any other operator is refused at plan time.

Depth edits (`site: depth`) rewrite `transformer_blocks` (config `num_layers`) as the `self` group (the
default; `cross` names sites of the same blocks, not a block list of its own); no block is pinned.

Objective and sampler as DiT (eps + learned σ on the 1000-step linear schedule, DDIM, classifier-free
guidance through the empty caption); conditions are (prompt_embeds, prompt_attention_mask) rows, from a
cached embeddings file or the synthetic set (see families/text.py).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn

from dit_graft.diffusion import Schedule, ddim_sample
from dit_graft.families.base import FAMILIES, GENERIC, Conditions, Family, FamilySite, block_paths, expand_null
from dit_graft.families.dit import ddpm_noise, install_image_grid, latent_shape
from dit_graft.families.text import empty_caption, read_captions, spread, synthetic_captions
from dit_graft.operators.base import TokenGrid
from dit_graft.operators.depth import BlockGroup
from dit_graft.operators.text_attention import build_cross_linear

# Caption tokens of the FLOP-count inputs: PixArt-Σ's max_sequence_length (PixArt-α: 120).
EXAMPLE_TEXT_TOKENS = 300


def _caption_dim(model: nn.Module) -> int:
    return model.config.caption_channels or model.config.cross_attention_dim


def _sites(model: nn.Module) -> list[FamilySite]:
    grid = getattr(model, "_dit_graft_grid", None) or TokenGrid()
    cfg = model.config
    dim, heads = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_attention_heads
    sites = []
    for i, block in enumerate(model.transformer_blocks):
        for path in block_paths(block, f"transformer_blocks.{i}"):  # a parallel_blocks pair: both branches
            sites.append(FamilySite(f"{path}.attn1", "attention", i, dim, heads, grid, group="self"))
            sites.append(FamilySite(f"{path}.ff", "mlp", i, dim, None, grid, group="self"))
            sites.append(FamilySite(f"{path}.attn2", "attention", i, dim, heads, grid, group="cross"))
    return sites


def _builders(site: FamilySite, op: str):
    if site.group == "cross":  # softmax = diffusers' own SDPA processor, which does cross-attention
        return {"softmax": GENERIC, "linear": build_cross_linear}.get(op)
    return GENERIC


def _added_conditions(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """PixArt-α's resolution and aspect-ratio conditions (in pixels), None for models without them (Σ)."""
    if not model.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    b, (h, w) = x.shape[0], x.shape[-2:]
    resolution = torch.tensor([[h * 8.0, w * 8.0]], device=x.device, dtype=x.dtype).expand(b, 2)
    aspect = torch.tensor([[h / w]], device=x.device, dtype=x.dtype).expand(b, 1)
    return {"resolution": resolution, "aspect_ratio": aspect}


def _forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
    return model(
        hidden_states=x,
        encoder_hidden_states=cond["prompt_embeds"].to(x.dtype),
        encoder_attention_mask=cond["prompt_attention_mask"],
        timestep=t,
        added_cond_kwargs=_added_conditions(model, x),
    ).sample


def _example_inputs(model: nn.Module, batch: int, resolution: int | None, device: Any) -> dict[str, Any]:
    cfg = model.config
    size = resolution or cfg.sample_size
    x = torch.zeros(batch, cfg.in_channels, size, size, device=device)
    return dict(
        hidden_states=x,
        encoder_hidden_states=torch.zeros(batch, EXAMPLE_TEXT_TOKENS, _caption_dim(model), device=device),
        encoder_attention_mask=torch.ones(batch, EXAMPLE_TEXT_TOKENS, device=device),
        timestep=torch.zeros(batch, dtype=torch.long, device=device),
        added_cond_kwargs=_added_conditions(model, x),
    )


@lru_cache(maxsize=4)
def _captions(source: str | None, dim: int) -> Conditions:
    return synthetic_captions(dim) if source is None else read_captions(source, dim)


def _conditions(model: nn.Module, n: int, source: str | None = None) -> Conditions:
    return spread(_captions(source, _caption_dim(model)), n)


def _null_conditions(model: nn.Module, source: str | None = None) -> Conditions:
    return empty_caption(_captions(source, _caption_dim(model)))


def _sample(
    model: nn.Module, noise: torch.Tensor, cond: Conditions, steps: int = 50, cfg: float = 1.0, null=None
) -> torch.Tensor:
    """DDIM (η = 0) on the eps channels, classifier-free guidance through the empty caption.

    `null` is the one-row empty caption of the captions' source (`null_conditions`); without it, zero features
    with only the first token visible stand in (the synthetic set's null).
    """
    uncond = None
    if cfg != 1.0:
        null = null if null is not None else empty_caption({"prompt_embeds": cond["prompt_embeds"]})
        uncond = expand_null(null, cond)
    return ddim_sample(lambda x, t, c: _forward(model, x, t, c), Schedule.linear(), noise, cond, uncond, steps, cfg)


PIXART = FAMILIES.register("pixart")(
    Family(
        name="pixart",
        classes=("PixArtTransformer2DModel",),
        objective="eps_sigma",
        sites=_sites,
        install_grid=install_image_grid,
        example_inputs=_example_inputs,
        forward=_forward,
        num_layers=lambda model: len(model.transformer_blocks),
        blocks=lambda model: list(model.transformer_blocks),
        sample=_sample,
        conditions=_conditions,
        null_conditions=_null_conditions,
        noise=ddpm_noise,
        latent_shape=latent_shape,
        vae_scale=lambda model: 8,
        groups=("self", "cross"),
        builders=_builders,
        # Nothing is pinned: unlike DiT's output layer (which reads block 0's norm1.emb), PixArt's reads only
        # model-level modules (adaln_single's embedded timestep, scale_shift_table, norm_out, proj_out), and
        # every block carries its own adaLN-single table, so any block may be dropped or paired.
        depth_groups=(BlockGroup("self", "transformer_blocks", "num_layers"),),
    )
)
