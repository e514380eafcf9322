"""`mlp_ratio`: the teacher's MLP at another expansion ratio (grafting, Chandrasegaran et al. 2025: r = 3, 6).

    FFN'(x) = W₂[:, S] · GELU(W₁[S, :] x + b₁[S]) + b₂,   |S| = hidden = round(ratio · dim)

Narrowing (hidden below the teacher's width): S holds the `hidden` most important teacher units,
kept in their original order. The importance of hidden unit i, whose weights are u_i = (W₁[i, :],
b₁[i], W₂[:, i]):

    importance: magnitude   s_i = ‖W₁[i, :]‖₂ · ‖W₂[:, i]‖₂                       (no data)
    importance: taylor      s_i = Σ_{w ∈ u_i} |w · ∂L/∂w|,   L = ½ Σ_x ‖FFN(x)‖²

For `taylor`, x are `calibration_tokens` random tokens ~ N(0, I) (the shape of a LayerNorm output),
drawn from a generator seeded by `seed` (the global RNG is untouched), passed once through the
teacher's FFN (dropout off): a data-free stand-in for Dense2MoE's first-order Taylor metric, which
uses the diffusion loss on real data. On the meta device (dry runs) no scores exist and S is the
first `hidden` units; the shapes, all a plan depends on, are the same.

At the teacher's width S is every unit in order: the module computes exactly the teacher's FFN.

Widening (hidden above): every teacher unit is kept at its index; the extra units' W₁ rows and b₁
keep nn.Linear's default init and their W₂ columns are zero, so the student starts equal to the
teacher (those W₁ rows get gradients once their W₂ columns have moved off zero).

The replacement is a diffusers FeedForward of the new width (same class, same key layout
net.0.proj / net.2, dropout copied); the inherited tensors are copied with their shapes checked.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from pydantic import Field
from torch import nn

from dit_graft.operators.base import FeedForwardLayout, Operator, Options, Site, inherit, read_feedforward, register


class MlpRatioOptions(Options):
    """Options of the `mlp_ratio` operator."""

    ratio: float = Field(default=3.0, gt=0, le=64, description="hidden width relative to the model width")
    importance: Literal["magnitude", "taylor"] = "magnitude"
    calibration_tokens: int = Field(default=1024, ge=1, le=65536, description="random tokens scored by taylor")
    seed: int = Field(default=0, ge=0, description="seed of the taylor calibration tokens")


def magnitude_importance(ffn: FeedForwardLayout) -> torch.Tensor:
    """s_i = ‖W₁[i, :]‖ · ‖W₂[:, i]‖, one score per hidden unit."""
    return ffn.fc1.weight.detach().float().norm(dim=1) * ffn.fc2.weight.detach().float().norm(dim=0)


def taylor_importance(ffn: FeedForwardLayout, tokens: int, seed: int) -> torch.Tensor:
    """s_i = Σ_{w ∈ unit i} |w · ∂L/∂w| with L = ½‖FFN(x)‖² summed over random tokens x ~ N(0, I)."""
    leaf = lambda t: None if t is None else t.detach().float().requires_grad_(True)
    w1, b1, w2 = leaf(ffn.fc1.weight), leaf(ffn.fc1.bias), leaf(ffn.fc2.weight)
    b2 = None if ffn.fc2.bias is None else ffn.fc2.bias.detach().float()
    x = torch.randn(tokens, w1.shape[1], generator=torch.Generator().manual_seed(seed)).to(w1.device)
    with torch.enable_grad():
        y = F.linear(F.gelu(F.linear(x, w1, b1), approximate=ffn.approximate), w2, b2)  # (tokens, dim_out)
        units = [t for t in (w1, w2, b1) if t is not None]
        grads = torch.autograd.grad(0.5 * y.square().sum(), units)
    score = (w1 * grads[0]).abs().sum(dim=1) + (w2 * grads[1]).abs().sum(dim=0)
    if b1 is not None:
        score = score + (b1 * grads[2]).abs()
    return score.detach()


def keep_units(ffn: FeedForwardLayout, hidden: int, options: MlpRatioOptions) -> torch.Tensor:
    """Indices of the `hidden` most important teacher units, ascending (all of them when not narrowing)."""
    inner = ffn.fc1.out_features
    device = ffn.fc1.weight.device
    if hidden >= inner:
        return torch.arange(inner, device=device)
    if device.type == "meta":
        return torch.arange(hidden, device=device)
    if options.importance == "magnitude":
        score = magnitude_importance(ffn)
    else:
        score = taylor_importance(ffn, options.calibration_tokens, options.seed)
    return score.topk(hidden).indices.sort().values


def build_mlp_ratio(old: nn.Module, site: Site, options: MlpRatioOptions) -> FeedForward:
    ffn = read_feedforward(old, site, "mlp_ratio")
    hidden = round(options.ratio * site.dim)
    if hidden < 1:
        raise ValueError(f"ratio={options.ratio} leaves no hidden unit at width {site.dim}")
    inner = ffn.fc1.out_features
    keep = keep_units(ffn, hidden, options)
    bias = ffn.fc1.bias is not None
    weight = ffn.fc1.weight
    with torch.device(weight.device):
        new = FeedForward(
            site.dim,
            ffn.fc2.out_features,
            dropout=ffn.dropout,
            activation_fn="gelu-approximate" if ffn.approximate == "tanh" else "gelu",
            final_dropout=ffn.final_dropout,
            inner_dim=hidden,
            bias=bias,
        ).to(weight.dtype)
    fc1, fc2 = new.net[0].proj, new.net[2]
    k = len(keep)  # = min(hidden, inner)
    inherit(fc1.weight[:k], ffn.fc1.weight[keep], "net.0.proj.weight")
    inherit(fc2.weight[:, :k], ffn.fc2.weight[:, keep], "net.2.weight")
    if bias:
        inherit(fc1.bias[:k], ffn.fc1.bias[keep], "net.0.proj.bias")
        inherit(fc2.bias, ffn.fc2.bias, "net.2.bias")
    if hidden > inner:
        with torch.no_grad():
            fc2.weight[:, inner:].zero_()
    return new


register(
    Operator(
        name="mlp_ratio",
        site="mlp",
        summary="MLP of hidden width round(ratio·dim), keeping the most important teacher units (grafting).",
        options=MlpRatioOptions,
        build=build_mlp_ratio,
        installs="module",
        paper="Grafting (Chandrasegaran et al. 2025); Dense2MoE (Taylor importance)",
    )
)
