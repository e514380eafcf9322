"""The samplers' contracts that the families rely on."""

from __future__ import annotations

import torch

from dit_graft.diffusion import Schedule, ddim_sample
from dit_graft.families import family_for
from tests.conftest import tiny_dit


def _zero_eps(x, t, c):
    return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])


def test_ddim_clips_only_when_asked():
    noise = 3.0 * torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.zeros(4, dtype=torch.long)}
    free = ddim_sample(_zero_eps, Schedule.linear(), noise, cond, None, steps=5)
    clipped = ddim_sample(_zero_eps, Schedule.linear(), noise, cond, None, steps=5, clip=1.0)
    assert free.abs().max() > 1.5  # eps = 0 predicts x0 = x / sqrt(ᾱ): latents keep their range
    assert clipped.abs().max() <= 1.0
    inside = free.abs() < 0.5
    assert torch.allclose(free[inside], clipped[inside])


def test_dit_family_clips_pixel_models_but_not_latent_ones():
    for channels, clipped in ((1, True), (4, False)):
        model = tiny_dit(in_channels=channels, out_channels=2 * channels)
        family = family_for(model)
        noise = 4.0 * torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(1))
        out = family.sample(model, noise, {"class_labels": torch.tensor([0, 1])}, steps=3, cfg=1.0)
        assert (out.abs().max() <= 1.0) == clipped
