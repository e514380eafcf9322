"""Diffusion maths: DiT-style Gaussian diffusion (schedule, learned variance, DDIM) and flow matching (FLUX).

DiT predicts eps and, in the second half of its output channels, a variance interpolation value v
in [-1, 1]: log Σ = frac · log β_t + (1 − frac) · log β̃_t with frac = (v + 1) / 2 (Nichol & Dhariwal).
FLUX is a flow-matching model: x_σ = (1 − σ) x0 + σ ε for σ ∈ [0, 1], and it predicts the velocity
v = ε − x0; sampling integrates dx/dσ = v from σ = 1 to 0 (Euler).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class Schedule:
    """The linear β schedule of DDPM/DiT (1e-4 → 0.02 over T steps), in float64."""

    betas: torch.Tensor

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        return cls(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(t.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        ab = self.alphas_cumprod
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        var = self.betas * (1 - ab_prev) / (1 - ab)
        log_var = torch.log(torch.cat([var[1:2], var[1:]]))
        c0 = self.betas * ab_prev.sqrt() / (1 - ab)
        ct = (1 - ab_prev) * (1 - self.betas).sqrt() / (1 - ab)
        mean = self._at(c0, t, x0) * x0 + self._at(ct, t, x0) * xt
        return mean, self._at(log_var, t, x0)

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Learned-range variance: interpolate log β_t and log β̃_t with frac = (v + 1) / 2."""
        ab = self.alphas_cumprod
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        var = self.betas * (1 - ab_prev) / (1 - ab)
        min_log = self._at(torch.log(torch.cat([var[1:2], var[1:]])), t, v)
        max_log = self._at(torch.log(self.betas), t, v)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def vlb_loss(self, eps: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) in bits/dim, with the mean frozen (trains v only).

        As in improved DDPM, the KL at t = 0 stands in for the discretised decoder likelihood.
        """
        ab = self._at(self.alphas_cumprod, t, xt)
        x0_pred = ((xt - (1 - ab).sqrt() * eps.detach()) / ab.sqrt()).clamp(-1, 1)
        mean_p, _ = self.posterior(x0_pred, xt, t)
        mean_q, log_var_q = self.posterior(x0, xt, t)
        log_var_p = self.model_log_variance(v, t)
        kl = 0.5 * (
            -1.0
            + log_var_p
            - log_var_q
            + torch.exp(log_var_q - log_var_p)
            + (mean_q - mean_p) ** 2 * torch.exp(-log_var_p)
        )
        return kl.mean() / math.log(2.0)


def split_output(out: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Splits a DiT output into (eps, variance values); variance is None for a fixed-variance model."""
    if out.shape[1] == 2 * in_channels:
        return out[:, :in_channels], out[:, in_channels:]
    return out, None


def ddim_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """`steps` evenly spaced training timesteps, from the noisiest down to 0."""
    stride = num_train_steps // steps
    return list(range(0, num_train_steps, stride))[:steps][::-1]


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    noise: torch.Tensor,
    cond: dict[str, torch.Tensor],
    null: dict[str, torch.Tensor] | None,
    steps: int = 50,
    cfg: float = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with classifier-free guidance on the eps channels.

    `model_fn(x, t, c)` returns the raw model output for a batch of conditions c (a dict of tensors, one
    row per sample); `null` holds the null condition of every row, needed when cfg ≠ 1. With `clip`, the
    predicted x0 and the samples are clipped to [-clip, clip] (pixel-space models, whose data lie in
    [-1, 1]); latents are left unclipped, as their range is the VAE's, not [-1, 1].
    """
    x = noise
    ab = schedule.alphas_cumprod.to(noise.device)
    ts = ddim_timesteps(schedule.num_steps, steps)
    c = noise.shape[1]
    both = {k: torch.cat([cond[k], null[k]]) for k in cond} if cfg != 1.0 else None
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if both is not None:
            out = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), both)
            eps_c, eps_u = out[:, :c].chunk(2)
            eps = eps_u + cfg * (eps_c - eps_u)
        else:
            eps = model_fn(x, tt, cond)[:, :c]
        a_t = ab[t].to(x.dtype)
        a_prev = (ab[ts[i + 1]] if i + 1 < len(ts) else ab.new_tensor(1.0)).to(x.dtype)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.clamp(-clip, clip) if clip is not None else x


def flow_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Exponential time shift of flow-matching sigmas: e^μ / (e^μ + 1/σ − 1) (larger μ: more time at high noise)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flow_mu(image_tokens: int, base: tuple[int, float] = (256, 0.5), top: tuple[int, float] = (4096, 1.15)) -> float:
    """FLUX's resolution-dependent shift μ: linear in the image token count through (256, 0.5) and (4096, 1.15)."""
    slope = (top[1] - base[1]) / (top[0] - base[0])
    return base[1] + slope * (image_tokens - base[0])


@torch.no_grad()
def flow_euler_sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int = 28,
    mu: float | None = None,
) -> torch.Tensor:
    """Flow-matching Euler from σ = 1 (noise) to σ = 0: x ← x + (σ_next − σ) · v, with v = model_fn(x, σ).

    Sigmas are evenly spaced in (0, 1], time-shifted by `mu` when given, then 0 is appended (as diffusers'
    FlowMatchEulerDiscreteScheduler with dynamic shifting). x_σ = (1 − σ) x0 + σ ε, so v = ε − x0.
    """
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if mu is not None:
        sigmas = flow_shift(sigmas, mu)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).tolist()
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        t = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        x = x + (s_next - s) * model_fn(x, t).to(x.dtype)
    return x


def flow_noise(x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A flow-matching training input: σ ~ logit-normal(0, 1), x_σ = (1 − σ) x0 + σ ε; target v = ε − x0."""
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen, dtype=torch.float64)).to(x0.dtype)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, sigma, noise - x0
