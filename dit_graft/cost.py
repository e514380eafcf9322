"""What a model costs per image: parameters (all, and activated by one token) and forward FLOPs, in total and per
attention site, with the attention cores counted by their operators' formulas (the work their kernels do)."""

from __future__ import annotations

from typing import Any

from torch import nn

from dit_graft.families import count_flops, family_for, param_count
from dit_graft.operators.base import attention_core_flops


def model_cost(model: nn.Module, resolution: int | None = None) -> dict[str, Any]:
    """Parameters and forward FLOPs per image (total and per attention site), on the model's device.

    FlopCounterMode measures the forward (`count_flops`); then every attention site whose processor has a
    FLOP formula (`attention_core_flops`: the operator's `Operator.flops`, composed the CLEAR way with a text
    prefix, softmax's for diffusers' processors) reports its q/k/v/out projections as measured plus the
    formula's attention core, and is listed in `attention_formula`; the total is corrected to match.
    Measuring is not enough there: the PyTorch paths of masked and sparse attention compute densely where
    their kernels skip work. Other sites (PixArt's cross-attention, a call whose token counts are unknown)
    report FlopCounterMode's measurement.
    """
    family = family_for(model)
    device = next(model.parameters()).device
    sites = [s for s in family.sites(model) if s.kind == "attention"]
    calls: dict[str, list[tuple[int, int] | None]] = {s.path: [] for s in sites}

    def record(site):
        def hook(module, args, kwargs):
            calls[site.path].append(site.call_tokens(args, kwargs))  # (image tokens, text tokens), by the adapter

        return hook

    hooks = [model.get_submodule(s.path).register_forward_pre_hook(record(s), with_kwargs=True) for s in sites]
    try:
        total, per_module = count_flops(model, family.example_inputs(model, 1, resolution, device))
    finally:
        for h in hooks:
            h.remove()
    attn, formula = {}, []
    for site in sites:  # formulas read the token grid the forward recorded
        module = model.get_submodule(site.path)
        measured = per_module.get(site.path, 0)
        attn[site.path] = measured
        processor = getattr(module, "processor", None)
        cores = [None if c is None else attention_core_flops(processor, site, *c) for c in calls[site.path]]
        if not cores or None in cores:
            continue
        projections = sum(
            per_module.get(f"{site.path}.{name}", 0)
            for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not name.startswith("processor")
        )
        attn[site.path] = projections + sum(cores)
        total += attn[site.path] - measured
        formula.append(site.path)
    params = param_count(model)
    return {
        "params": params,
        "activated_params": params - routed_unused(model),
        "flops": total,
        "attention_flops": attn,
        "attention_formula": formula,
    }


def routed_unused(model: nn.Module) -> int:
    """Parameters a token does not use: those of routed modules (`activated_parameters`) beyond what they activate."""
    return sum(
        sum(p.numel() for p in m.parameters()) - m.activated_parameters()
        for m in model.modules()
        if callable(getattr(m, "activated_parameters", None))
    )
