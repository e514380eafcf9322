"""The family registry: one adapter per diffusers transformer architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dit_graft.operators.base import Site
from dit_graft.registry import Registry


@dataclass(frozen=True)
class Family:
    """What dit-graft needs to know about an architecture; the callables take the model first.

    - `sites(model)` → every graftable Site, in layer order
    - `install_grid(model)` → a TokenGrid kept up to date by a forward pre-hook
    - `example_inputs(model, batch, resolution, device)` → forward kwargs (FLOP counts, tests)
    - `forward(model, x, t, cond)` → raw model output tensor
    - `sample(model, noise, cond, steps, cfg)` → images, with the family's sampler
    - `conditions(model, n)` → n evenly spread conditions (class labels, ...) and the null condition
    - `objective`: what the output means ("eps_sigma": eps and learned-variance channels)
    """

    name: str
    classes: tuple[str, ...]
    objective: str
    sites: Any
    install_grid: Any
    example_inputs: Any
    forward: Any
    num_layers: Any
    blocks: Any  # (model) -> list of the transformer blocks, in order
    sample: Any  # (model, noise, cond, steps, cfg) -> images
    conditions: Any  # (model, n) -> (n evenly spread conditions, the null condition)

    def site_map(self, model: nn.Module) -> dict[str, Site]:
        return {s.path: s for s in self.sites(model)}


FAMILIES: Registry[Family] = Registry("family")


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


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """Total forward FLOPs and FLOPs per module path, measured by torch's FlopCounterMode.

    Counts matmuls, convolutions and attention kernels (2 FLOPs per multiply-add); works on the meta
    device, so full-size models are counted without weights.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    root = type(model).__name__ + "."
    per_module = {k.removeprefix(root): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module
