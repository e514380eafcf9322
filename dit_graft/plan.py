"""Planning and applying grafts.

`plan()` resolves a recipe's edits against a model's real module names into a `GraftPlan` — pure,
JSON-serialisable data with no weights — and `apply()` is the one generic walker that swaps modules:
it builds every replacement first and mutates the model only when all of them were built.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Literal

from pydantic import BaseModel, model_serializer
from torch import nn

from dit_graft import __version__
from dit_graft.errors import RecipeError
from dit_graft.families import Family, family_for
from dit_graft.operators import OPERATORS
from dit_graft.operators.base import accepted, build_replacement, refusal
from dit_graft.operators.depth import BlockGroup, check_spans, spans_from_kept
from dit_graft.recipe import GraftEdit, Recipe

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_EVERY = re.compile(r"^every:(\d+)(?::(\d+))?$")


class PlannedModule(BaseModel):
    """One module an edit touches: its path, layer, the operator it had and the one it gets."""

    path: str
    layer: int
    old: str
    new: str
    # operators that keep a subset of the teacher FFN's hidden units (mlp_ratio, prune_width, moe): which ones,
    # per part of the replacement ("hidden"; moe: "shared", "experts.0", ...); recorded by apply(), replayed by it
    units: dict[str, list[int]] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_units(self, handler):
        data = handler(self)
        if data.get("units") is None:  # modules without kept units serialise as before
            data.pop("units", None)
        return data


class PlannedEdit(BaseModel):
    """A recipe edit resolved to concrete layers and modules."""

    index: int
    site: str
    group: str | None = None  # as the recipe gave it; depth edits: the block group they rewrite (None: the first)
    op: str
    options: dict[str, Any]
    layers: list[int]
    modules: list[PlannedModule]
    # depth edits (old = block index before the edit, new = after it; see dit_graft.operators.depth):
    kept: list[int] | None = None  # block-dropping edits: the old blocks surviving as whole blocks, ascending
    layer_map: dict[int, int | Literal["dropped"]] | None = None  # old → the new block carrying its weights
    scores: list[float] | None = None  # per old block (importance, keep probability); None: unscored (meta)
    spans: list[list[int]] | None = None  # new block i stands in for the contiguous old blocks spans[i]


class GraftPlan(BaseModel):
    """Everything needed to rebuild a student from its base config: the recorded state of a graft."""

    dit_graft_version: str = __version__
    family: str
    base_class: str
    num_layers: int
    edits: list[PlannedEdit]
    base_config: dict[str, Any] = {}  # teacher values of the config keys structure edits change (num_layers)
    # computation choices the diffusers config cannot hold (Family.runtime_options; original DiT's timestep
    # frequencies), re-applied to every model the plan is applied to
    runtime: dict[str, Any] = {}

    def operators_by_site(self) -> dict[str, str]:
        """The final operator of every touched module (later edits win), at its path in the final model."""
        from dit_graft.families import FAMILIES

        family = FAMILIES.get(self.family)
        out: dict[str, tuple[int, str]] = {}  # path → (layer, operator)
        for e in self.edits:
            if e.layer_map is not None:  # a depth edit renumbers its group's blocks (drops, merges)
                group = family.depth_group(e.group)
                move = OPERATORS.get(e.op).structure.move_path
                moved = {}
                for path, (layer, op) in out.items():
                    if not group.owns(path):
                        moved[path] = (layer, op)
                    elif (new_path := move(path, layer, e)) is not None:
                        moved[new_path] = (e.layer_map[layer], op)
                out = moved
            for m in e.modules:
                out[m.path] = (m.layer, m.new)
        return {path: op for path, (_, op) in out.items()}


def depth_spans(edit: PlannedEdit) -> list[list[int]]:
    """For each block after a depth edit, the ascending contiguous old blocks it stands in for.

    The edit's own `spans`; plans written before they were recorded only kept blocks, so there a kept
    block stands for itself and the dropped blocks after it, up to the next kept one.
    """
    if edit.layer_map is None:
        raise ValueError(f"graft.{edit.index} ({edit.op}) is not a depth edit")
    if edit.spans is not None:
        return [list(s) for s in edit.spans]
    return spans_from_kept(edit.kept or [], len(edit.layer_map))


def describe_depth(edit: PlannedEdit) -> str:
    """One line saying what a depth edit does to the block list ("6 → 3, dropped [1, 3, 5]")."""
    return OPERATORS.get(edit.op).structure.describe(edit)


def select_layers(spec: str | int | list[int], num_layers: int, where: str) -> list[int]:
    """Resolves a layer selector: an index, a list, "all", "A-B" (inclusive), "every:K[:OFFSET]", "1,3,5-7"."""
    if isinstance(spec, bool):
        raise RecipeError(f"{where}: layers must be an index, a list, a range or 'all'")
    if not isinstance(spec, (int, str, list)):  # {auto: ...}: chosen on the teacher before planning
        raise RecipeError(f"{where}: automatic layers are chosen before planning (dit_graft.autoselect.resolve)")
    if isinstance(spec, int):
        chosen = [spec]
    elif isinstance(spec, list):
        chosen = list(spec)
    else:
        s = spec.strip()
        if s == "all":
            chosen = list(range(num_layers))
        elif m := _EVERY.match(s):
            k, offset = int(m.group(1)), int(m.group(2) or 0)
            if k < 1:
                raise RecipeError(f"{where}: every:K needs K ≥ 1")
            chosen = list(range(offset, num_layers, k))
        else:
            chosen = []
            for part in s.split(","):
                part = part.strip()
                if m := _RANGE.match(part):
                    a, b = int(m.group(1)), int(m.group(2))
                    if a > b:
                        raise RecipeError(f"{where}: empty range {part!r}")
                    chosen.extend(range(a, b + 1))
                elif part.isdigit():
                    chosen.append(int(part))
                else:
                    raise RecipeError(f"{where}: cannot read layer selector {spec!r} (use all, A-B, every:K or a list)")
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise RecipeError(f"{where}: layer {bad[0]} out of range (the model has layers 0-{num_layers - 1})")
    if not chosen:
        raise RecipeError(f"{where}: selector {spec!r} matches no layer")
    return sorted(set(chosen))


def _describe_current(model: nn.Module, path: str, kind: str, current: dict[str, str]) -> str:
    if path in current:
        return current[path]
    if kind == "attention":
        return "softmax"
    return type(model.get_submodule(path)).__name__


def plan(model: nn.Module, recipe: Recipe) -> GraftPlan:
    """Resolves the recipe's graft edits against `model` (which may live on the meta device).

    Every module an edit touches is checked here (`operators.base.refusal`: what the operator needs against
    what the site's attention adapter can give, and the options the site cannot take), so an operator a site
    cannot take fails, with its reason, before anything is built or swapped.
    """
    family = family_for(model)
    num_layers = family.num_layers(model)
    view = model
    sites = family.sites(view)
    current: dict[str, str] = {}
    edits = []
    for i, edit in enumerate(recipe.graft):
        if edit.site == "depth":
            planned, pruned = _plan_depth(view, family, i, edit)
            current = _carry_operators(current, view, sites, pruned, family.sites(pruned))
            view, sites = pruned, family.sites(pruned)
            edits.append(planned)
        else:
            edits.append(_plan_edit(view, family, i, edit, sites, current))
    base_config = {k: v for k, v in model.config.items() if view.config.get(k) != v}
    return GraftPlan(
        family=family.name,
        base_class=type(model).__name__,
        num_layers=num_layers,
        edits=edits,
        base_config=base_config,
        runtime=family.runtime_options(model),
    )


def _plan_depth(model: nn.Module, family: Family, index: int, edit: GraftEdit) -> tuple[PlannedEdit, nn.Module]:
    """Resolves a depth edit with its operator's planner; returns it and a view of `model` after the edit.

    The view shares every block and weight with `model`; only its block list and config differ. A
    planner that scores blocks runs the model forward, so it needs real weights; on the meta device
    it plans unscored (`scores: None`), which is all a dry run's costs depend on. The planned edit
    records the block group it rewrites (`group`), resolved when the recipe left it out.
    """
    if not family.depth_groups:
        raise RecipeError(f"graft.{index}.site: the {family.name} family does not support depth edits yet")
    group = _depth_group(family, index, edit.group)
    op = OPERATORS.get(edit.op)
    choice = op.structure.plan(model, family, group, op.parse_options(edit.options), f"graft.{index}.options")
    planned = PlannedEdit(
        index=index,
        site=edit.site,
        group=group.name,
        op=edit.op,
        options=edit.options,
        layers=choice.layers,
        modules=[],
        kept=choice.kept,
        layer_map=choice.layer_map,
        scores=choice.scores,
        spans=choice.spans,
    )
    _check_depth_edit(planned, group.num_blocks(model))
    view = copy.copy(model)
    view._modules = dict(model._modules)
    op.structure.apply(view, family, group, planned)
    return planned, view


def _depth_group(family: Family, index: int, name: str | None) -> BlockGroup:
    """The block group a depth edit rewrites (a RecipeError naming the valid ones for any other)."""
    try:
        return family.depth_group(name)
    except ValueError as e:
        raise RecipeError(f"graft.{index}.group: {e}") from None


def _carry_operators(current: dict[str, str], before: nn.Module, sites_before, after: nn.Module, sites_after):
    """Moves the operators recorded per module path to the paths the same modules have after a depth edit."""
    new_path = {id(after.get_submodule(s.path)): s.path for s in sites_after}
    out = {}
    for s in sites_before:
        if s.path in current and (path := new_path.get(id(before.get_submodule(s.path)))) is not None:
            out[path] = current[s.path]
    return out


def _plan_edit(model, family: Family, index: int, edit: GraftEdit, sites, current: dict[str, str]) -> PlannedEdit:
    where = f"graft.{index}.layers"
    group = edit.group or family.groups[0]
    if group not in family.groups:
        raise RecipeError(
            f"graft.{index}.group: the {family.name} family has no block group {group!r} "
            f"(it has: {', '.join(family.groups)})"
        )
    in_group = [s for s in sites if s.group == group and s.kind == edit.site]
    if not in_group:
        raise RecipeError(f"graft.{index}.site: the {family.name} family's {group} blocks have no {edit.site} sites")
    layers = select_layers(edit.layers, max(s.layer for s in in_group) + 1, where)
    op = OPERATORS.get(edit.op)
    try:
        options = op.parse_options(edit.options)
    except ValueError as e:
        raise RecipeError(f"graft.{index}.options: {e}") from None
    modules = []
    for site in in_group:
        if site.layer in layers:
            reason = refusal(op, site)
            if reason is not None:
                raise RecipeError(
                    f"graft.{index}.op: operator {op.name!r} is not supported on the {family.name} family's {group} "
                    f"{site.kind} sites: {reason} (supported there: {', '.join(accepted(site)) or 'none'})"
                )
            reason = refusal(op, site, options)
            if reason is not None:
                raise RecipeError(f"graft.{index}.options: {site.path}: {reason}")
            old = _describe_current(model, site.path, site.kind, current)
            modules.append(PlannedModule(path=site.path, layer=site.layer, old=old, new=edit.op))
            current[site.path] = edit.op
    if not modules:
        raise RecipeError(f"{where}: no {edit.site} site in layers {layers}")
    return PlannedEdit(
        index=index,
        site=edit.site,
        group=edit.group,
        op=edit.op,
        options=edit.options,
        layers=layers,
        modules=modules,
    )


def apply(model: nn.Module, graft_plan: GraftPlan, inplace: bool = False) -> nn.Module:
    """Applies a plan: returns a student (a deep copy unless `inplace`), all edits or none.

    Every replacement is built before the first swap, so a failing builder leaves the model as it
    was (with depth edits, edits are applied in recipe order and the swaps between two depth edits are
    built before any of them is swapped; without `inplace` the caller's model is never touched).
    The teacher's parameters stay where they are, so everything not specific to a new operator
    is inherited.
    """
    family: Family = family_for(model)
    _check_depth_edits(model, family, graft_plan)
    student = model if inplace else copy.deepcopy(model)
    family.apply_runtime_options(student, graft_plan.runtime)
    family.install_grid(student)
    segment: list[PlannedEdit] = []
    for edit in graft_plan.edits:
        if edit.site == "depth":
            _swap(student, family, segment)
            segment = []
            group = family.depth_group(edit.group)
            OPERATORS.get(edit.op).structure.apply(student, family, group, edit)
        else:
            segment.append(edit)
    _swap(student, family, segment)
    return student


def _check_depth_edits(model: nn.Module, family: Family, graft_plan: GraftPlan) -> None:
    """Checks every depth edit against the block count it meets in its group, before anything is changed."""
    counts = {g.name: g.num_blocks(model) for g in family.depth_groups}
    for edit in graft_plan.edits:
        if edit.site != "depth":
            continue
        if not family.depth_groups:
            raise RecipeError(f"graft.{edit.index}: the {family.name} family does not support depth edits yet")
        group = _depth_group(family, edit.index, edit.group)
        counts[group.name] = _check_depth_edit(edit, counts[group.name])


def _check_depth_edit(edit: PlannedEdit, num_blocks: int) -> int:
    """Checks a depth edit that meets `num_blocks` blocks (spans, layer map, operator rules); returns the new count."""
    if edit.op not in OPERATORS or OPERATORS.get(edit.op).structure is None:
        raise RecipeError(f"graft.{edit.index}: {edit.op!r} is not a depth operator")
    try:
        if edit.layer_map is None:
            raise ValueError("no layer_map")
        spans = depth_spans(edit)
        check_spans(spans, edit.layer_map, num_blocks)
        OPERATORS.get(edit.op).structure.check(edit, num_blocks)
    except ValueError as e:
        raise RecipeError(f"graft.{edit.index}: {edit.op} on {num_blocks} blocks: {e}") from None
    return len(spans)


def _swap(student: nn.Module, family: Family, edits: list[PlannedEdit]) -> None:
    """Builds every replacement of `edits`, then swaps them all in (nothing is swapped if a build fails)."""
    sites = family.site_map(student)
    swaps: list[tuple[str, str, nn.Module | None]] = []
    records: list[tuple[PlannedModule, dict[str, list[int]]]] = []
    for edit in edits:
        op = OPERATORS.get(edit.op)
        options = op.parse_options(edit.options)
        for m in edit.modules:
            if m.path not in sites:
                raise RecipeError(f"graft.{edit.index}: module {m.path} does not exist in this model")
            old = student.get_submodule(m.path)
            opts = options
            if m.units is not None:  # a recorded plan: the same units, whatever the weights now rank first
                opts = options.model_copy()
                opts._recorded_units = m.units
            try:
                new = build_replacement(op, family, sites[m.path], old, opts)
            except ValueError as e:
                raise RecipeError(f"graft.{edit.index}.options: {m.path}: {e}") from None
            swaps.append((m.path, op.installs, new))
            if m.units is None and getattr(new, "_dit_graft_units", None) is not None:
                records.append((m, new._dit_graft_units))
    for m, units in records:
        m.units = units
    for path, installs, new in swaps:
        old = student.get_submodule(path)
        if installs == "processor":
            if isinstance(new, nn.Module):
                new = new.to(device=_device_of(old), dtype=_dtype_of(old))
            old.set_processor(new)
        else:
            parent_path, _, name = path.rpartition(".")
            parent = student.get_submodule(parent_path) if parent_path else student
            setattr(parent, name, new)


def _device_of(module: nn.Module):
    return next(module.parameters()).device


def _dtype_of(module: nn.Module):
    return next(module.parameters()).dtype
