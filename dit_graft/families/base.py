"""The family registry: one adapter per diffusers transformer architecture.

Conditions are opaque to everything but the family: a batch of them is a dict of tensors whose first
dimension is the sample (`{"class_labels": (B,)}` for DiT, `{"prompt_embeds": (B, T, D),
"prompt_attention_mask": (B, T)}` for PixArt, ...). Generic code only selects rows (`take_rows`),
concatenates and moves them; the family makes them (`conditions`), drops them to its null condition
(`drop_conditions`) and feeds them to the model (`forward`, `sample`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dit_graft.operators.base import Site
from dit_graft.operators.depth import BlockGroup
from dit_graft.registry import Registry

Conditions = dict[str, torch.Tensor]

# `builders(site, op_name)` returns this to say "the operator's own builder works here".
GENERIC = "generic"


@dataclass
class FamilySite(Site):
    """A Site that also names its block group (DiT: blocks; PixArt: self, cross; FLUX: double, single)."""

    group: str = "blocks"


class UnsupportedOperator(ValueError):
    """An operator that has no implementation for a family's site (yet)."""


@dataclass(frozen=True)
class Family:
    """What dit-graft needs to know about an architecture; the callables take the model first.

    - `sites(model)` → every graftable FamilySite, in layer order; `groups` names their block groups, the
      first one being what a recipe edit without `group:` addresses
    - `install_grid(model)` → a TokenGrid kept up to date by a forward pre-hook
    - `example_inputs(model, batch, resolution, device)` → forward kwargs (FLOP counts, tests); `resolution`
      is the latent size (the model's sample units), default the model's own
    - `latent_shape(model, resolution)` → the shape of one sample (C, H, W) that `forward`/`sample` take
    - `vae_scale(model)` → image pixels per latent pixel (1 for a pixel-space model)
    - `forward(model, x, t, cond)` → raw model output, laid out like x (plus learned-σ channels for eps_sigma)
    - `noise(model, x0, gen)` → (x_t, t, target): a training input, its timestep and the ground-truth target
      the output's first channels regress (eps for eps_sigma, noise − x0 for flow_velocity)
    - `sample(model, noise, cond, steps, cfg)` → samples, with the family's sampler
    - `conditions(model, n, source)` → n evenly spread conditions (`source`: a cached-embeddings file or None)
    - `null_conditions(model, source)` → the null condition (one row: the null class, the empty caption), or
      None for a family trained without one (FLUX.1: guidance-distilled); `drop_to_null` applies it
    - `objective`: what the output means ("eps_sigma": eps and learned-variance channels (DiT, PixArt);
      "flow_velocity": the flow-matching velocity noise − x0 (FLUX))
    - `builders(site, op_name)` → the builder for that operator there, `GENERIC` for the operator's own, or
      None where the family does not support it (or it raises UnsupportedOperator saying why it never will);
      the field None means every operator, generically
    - `depth_groups`: the block lists depth edits rewrite (`dit_graft.operators.depth.BlockGroup`: the
      model attribute, the config key counting it, the blocks' residual streams, the pinned blocks), the
      first one being what a depth edit without `group:` addresses; empty: no depth edits. `blocks(model)`
      is these groups' blocks, in this order
    """

    name: str
    classes: tuple[str, ...]
    objective: Literal["eps_sigma", "flow_velocity"]
    sites: Any
    install_grid: Any
    example_inputs: Any
    forward: Any
    num_layers: Any
    blocks: Any  # (model) -> list of the transformer blocks, in order (the depth groups', one after the other)
    sample: Any  # (model, noise, cond, steps, cfg) -> samples
    conditions: Any  # (model, n, source=None) -> Conditions
    null_conditions: Any  # (model, source=None) -> Conditions (one row) | None
    noise: Any  # (model, x0, gen) -> (x_t, t, target)
    latent_shape: Any  # (model, resolution=None) -> tuple
    vae_scale: Any  # (model) -> int
    groups: tuple[str, ...] = ("blocks",)
    builders: Any = None
    depth_groups: tuple[BlockGroup, ...] = ()

    def depth_group(self, name: str | None) -> BlockGroup:
        """The block group a depth edit with `group: name` rewrites (None: the first); ValueError names the others."""
        if not self.depth_groups:
            raise ValueError(f"the {self.name} family does not support depth edits")
        if name is None:
            return self.depth_groups[0]
        for group in self.depth_groups:
            if group.name == name:
                return group
        valid = ", ".join(g.name for g in self.depth_groups)
        raise ValueError(f"depth edits on the {self.name} family act on block group(s) {valid}, not {name!r}")

    def site_map(self, model: nn.Module) -> dict[str, Site]:
        return {s.path: s for s in self.sites(model)}

    def builder(self, site: Site, op: Any):
        """The function that builds `op` at `site`; UnsupportedOperator names the operators that do work there."""
        if self.builders is None:
            return op.build
        found = self.builders(site, op.name)  # may itself raise UnsupportedOperator, saying why
        if found is None:
            from dit_graft.operators import OPERATORS

            ok = [n for n, o in OPERATORS.items() if o.site == site.kind and self.supports(site, n)]
            group = getattr(site, "group", "blocks")
            raise UnsupportedOperator(
                f"operator {op.name!r} does not support the {self.name} family's {group} {site.kind} sites yet "
                f"(supported there: {', '.join(ok) or 'none'})"
            )
        return op.build if found == GENERIC else found

    def supports(self, site: Site, op_name: str) -> bool:
        """Whether operator `op_name` has a builder at `site` in this family."""
        if self.builders is None:
            return True
        try:
            return self.builders(site, op_name) is not None
        except UnsupportedOperator:
            return False


FAMILIES: Registry[Family] = Registry("family")


def block_paths(block: nn.Module, path: str) -> list[str]:
    """The paths of the diffusers blocks in `block`: itself, or the branches of a parallel_blocks pair."""
    branches = getattr(block, "branches", None)
    if not isinstance(branches, nn.ModuleList):
        return [path]
    return [p for j, b in enumerate(branches) for p in block_paths(b, f"{path}.branches.{j}")]


def family_for(model: nn.Module) -> Family:
    """The family adapter for a model instance, by its class name."""
    cls = type(model).__name__
    for _, fam in FAMILIES.items():
        if cls in fam.classes:
            return fam
    supported = sorted(c for _, f in FAMILIES.items() for c in f.classes)
    raise KeyError(f"unsupported model class {cls} (supported: {', '.join(supported)})")


def family_for_class(class_name: str) -> Family | None:
    for _, fam in FAMILIES.items():
        if class_name in fam.classes:
            return fam
    return None


def all_groups() -> list[str]:
    """Every block-group name some registered family has."""
    return sorted({g for _, fam in FAMILIES.items() for g in fam.groups})


def take_rows(cond: Conditions, idx: torch.Tensor | slice) -> Conditions:
    """The conditions of the selected samples."""
    return {k: v[idx] for k, v in cond.items()}


def conditions_to(cond: Conditions, device: Any) -> Conditions:
    return {k: v.to(device) for k, v in cond.items()}


def cat_conditions(*conds: Conditions) -> Conditions:
    """Concatenates condition batches along the sample dimension."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def num_conditions(cond: Conditions) -> int:
    return next(iter(cond.values())).shape[0]


def expand_null(null: Conditions, like: Conditions) -> Conditions:
    """The one-row null condition repeated for every row of `like` (keys null lacks are kept from `like`)."""
    n = num_conditions(like)
    return {k: null[k].to(v.device).expand(n, *v.shape[1:]) if k in null else v for k, v in like.items()}


def drop_to_null(cond: Conditions, null: Conditions | None, mask: torch.Tensor) -> Conditions:
    """cond with the rows where `mask` is True replaced by the one-row null condition (no null: unchanged)."""
    if null is None:
        return cond
    out = {}
    for k, v in cond.items():
        if k in null:
            keep = mask.view(-1, *([1] * (v.dim() - 1)))
            v = torch.where(keep, null[k].to(v.dtype).expand_as(v), v)
        out[k] = v
    return out


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """Total forward FLOPs and FLOPs per module path, measured by torch's FlopCounterMode.

    Counts matmuls, convolutions and attention kernels (2 FLOPs per multiply-add); works on the meta
    device, so full-size models are counted without weights. On the CPU, SDPA runs its math backend while
    counting (its fused CPU kernel is invisible to FlopCounterMode), so attention is counted there too.

    This is a pure measurement of what the PyTorch paths compute. Where an attention kernel skips work
    that its PyTorch path does densely (masked, sparse attention), cost reports replace the attention core
    by the operator's formula (`dit_graft.operators.base.attention_core_flops`, used by the CLI's cost
    report): that is the one correction mechanism, kept because formulas need no forward pass and are
    tested against this measurement on the dense paths.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cpu = any(p.device.type == "cpu" for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH) if cpu else contextlib.nullcontext():
        model(**inputs)
    root_name = type(model).__name__
    per_module = {k.removeprefix(root_name + "."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module
