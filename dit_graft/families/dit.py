"""The DiT family adapter: diffusers `DiTTransformer2DModel` (class-conditional, learned σ)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from dit_graft.diffusion import Schedule, ddim_sample
from dit_graft.families.base import FAMILIES, Conditions, Family, FamilySite, block_paths, expand_null
from dit_graft.operators.base import TokenGrid
from dit_graft.operators.depth import BlockGroup


def freeze_label_dropout(model: nn.Module) -> nn.Module:
    """Keeps label embeddings in eval mode so that only our code decides which labels are dropped."""
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.eval()
    return model


def _sites(model: nn.Module) -> list[FamilySite]:
    grid = getattr(model, "_dit_graft_grid", None) or TokenGrid()
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    sites = []
    for i, block in enumerate(model.transformer_blocks):
        for path in block_paths(block, f"transformer_blocks.{i}"):
            sites.append(FamilySite(f"{path}.attn1", "attention", i, dim, cfg.num_attention_heads, grid))
            sites.append(FamilySite(f"{path}.ff", "mlp", i, dim, None, grid))
    return sites


def install_image_grid(model: nn.Module) -> TokenGrid:
    """Records the token grid (H/p, W/p) of every forward call for grid-aware operators (DiT, PixArt)."""
    grid = getattr(model, "_dit_graft_grid", None)
    if grid is not None:
        return grid
    grid = TokenGrid()
    p = model.config.patch_size

    def hook(module, args, kwargs):
        # read the grid from the module, not the closure: a deep copy shares this function but not the grid
        x = args[0] if args else kwargs["hidden_states"]
        module._dit_graft_grid.hw = (x.shape[-2] // p, x.shape[-1] // p)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    object.__setattr__(model, "_dit_graft_grid", grid)
    return grid


def _example_inputs(model: nn.Module, batch: int, resolution: int | None, device: Any) -> dict[str, Any]:
    cfg = model.config
    size = resolution or cfg.sample_size
    return dict(
        hidden_states=torch.zeros(batch, cfg.in_channels, size, size, device=device),
        timestep=torch.zeros(batch, dtype=torch.long, device=device),
        class_labels=torch.zeros(batch, dtype=torch.long, device=device),
    )


def latent_shape(model: nn.Module, resolution: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one sample: the configured sample_size unless `resolution` (latent pixels) is given."""
    size = resolution or model.config.sample_size
    return (model.config.in_channels, size, size)


def vae_scale(model: nn.Module) -> int:
    """A 4-channel DiT is a latent model under the SD VAE (8×); other channel counts are pixel-space."""
    return 8 if model.config.in_channels == 4 else 1


def _sample(
    model: nn.Module, noise: torch.Tensor, cond: Conditions, steps: int = 50, cfg: float = 1.0, null=None
) -> torch.Tensor:
    """DDIM (η = 0) on the eps channels, with classifier-free guidance through the null class."""
    fn = lambda x, t, c: model(hidden_states=x, timestep=t, class_labels=c["class_labels"]).sample
    uncond = expand_null(null or _null_conditions(model), cond)
    clip = 1.0 if vae_scale(model) == 1 else None  # pixel-space data lie in [-1, 1]; latents do not
    return ddim_sample(fn, Schedule.linear(), noise, cond, uncond, steps=steps, cfg=cfg, clip=clip)


def _conditions(model: nn.Module, n: int, source: str | None = None) -> Conditions:
    if source is not None:
        raise ValueError("distill.conditions: the dit family is class-conditional and takes no embeddings file")
    return {"class_labels": torch.arange(n) % model.config.num_embeds_ada_norm}


def _null_conditions(model: nn.Module, source: str | None = None) -> Conditions:
    return {"class_labels": torch.tensor([model.config.num_embeds_ada_norm])}  # the label table's null row


def ddpm_noise(model: nn.Module, x0: torch.Tensor, gen: torch.Generator):
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε at a uniform t of the 1000-step linear schedule; target ε."""
    schedule = Schedule.linear()
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return schedule.q_sample(x0, t, noise), t, noise


def _forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
    return model(hidden_states=x, timestep=t, class_labels=cond["class_labels"]).sample


DIT = FAMILIES.register("dit")(
    Family(
        name="dit",
        classes=("DiTTransformer2DModel",),
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
        vae_scale=vae_scale,
        # the output layer reads block 0's label/timestep embedding (transformer_blocks[0].norm1.emb): pinned
        depth_groups=(BlockGroup("blocks", "transformer_blocks", "num_layers", pinned=(0,)),),
    )
)
