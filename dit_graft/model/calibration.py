"""Seeded calibration inputs for a family's model (depth importance, depth search, sensitivity): the bottom layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_graft.model.conditions import conditions_to, take_rows


def is_meta(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "meta"


def calibration_latent(model: nn.Module, family: Any, pixels: int | None) -> int | None:
    """The latent size of calibration inputs of `pixels` pixels (None: None, the family's default size)."""
    if pixels is None:
        return None
    scale = family.vae_scale(model)
    if pixels % scale:
        raise ValueError(f"{pixels} px is not a multiple of the VAE factor {scale}")
    return pixels // scale


def calibration_inputs(model: nn.Module, family: Any, n: int, seed: int, resolution: int | None = None):
    """n seeded random teacher inputs on the model's device: latents x ~ N(0, I), timesteps, conditions.

    Timesteps are uniform over the 1000 training steps (flow-matching families: σ = (k + 1) / 1000, k in
    0 … 999); `resolution` is the latent size (default: the family's). The conditions are the family's
    evenly spread ones in a seeded order; the global RNG is untouched.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *family.latent_shape(model, resolution), generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    if family.objective == "flow_velocity":
        t = (t + 1).float() / 1000
    cond = family.conditions(model, n)
    cond = take_rows(cond, torch.randperm(n, generator=gen) % next(iter(cond.values())).shape[0])
    return x.to(device), t.to(device), conditions_to(cond, device)
