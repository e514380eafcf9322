"""`moe`: the teacher's FFN split into E experts with a top-k router (Dense2MoE, Zheng et al. 2025).

The dense FFN is a sum over its hidden units, so a partition S_1 … S_E (+ S_0, the shared expert) of
the units splits it exactly:

    FFN(x) = b₂ + Σ_e W₂[:, S_e] · GELU(W₁[S_e, :] x + b₁[S_e]) = b₂ + Σ_e expert_e(x)

The converted FFN is

    MoE(x) = b₂ + expert_0(x) + Σ_{e ∈ top-k(r(x))} k · g_e(x) · expert_e(x),
    r(x) = W_r x (Linear(dim, E, bias=False)),  g = softmax of r(x) over the k chosen experts

so the gates g sum to 1 over the chosen experts and the weights k · g average 1. With top_k = E and
a zero router (uniform g = 1/E, weights exactly 1) it is the dense FFN, up to float summation order.

Partition (`partition`):
    importance     units sorted by magnitude importance ‖W₁[i, :]‖ · ‖W₂[:, i]‖ (as `mlp_ratio`), dealt
                   round-robin (the 1st, (E+1)th, … most important go to expert 0, …): balanced experts
    coactivation   units ordered along the leading eigenvector of the correlation of their GELU
                   activations on `calibration_tokens` random tokens ~ N(0, I) (seeded generator), then cut
                   into E contiguous runs: units that fire together land in the same expert
With `shared: 1` the round(H / (E + 1)) most important units first form the always-on shared expert.
Expert sizes depend only on H, E and `shared` (expert e has ⌊n/E⌋ units, one more for e < n mod E),
so a reload rebuilds the same shapes whatever the weights. On the meta device the partition is the
unit order dealt round-robin.

Router (`router_init`): `zero` starts uniform; `centroid` sets row e to the mean of expert e's W₁ rows,
so a token is first routed to the experts whose units it excites most; `auto` is zero when top_k = E
(the dense-equal start) and centroid otherwise.

Load balancing: every forward stores `aux_loss` = E · Σ_e f_e · P_e (Switch Transformer), f_e the share
of top-k assignments that went to expert e, P_e the mean router probability of e over the tokens;
1 when balanced. The `load_balance` distillation loss averages it over the model's MoE modules.

The PyTorch path runs every expert and zeroes the unchosen ones (simple, exact gradients); the
activated parameters per token (`activated_parameters`) count only the router, the shared expert and
k of the E experts.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PrivateAttr, model_validator
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


class MoeOptions(Options):
    """Options of the `moe` operator."""

    experts: int = Field(default=4, ge=1, le=256, description="routed experts E")
    top_k: int = Field(default=2, ge=1, description="experts each token uses (≤ experts)")
    shared: Literal[0, 1] = Field(default=0, description="1: an always-on shared expert of the most important units")
    partition: Literal["importance", "coactivation"] = "importance"
    router_init: Literal["auto", "zero", "centroid"] = "auto"
    calibration_tokens: int = Field(default=1024, ge=2, le=65536, description="random tokens for coactivation")
    seed: int = Field(default=0, ge=0, description="seed of the coactivation calibration tokens")
    _recorded_units: dict[str, list[int]] | None = PrivateAttr(default=None)  # set by apply() from a recorded plan

    @model_validator(mode="after")
    def _k_within_e(self) -> MoeOptions:
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


class Expert(nn.Module):
    """One slice of the teacher FFN: W₂[:, S] · GELU(W₁[S, :] x + b₁[S]) (no output bias)."""

    def __init__(self, dim: int, hidden: int, dim_out: int, bias: bool, approximate: str, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim_out, bias=False)
        self.approximate = approximate
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x), approximate=self.approximate)))


class MoeFeedForward(nn.Module):
    """b₂ + shared(x) + Σ_{top-k} k · g_e(x) · expert_e(x); `aux_loss` holds the last load-balancing term."""

    def __init__(
        self,
        router: nn.Linear,
        experts: list[Expert],
        shared: Expert | None,
        bias: torch.Tensor | None,
        top_k: int,
        final_dropout: float | None,
    ) -> None:
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.shared = shared
        self.bias = None if bias is None else nn.Parameter(bias)
        self.top_k = top_k
        self.final_dropout = None if final_dropout is None else nn.Dropout(final_dropout)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        e, k = len(self.experts), self.top_k
        logits = self.router(x).float()  # (..., E)
        top, chosen = logits.topk(k, dim=-1)  # (..., k)
        gates = torch.zeros_like(logits).scatter(-1, chosen, top.softmax(dim=-1))  # (..., E), 0 off the top-k
        probs = logits.softmax(dim=-1)
        routed = torch.zeros_like(logits).scatter(-1, chosen, 1.0)
        share = routed.reshape(-1, e).mean(0) / k  # f_e
        self.aux_loss = e * (share * probs.reshape(-1, e).mean(0)).sum()
        weights = (k * gates).to(x.dtype)
        out = sum(weights[..., i : i + 1] * expert(x) for i, expert in enumerate(self.experts))
        if self.shared is not None:
            out = out + self.shared(x)
        if self.bias is not None:
            out = out + self.bias
        return self.final_dropout(out) if self.final_dropout is not None else out

    def activated_parameters(self) -> int:
        """Parameters one token uses: router, shared expert, output bias and top_k of the E experts (the largest)."""
        count = lambda m: sum(p.numel() for p in m.parameters())
        sizes = sorted((count(x) for x in self.experts), reverse=True)
        fixed = count(self.router) + (count(self.shared) if self.shared is not None else 0)
        return fixed + (self.bias.numel() if self.bias is not None else 0) + sum(sizes[: self.top_k])


def expert_sizes(units: int, experts: int) -> list[int]:
    """Units per expert when `units` are dealt round-robin: ⌊n/E⌋, one more for the first n mod E."""
    return [units // experts + (1 if e < units % experts else 0) for e in range(experts)]


def coactivation_order(ffn: FeedForwardLayout, units: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """`units` ordered along the leading eigenvector of their activations' correlation on random tokens."""
    x = torch.randn(tokens, ffn.fc1.in_features, generator=torch.Generator().manual_seed(seed))
    w1 = ffn.fc1.weight.detach().float().cpu()[units]
    b1 = None if ffn.fc1.bias is None else ffn.fc1.bias.detach().float().cpu()[units]
    act = F.gelu(F.linear(x, w1, b1), approximate=ffn.approximate)  # (tokens, units)
    act = act - act.mean(0)
    act = act / act.norm(dim=0).clamp_min(1e-12)
    lead = torch.linalg.eigh(act.T @ act).eigenvectors[:, -1]  # (units,)
    lead = lead * (lead.sum().sign() or 1.0)  # the eigenvector's sign is arbitrary: fix it
    return units[lead.argsort(stable=True).to(units.device)]


def partition_units(ffn: FeedForwardLayout, options: MoeOptions) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(shared units or None, routed units per expert), each ascending."""
    inner = ffn.fc1.out_features
    device = ffn.fc1.weight.device
    shared = round(inner / (options.experts + 1)) if options.shared else 0
    if inner - shared < options.experts:
        raise ValueError(f"{inner} hidden units cannot fill {options.experts} experts (+ {shared} shared)")
    if options._recorded_units is not None:
        return _recorded_partition(
            options._recorded_units, shared, expert_sizes(inner - shared, options.experts), inner, device
        )
    if device.type == "meta":
        order = torch.arange(inner, device=device)
    else:
        order = magnitude_importance(ffn).argsort(descending=True, stable=True).to(device)
    shared_units, rest = (order[:shared].sort().values if shared else None), order[shared:]
    sizes = expert_sizes(len(rest), options.experts)
    if options.partition == "coactivation" and device.type != "meta":
        runs = coactivation_order(ffn, rest.sort().values, options.calibration_tokens, options.seed).split(sizes)
    else:
        runs = [rest[e :: options.experts] for e in range(options.experts)]
    return shared_units, [r.sort().values for r in runs]


def _recorded_partition(recorded: dict[str, list[int]], shared: int, sizes: list[int], inner: int, device):
    """A partition a plan recorded ("shared", "experts.E"), checked to cut the teacher's units as this one would."""
    names = (["shared"] if shared else []) + [f"experts.{e}" for e in range(len(sizes))]
    parts = [recorded.get(n, []) for n in names]
    flat = [u for p in parts for u in p]
    if set(recorded) != set(names) or [len(p) for p in parts] != ([shared] if shared else []) + list(sizes):
        raise ValueError(f"the plan's recorded partition ({sorted(recorded)}) does not fit these experts")
    if len(set(flat)) != inner or any(not 0 <= u < inner for u in flat):
        raise ValueError(f"the plan's recorded partition does not cover the teacher's {inner} units once each")
    as_tensor = lambda p: torch.tensor(sorted(p), dtype=torch.long, device=device)
    return (as_tensor(parts[0]) if shared else None), [as_tensor(p) for p in parts[1 if shared else 0 :]]


def _slice_expert(ffn: FeedForwardLayout, units: torch.Tensor, name: str) -> Expert:
    w = ffn.fc1.weight
    bias = ffn.fc1.bias is not None
    with torch.device(w.device):
        expert = Expert(ffn.fc1.in_features, len(units), ffn.fc2.out_features, bias, ffn.approximate, ffn.dropout)
        expert = expert.to(w.dtype)
    inherit(expert.fc1.weight, ffn.fc1.weight[units], f"{name}.fc1.weight")
    inherit(expert.fc2.weight, ffn.fc2.weight[:, units], f"{name}.fc2.weight")
    if bias:
        inherit(expert.fc1.bias, ffn.fc1.bias[units], f"{name}.fc1.bias")
    return expert


def build_moe(old: nn.Module, site: Site, options: MoeOptions) -> MoeFeedForward:
    ffn = read_feedforward(old, site, "moe")
    shared_units, runs = partition_units(ffn, options)
    experts = [_slice_expert(ffn, units, f"experts.{e}") for e, units in enumerate(runs)]
    shared = _slice_expert(ffn, shared_units, "shared") if shared_units is not None else None
    w = ffn.fc1.weight
    with torch.device(w.device):
        router = nn.Linear(site.dim, options.experts, bias=False).to(w.dtype)
    centroid = options.router_init == "centroid" or (options.router_init == "auto" and options.top_k < options.experts)
    with torch.no_grad():
        if centroid and w.device.type != "meta":
            router.weight.copy_(torch.stack([w[units].mean(0) for units in runs]))
        else:
            router.weight.zero_()
    bias = None if ffn.fc2.bias is None else ffn.fc2.bias.detach().clone()
    final = ffn.dropout if ffn.final_dropout else None
    moe = MoeFeedForward(router, experts, shared, bias, options.top_k, final)
    if w.device.type != "meta":  # the plan records the partition (apply), so a LoRA for the teacher can be split
        moe._dit_graft_units = {f"experts.{e}": units.tolist() for e, units in enumerate(runs)}
        if shared_units is not None:
            moe._dit_graft_units["shared"] = shared_units.tolist()
    return moe


register(
    Operator(
        name="moe",
        site="mlp",
        summary="FFN split into E experts (+ shared) with a top-k router; activated FFN params ≈ (shared + k/E)·"
        "dense; equals the dense FFN at init with top_k = E (Dense2MoE).",
        options=MoeOptions,
        build=build_moe,
        installs="module",
        paper="Dense2MoE (Zheng et al. 2025); Switch Transformer load balancing",
    )
)
