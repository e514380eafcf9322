"""`layers: {auto: {...}}`: choosing which layers an edit grafts, by sensitivity.

For an edit with automatic layers, every candidate layer of its site and group is grafted alone on
the model as the earlier edits leave it (the "base"), the new module gets a short stage 1 against
the base's module (`training.run.activation_distill`), and the relative error of the whole model's output to the
base's output is measured on a fixed seeded batch of noised teacher samples. The least sensitive
`fraction` of the candidates is chosen. The result is an ordinary recipe with explicit layers, so a
plan, graft.json and `from_pretrained` never see `auto`.

On the meta device (dry runs) nothing can be measured; `placeholder()` picks evenly spread layers of
the right count so the costs are right, and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dit_graft.families import family_for
from dit_graft.plan import apply, plan
from dit_graft.recipe import AutoSpec, Recipe
from dit_graft.training.run import Target, activation_distill, relative_error


@dataclass
class Selection:
    """The layers chosen for one auto edit and every candidate's sensitivity (relative output error)."""

    edit: int
    site: str
    group: str
    op: str
    fraction: float
    sensitivity: dict[int, float] = field(default_factory=dict)
    chosen: list[int] = field(default_factory=list)


def has_auto(recipe: Recipe) -> bool:
    return any(isinstance(e.layers, AutoSpec) for e in recipe.graft)


def _candidates(model: nn.Module, site: str, group: str) -> list[int]:
    family = family_for(model)
    return sorted({s.layer for s in family.sites(model) if getattr(s, "group", group) == group and s.kind == site})


def _count(fraction: float, n: int) -> int:
    return max(1, min(n, math.floor(fraction * n + 0.5)))


def placeholder(model: nn.Module, recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe with each auto edit's layers set to evenly spread ones of the right count (for dry runs)."""
    recipe = recipe.model_copy(deep=True)
    notes = []
    family = family_for(model)
    for i, edit in enumerate(recipe.graft):
        if not isinstance(edit.layers, AutoSpec):
            continue
        base = apply(model, plan(model, _prefix(recipe, i))) if i else model
        group = edit.group or family.groups[0]
        cands = _candidates(base, edit.site, group)
        k = _count(edit.layers.auto.fraction, len(cands))
        chosen = sorted({cands[int(j * len(cands) / k)] for j in range(k)})
        notes.append(
            f"graft.{i}.layers: auto chooses {k} of {len(cands)} layers by sensitivity at conversion; "
            f"costed here with evenly spread layers {chosen}"
        )
        edit.layers = chosen
    return recipe, notes


def _prefix(recipe: Recipe, i: int) -> Recipe:
    return recipe.model_copy(update={"graft": recipe.graft[:i]})


def resolve(
    teacher: nn.Module, recipe: Recipe, pool: dict[str, torch.Tensor], progress=None
) -> tuple[Recipe, list[Selection]]:
    """The recipe with every auto edit's layers chosen on `teacher`; the per-candidate sensitivities.

    `pool` is the training pool (`dit_graft.training.data.training_pool`); the measurement batch is drawn from
    it with a generator seeded by the recipe's seed, so the choice is reproducible.
    """
    from dit_graft.training.run import training_batch

    recipe = recipe.model_copy(deep=True)
    family = family_for(teacher)
    cfg = recipe.distill
    selections = []
    device = next(teacher.parameters()).device
    for i, edit in enumerate(recipe.graft):
        if not isinstance(edit.layers, AutoSpec):
            continue
        auto = edit.layers.auto
        base = apply(teacher, plan(teacher, _prefix(recipe, i))) if i else teacher
        base.eval()
        group = edit.group or family.groups[0]
        cands = _candidates(base, edit.site, group)
        null = family.null_conditions(teacher, cfg.conditions)
        gen = torch.Generator().manual_seed(cfg.seed + 11)
        xt, t, _, y = training_batch(teacher, pool, null, auto.samples, cfg.null_class_prob, gen, device)
        with torch.no_grad():
            reference = family.forward(base, xt, t, y)
        sel = Selection(edit=i, site=edit.site, group=group, op=edit.op, fraction=auto.fraction)
        for n, layer in enumerate(cands):
            single = recipe.model_copy(update={"graft": [edit.model_copy(update={"layers": [layer]})]})
            one_plan = plan(base, single)
            student = apply(base, one_plan)
            paths = [m.path for m in one_plan.edits[0].modules]
            target_list = [Target(student=p, first=p, last=p) for p in paths]
            if auto.steps:
                activation_distill(base, student, target_list, cfg, pool, steps=auto.steps)
            with torch.no_grad():
                sel.sensitivity[layer] = relative_error(family.forward(student.eval(), xt, t, y), reference)
            if progress is not None:
                progress(n + 1, len(cands), f"graft.{i} layer {layer}: {sel.sensitivity[layer]:.3g}")
        k = _count(auto.fraction, len(cands))
        sel.chosen = sorted(sorted(cands, key=lambda layer: (sel.sensitivity[layer], layer))[:k])
        edit.layers = sel.chosen
        selections.append(sel)
    return recipe, selections


def plot(selections: list[Selection], path) -> None:
    """A bar chart of every auto edit's per-layer sensitivity, chosen layers highlighted (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(selections), 1, figsize=(7, 2.6 * len(selections)), dpi=110, squeeze=False)
    for ax, sel in zip(axes[:, 0], selections, strict=True):
        layers = sorted(sel.sensitivity)
        colors = ["tab:green" if layer in sel.chosen else "tab:gray" for layer in layers]
        ax.bar([str(layer) for layer in layers], [sel.sensitivity[layer] for layer in layers], color=colors)
        ax.set_yscale("log")
        ax.set_xlabel(f"{sel.group} layer ({sel.site})")
        ax.set_ylabel("relative output error")
        ax.set_title(
            f"graft.{sel.edit}: {sel.op} on {len(sel.chosen)}/{len(layers)} layers (green: chosen, least sensitive)"
        )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
