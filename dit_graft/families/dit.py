"""The DiT family adapter: diffusers `DiTTransformer2DModel` (class-conditional, learned σ)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from dit_graft.diffusion import Schedule, ddim_sample
from dit_graft.families.base import FAMILIES, Family
from dit_graft.operators.base import Site, TokenGrid


def freeze_label_dropout(model: nn.Module) -> nn.Module:
    """Keeps label embeddings in eval mode so that only our code decides which labels are dropped."""
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.eval()
    return model


def _sites(model: nn.Module) -> list[Site]:
    grid = getattr(model, "_dit_graft_grid", None) or TokenGrid()
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    sites = []
    for i, _ in enumerate(model.transformer_blocks):
        sites.append(Site(f"transformer_blocks.{i}.attn1", "attention", i, dim, cfg.num_attention_heads, grid))
        sites.append(Site(f"transformer_blocks.{i}.ff", "mlp", i, dim, None, grid))
    return sites


def _install_grid(model: nn.Module) -> TokenGrid:
    """Records the token grid (H/p, W/p) of every forward call for grid-aware operators."""
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


def _sample(model: nn.Module, noise: torch.Tensor, cond: torch.Tensor, steps: int = 50, cfg: float = 1.0):
    """DDIM (η = 0) on the eps channels, with classifier-free guidance through the null class."""
    schedule = Schedule.linear()
    fn = lambda x, t, y: model(hidden_states=x, timestep=t, class_labels=y).sample
    return ddim_sample(fn, schedule, noise, cond, model.config.num_embeds_ada_norm, steps=steps, cfg=cfg)


def _conditions(model: nn.Module, n: int) -> tuple[torch.Tensor, int]:
    classes = model.config.num_embeds_ada_norm
    return torch.arange(n) % classes, classes


def _forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    return model(hidden_states=x, timestep=t, class_labels=cond).sample


DIT = FAMILIES.register("dit")(
    Family(
        name="dit",
        classes=("DiTTransformer2DModel",),
        objective="eps_sigma",
        sites=_sites,
        install_grid=_install_grid,
        example_inputs=_example_inputs,
        forward=_forward,
        num_layers=lambda model: len(model.transformer_blocks),
        blocks=lambda model: list(model.transformer_blocks),
        sample=_sample,
        conditions=_conditions,
    )
)
