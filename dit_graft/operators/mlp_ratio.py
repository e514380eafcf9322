"""`mlp_ratio` and `prune_width`: the teacher's MLP at another hidden width, keeping its most important units.

Two entry points, one implementation (`resize_feedforward`); they differ only in how the width is asked for:

    mlp_ratio     hidden = round(ratio · dim)   relative to the model width; narrows or widens
                  (grafting, Chandrasegaran et al. 2025: r = 3, 6)
    prune_width   hidden = round(keep · H)      a fraction keep ∈ (0, 1] of the teacher's H hidden units;
                  width pruning only (PPCL's width pruning; Dense2MoE's Taylor importance)

    FFN'(x) = W₂[:, S] · GELU(W₁[S, :] x + b₁[S]) + b₂,   |S| = hidden

`keep` is a fraction, never a unit count: an int is refused (`keep: 1` would read as "one unit" next to
`sparse`, where an int counts blocks), so recipes carry over between model sizes.

Narrowing (hidden below H): S holds the `hidden` most important teacher units, kept in their original
order. The importance of hidden unit i, whose weights are u_i = (W₁[i, :], b₁[i], W₂[:, i]):

    importance: magnitude   s_i = ‖W₁[i, :]‖₂ · ‖W₂[:, i]‖₂                       (no data)
    importance: taylor      s_i = Σ_{w ∈ u_i} |w · ∂L/∂w|,   L = ½ Σ_x ‖FFN(x)‖²

`taylor` is first-order Taylor importance of the output energy L: Σ_{w ∈ u_i} w · ∂L/∂w is, to first
order, how much L changes when unit i is removed. It is not the distillation loss ‖FFN'(x) − FFN(x)‖²:
at the teacher's own weights that loss and its gradient are exactly zero, so its first-order score is 0
for every unit and ranks nothing.

Calibration inputs: a builder sees only (old module, site, options), so the inputs cannot be the
teacher's real activations. x are `calibration_tokens` tokens ~ N(0, I) of the model width, drawn from a
generator seeded by `seed` (the global RNG is untouched), passed once through the teacher's FFN (dropout
off). N(0, I) is what the FFN's input is before modulation in DiT, PixArt and FLUX blocks: a LayerNorm
without affine parameters, then the adaLN shift and scale, which depend on the timestep and condition and
are left out. Recording the real FFN inputs instead would need the whole model and its conditions inside a
builder (builders never walk the model) and would add nothing a reload needs: a reload rebuilds the
shapes and loads the exported weights, so the kept units need not be reproduced (the plan does not
record them). On the meta device (dry runs) no scores exist and S is the first `hidden` units; the
shapes, all a plan depends on, are the same.

At the teacher's width (`ratio` = H / dim, `keep: 1.0`) S is every unit in order: the module computes
exactly the teacher's FFN.

Widening (`mlp_ratio` only, hidden above H): every teacher unit is kept at its index; the extra units'
W₁ rows and b₁ keep nn.Linear's default init and their W₂ columns are zero, so the student starts equal
to the teacher (those W₁ rows get gradients once their W₂ columns have moved off zero).

The replacement is a diffusers FeedForward of the new width (same class, same key layout
net.0.proj / net.2, dropout copied); the inherited tensors are copied with their shapes checked. Its
FLOPs and parameters are measured (FlopCounterMode, parameter count): 2·N·hidden·(dim + dim_out) per
image of N tokens, hidden·(dim + dim_out + 1) + dim_out parameters.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from pydantic import Field, PrivateAttr, field_validator
from torch import nn

from dit_graft.operators.base import (
    FeedForwardLayout,
    Operator,
    Options,
    Site,
    inherit,
    magnitude_importance,
    read_feedforward,
    register,
)


class UnitImportanceOptions(Options):
    """How the hidden units to keep are ranked (shared by `mlp_ratio` and `prune_width`)."""

    importance: Literal["magnitude", "taylor"] = "magnitude"
    calibration_tokens: int = Field(default=1024, ge=1, le=65536, description="random tokens scored by taylor")
    seed: int = Field(default=0, ge=0, description="seed of the taylor calibration tokens")
    _recorded_units: dict[str, list[int]] | None = PrivateAttr(default=None)  # set by apply() from a recorded plan


class MlpRatioOptions(UnitImportanceOptions):
    """Options of the `mlp_ratio` operator."""

    ratio: float = Field(default=3.0, gt=0, le=64, description="hidden width relative to the model width")


class PruneWidthOptions(UnitImportanceOptions):
    """Options of the `prune_width` operator."""

    keep: float = Field(default=0.5, gt=0, le=1, description="fraction of the teacher's hidden units kept, in (0, 1]")

    @field_validator("keep", mode="before")
    @classmethod
    def _fraction(cls, keep):
        if isinstance(keep, bool | int):
            raise ValueError(
                f"keep is the fraction of the teacher's hidden units kept, a float in (0, 1] (got {keep!r}; "
                "write 1.0 to keep every unit, 0.25 for a quarter)"
            )
        return keep


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


def keep_units(ffn: FeedForwardLayout, hidden: int, options: UnitImportanceOptions) -> torch.Tensor:
    """Indices of the `hidden` most important teacher units, ascending (all of them when not narrowing)."""
    inner = ffn.fc1.out_features
    device = ffn.fc1.weight.device
    if options._recorded_units is not None:
        return recorded_units(options._recorded_units["hidden"], min(hidden, inner), inner, device)
    if hidden >= inner:
        return torch.arange(inner, device=device)
    if device.type == "meta":
        return torch.arange(hidden, device=device)
    if options.importance == "magnitude":
        score = magnitude_importance(ffn)
    else:
        score = taylor_importance(ffn, options.calibration_tokens, options.seed)
    return score.topk(hidden).indices.sort().values


def recorded_units(units: list[int], count: int, inner: int, device: torch.device) -> torch.Tensor:
    """The unit indices a plan recorded, checked against the count and the teacher's width they must fit."""
    if len(units) != count or len(set(units)) != count or any(not 0 <= u < inner for u in units):
        raise ValueError(f"the plan's recorded units ({len(units)}) are not {count} distinct units of {inner}")
    return torch.tensor(sorted(units), dtype=torch.long, device=device)


def resize_feedforward(ffn: FeedForwardLayout, site: Site, hidden: int, options: UnitImportanceOptions) -> FeedForward:
    """The teacher FFN at `hidden` units: its most important units when narrowing, zero-output extras when widening."""
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
    if keep.device.type != "meta":  # the plan records them (apply), so a LoRA for the teacher can be sliced
        new._dit_graft_units = {"hidden": keep.tolist()}
    return new


def build_mlp_ratio(old: nn.Module, site: Site, options: MlpRatioOptions) -> FeedForward:
    ffn = read_feedforward(old, site, "mlp_ratio")
    hidden = round(options.ratio * site.dim)
    if hidden < 1:
        raise ValueError(f"ratio={options.ratio} leaves no hidden unit at width {site.dim}")
    return resize_feedforward(ffn, site, hidden, options)


def build_prune_width(old: nn.Module, site: Site, options: PruneWidthOptions) -> FeedForward:
    ffn = read_feedforward(old, site, "prune_width")
    inner = ffn.fc1.out_features
    hidden = round(options.keep * inner)
    if hidden < 1:
        raise ValueError(f"keep={options.keep} leaves no hidden unit of the teacher's {inner}")
    return resize_feedforward(ffn, site, hidden, options)


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

register(
    Operator(
        name="prune_width",
        site="mlp",
        summary="Width pruning: keep the round(keep·H) most important of the teacher's H hidden units "
        "(magnitude or Taylor), nothing added.",
        options=PruneWidthOptions,
        build=build_prune_width,
        installs="module",
        paper="PPCL (width pruning); Dense2MoE (Taylor importance)",
    )
)
