"""The PixArt family adapter: diffusers `PixArtTransformer2DModel` (PixArt-α/Σ: T5 cross-attention, learned σ).

Each block is a BasicTransformerBlock: self-attention `attn1`, cross-attention `attn2` to the caption
tokens, MLP `ff`. Block groups for recipes:

- `self` (the default): `transformer_blocks.{i}.attn1` (attention sites) and `transformer_blocks.{i}.ff`
  (MLP sites); every operator applies as on DiT.
- `cross`: `transformer_blocks.{i}.attn2`, an attention site kept as softmax unless an edit names this group
  (`group: cross`). Its adapter (`CrossAttentionAdapter`) gives the cores the caption tokens as a
  cross-attention context with the caption mask as a key mask; the operators that handle cross-attention
  (`softmax`, `linear` with `dwconv: 0`) apply there, any other is refused at plan time with its reason.

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
from dit_graft.families.dit import ATTENTION_ARGS, SelfAttentionAdapter, ddpm_noise, latent_shape
from dit_graft.families.text import empty_caption, read_captions, spread, synthetic_captions
from dit_graft.model.attention import AttentionAdapter, AttnContext, bind, from_heads, to_heads
from dit_graft.model.conditions import Conditions, expand_null
from dit_graft.model.family import Family, register_family
from dit_graft.model.site import AttentionCaps, BlockGroup, Site, block_paths

# Caption tokens of the FLOP-count inputs: PixArt-Σ's max_sequence_length (PixArt-α: 120).
EXAMPLE_TEXT_TOKENS = 300


class CrossAttentionAdapter(AttentionAdapter):
    """diffusers' `Attention` as cross-attention: grid-token queries over a text context (PixArt's attn2).

    PixArt passes the caption mask as a (B, 1, T) bias (0 keep, −10000 drop): it becomes the core's key mask.
    """

    caps = AttentionCaps(keys=True, grid_dims=2, text="cross")

    def check(self, attn: nn.Module, op: str) -> None:
        if not getattr(attn, "is_cross_attention", False):
            raise ValueError(f"the {op} operator at a cross-attention site needs a cross-attention module")

    def qkv(self, attn, args, kwargs):
        a = bind(args, kwargs, ATTENTION_ARGS)
        x, context, mask = a["hidden_states"], a.get("encoder_hidden_states"), a.get("attention_mask")
        if context is None or x.ndim != 3:
            raise ValueError("this cross-attention site needs (B, N, C) queries and a text context")
        b, t = context.shape[:2]
        q = to_heads(attn.to_q(x), attn.heads)  # (B, H, N, d)
        k = to_heads(attn.to_k(context), attn.heads)  # (B, H, T, d)
        v = to_heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        key_mask = None if mask is None else mask.reshape(b, -1, t)[:, 0] > -1  # (B, T)
        return q, k, v, self.layout(x.shape[1], context=t), AttnContext(key_mask=key_mask, dtype=x.dtype)

    def output(self, attn, o, ctx):
        return attn.to_out[1](attn.to_out[0](from_heads(o).to(ctx.dtype)))


def _caption_dim(model: nn.Module) -> int:
    return model.config.caption_channels or model.config.cross_attention_dim


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


@lru_cache(maxsize=4)
def _captions(source: str | None, dim: int) -> Conditions:
    return synthetic_captions(dim) if source is None else read_captions(source, dim)


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


class PixArtFamily(Family):
    name = "pixart"
    classes = ("PixArtTransformer2DModel",)
    objective = "eps_sigma"
    groups = ("self", "cross")
    # Nothing is pinned: unlike DiT's output layer (which reads block 0's norm1.emb), PixArt's reads only
    # model-level modules (adaln_single's embedded timestep, scale_shift_table, norm_out, proj_out), and
    # every block carries its own adaLN-single table, so any block may be dropped or paired.
    depth_groups = (BlockGroup("self", "transformer_blocks", "num_layers"),)

    def sites(self, model: nn.Module) -> list[Site]:
        grid = self.grid(model)
        self_attn, cross_attn = SelfAttentionAdapter(grid), CrossAttentionAdapter(grid)
        cfg = model.config
        dim, heads = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_attention_heads
        sites = []
        for i, block in enumerate(model.transformer_blocks):
            for path in block_paths(block, f"transformer_blocks.{i}"):  # a parallel_blocks pair: both branches
                sites.append(Site(f"{path}.attn1", "attention", i, dim, heads, grid, "self", self_attn))
                sites.append(Site(f"{path}.ff", "mlp", i, dim, None, grid, "self"))
                sites.append(Site(f"{path}.attn2", "attention", i, dim, heads, grid, "cross", cross_attn))
        return sites

    def example_inputs(self, model, batch, resolution, device) -> dict[str, Any]:
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

    def forward(self, model, x, t, cond):
        return _forward(model, x, t, cond)

    def sample(self, model, noise, cond, steps=50, cfg=1.0, null=None):
        return _sample(model, noise, cond, steps, cfg, null)

    def conditions(self, model, n, source=None) -> Conditions:
        return spread(_captions(source, _caption_dim(model)), n)

    def null_conditions(self, model, source=None) -> Conditions:
        return empty_caption(_captions(source, _caption_dim(model)))

    def noise(self, model, x0, gen):
        return ddpm_noise(model, x0, gen)

    def latent_shape(self, model, resolution=None):
        return latent_shape(model, resolution)

    def tiny_config(self) -> dict[str, Any]:
        return dict(
            _class_name="PixArtTransformer2DModel",
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            cross_attention_dim=16,
            caption_channels=24,
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        )


PIXART = register_family(PixArtFamily())
