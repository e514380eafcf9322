"""The DiT family: diffusers `DiTTransformer2DModel` (class-conditional, learned σ).

Attention sites `transformer_blocks.{i}.attn1` (self-attention over the 2-D token grid, `SelfAttentionAdapter`:
every attention operator applies), MLP sites `transformer_blocks.{i}.ff`. Depth edits rewrite
`transformer_blocks`; block 0 is pinned (the output layer reads its label/timestep embedding).

Checkpoints in the original facebookresearch layout load through `families/dit_original.py` (its checkpoint
layout is registered there), computing the original model's function: the original timestep frequencies are a
runtime option of this family (`runtime_options`), recorded in graft.json and re-applied on load.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, LabelEmbedding
from torch import nn

from dit_graft.diffusion import Schedule, ddim_sample
from dit_graft.model.attention import AttentionAdapter, AttnContext, bind, from_heads, to_heads
from dit_graft.model.conditions import Conditions, expand_null
from dit_graft.model.family import Family, register_family
from dit_graft.model.site import AttentionCaps, BlockGroup, Site, block_paths

ATTENTION_ARGS = ("hidden_states", "encoder_hidden_states", "attention_mask", "temb")


class SelfAttentionAdapter(AttentionAdapter):
    """diffusers' `Attention` as plain self-attention over (B, N, C) grid tokens (DiT's attn1, PixArt's attn1)."""

    caps = AttentionCaps(keys=False, grid_dims=2, text="none")

    def check(self, attn: nn.Module, op: str) -> None:
        unsupported = {
            "cross-attention": getattr(attn, "is_cross_attention", False),
            "spatial_norm": getattr(attn, "spatial_norm", None) is not None,
            "group_norm": getattr(attn, "group_norm", None) is not None,
            "residual_connection": getattr(attn, "residual_connection", False),
            "rescale_output_factor": getattr(attn, "rescale_output_factor", 1.0) != 1.0,
        }
        found = [k for k, v in unsupported.items() if v]
        if found:
            raise ValueError(f"the {op} operator replaces plain self-attention only (this one has {', '.join(found)})")

    def qkv(self, attn, args, kwargs):
        a = bind(args, kwargs, ATTENTION_ARGS)
        x = a["hidden_states"]
        if a.get("encoder_hidden_states") is not None or a.get("attention_mask") is not None or x.ndim != 3:
            raise ValueError("this attention site takes self-attention on (B, N, C) tokens only (no context, no mask)")
        q = to_heads(attn.to_q(x), attn.heads)  # (B, H, N, d)
        k = to_heads(attn.to_k(x), attn.heads)
        v = to_heads(attn.to_v(x), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k, v, self.layout(x.shape[1]), AttnContext(dtype=q.dtype)

    def output(self, attn, o, ctx):
        return attn.to_out[1](attn.to_out[0](from_heads(o).to(ctx.dtype)))

    def call_tokens(self, args, kwargs):
        a = bind(args, kwargs, ATTENTION_ARGS)
        x = a["hidden_states"]
        if x.ndim != 3 or a.get("encoder_hidden_states") is not None or a.get("attention_mask") is not None:
            return None
        return x.shape[1], 0


def freeze_label_dropout(model: nn.Module) -> nn.Module:
    """Keeps label embeddings in eval mode so that only our code decides which labels are dropped."""
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.eval()
    return model


def use_original_timestep_frequencies(model: nn.Module) -> nn.Module:
    """Makes every block's timestep sinusoid use the original DiT frequencies (exp(−ln(10⁴)·i/half))."""
    for module in model.modules():
        if isinstance(module, CombinedTimestepLabelEmbeddings):
            module.time_proj.downscale_freq_shift = 0
    return model


def has_original_timestep_frequencies(model: nn.Module) -> bool:
    embeds = [m for m in model.modules() if isinstance(m, CombinedTimestepLabelEmbeddings)]
    return bool(embeds) and all(m.time_proj.downscale_freq_shift == 0 for m in embeds)


def ddpm_noise(model: nn.Module, x0: torch.Tensor, gen: torch.Generator):
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε at a uniform t of the 1000-step linear schedule; target ε."""
    schedule = Schedule.linear()
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return schedule.q_sample(x0, t, noise), t, noise


def latent_shape(model: nn.Module, resolution: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one sample: the configured sample_size unless `resolution` (latent pixels) is given."""
    size = resolution or model.config.sample_size
    return (model.config.in_channels, size, size)


def install_image_grid(model: nn.Module):
    """Records the token grid (H/p, W/p) of every forward call (DiT, PixArt)."""
    return DIT.install_grid(model)


class DiTFamily(Family):
    name = "dit"
    classes = ("DiTTransformer2DModel",)
    objective = "eps_sigma"
    # the output layer reads block 0's label/timestep embedding (transformer_blocks[0].norm1.emb): pinned
    depth_groups = (BlockGroup("blocks", "transformer_blocks", "num_layers", pinned=(0,)),)

    def sites(self, model: nn.Module) -> list[Site]:
        grid = self.grid(model)
        adapter = SelfAttentionAdapter(grid)
        cfg = model.config
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        sites = []
        for i, block in enumerate(model.transformer_blocks):
            for path in block_paths(block, f"transformer_blocks.{i}"):
                sites.append(Site(f"{path}.attn1", "attention", i, dim, cfg.num_attention_heads, grid, adapter=adapter))
                sites.append(Site(f"{path}.ff", "mlp", i, dim, None, grid))
        return sites

    def example_inputs(self, model, batch, resolution, device) -> dict[str, Any]:
        cfg = model.config
        size = resolution or cfg.sample_size
        return dict(
            hidden_states=torch.zeros(batch, cfg.in_channels, size, size, device=device),
            timestep=torch.zeros(batch, dtype=torch.long, device=device),
            class_labels=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def forward(self, model, x, t, cond: Conditions) -> torch.Tensor:
        return model(hidden_states=x, timestep=t, class_labels=cond["class_labels"]).sample

    def sample(self, model, noise, cond, steps=50, cfg=1.0, null=None) -> torch.Tensor:
        """DDIM (η = 0) on the eps channels, with classifier-free guidance through the null class."""
        fn = lambda x, t, c: model(hidden_states=x, timestep=t, class_labels=c["class_labels"]).sample
        uncond = expand_null(null or self.null_conditions(model), cond)
        clip = 1.0 if self.vae_scale(model) == 1 else None  # pixel-space data lie in [-1, 1]; latents do not
        return ddim_sample(fn, Schedule.linear(), noise, cond, uncond, steps=steps, cfg=cfg, clip=clip)

    def conditions(self, model, n, source=None) -> Conditions:
        if source is not None:
            raise ValueError("distill.conditions: the dit family is class-conditional and takes no embeddings file")
        return {"class_labels": torch.arange(n) % model.config.num_embeds_ada_norm}

    def null_conditions(self, model, source=None) -> Conditions:
        return {"class_labels": torch.tensor([model.config.num_embeds_ada_norm])}  # the label table's null row

    def noise(self, model, x0, gen):
        return ddpm_noise(model, x0, gen)

    def latent_shape(self, model, resolution=None):
        return latent_shape(model, resolution)

    def vae_scale(self, model) -> int:
        """A 4-channel DiT is a latent model under the SD VAE (8×); other channel counts are pixel-space."""
        return 8 if model.config.in_channels == 4 else 1

    def num_classes(self, model) -> int:
        return int(model.config.num_embeds_ada_norm)

    def prepare_for_training(self, model: nn.Module) -> nn.Module:
        return freeze_label_dropout(model)

    def runtime_options(self, model: nn.Module) -> dict[str, Any]:
        return {"original_timestep_frequencies": True} if has_original_timestep_frequencies(model) else {}

    def apply_runtime_options(self, model: nn.Module, options: dict[str, Any]) -> nn.Module:
        unknown = sorted(set(options) - {"original_timestep_frequencies"})
        if unknown:
            raise ValueError(f"the dit family has no runtime option {unknown[0]!r}")
        if options.get("original_timestep_frequencies"):
            use_original_timestep_frequencies(model)
        return model

    def runtime_note(self, options: dict[str, Any]) -> str | None:
        if not options.get("original_timestep_frequencies"):
            return None
        return (
            "This model uses the original DiT timestep frequencies (exp(-ln(10^4)·i/half)), as the checkpoint it was "
            "converted from did. The stock diffusers `DiTTransformer2DModel` cannot express them (its config has no "
            "key for them; it divides by half − 1): load it with `dit_graft.from_pretrained`, which re-applies them "
            "from graft.json. Loaded with the stock class alone, it computes a different function."
        )

    def tiny_config(self) -> dict[str, Any]:
        return dict(
            _class_name="DiTTransformer2DModel",
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=1,
            out_channels=2,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=4,
            norm_type="ada_norm_zero",
        )


DIT = register_family(DiTFamily())
