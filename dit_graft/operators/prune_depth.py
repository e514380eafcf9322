"""`prune_depth`: keep k of the teacher's transformer blocks, chosen by one of three methods.

A structure edit (`site: depth`) on one block group (the edit's `group`; default the family's first: DiT
`blocks`, PixArt `self`, FLUX `double`, or FLUX `single`): planning decides which of the group's blocks
survive and records it; applying rebuilds the group's block list from the kept blocks, in their order,
and updates the config's count (`num_layers`, FLUX single: `num_single_layers`), so a depth-only student
is a stock diffusers model (blocks renumbered 0 … k−1). Each kept block also
records the span of teacher blocks it stands in for (itself and the dropped blocks after it up to the
next kept one; see `dit_graft.operators.depth`), which a span-wise trainer can regress it on.

All methods score on `calibration_samples` teacher forward passes of random latents x ~ N(0, I) at
uniform random timesteps (0 … 999; flow matching: σ in (0, 1]) with the family's evenly spread
conditions, from a generator seeded by `seed` (the global RNG is untouched): a data-free stand-in for
teacher data, at `calibration_resolution` pixels (default: the model's own size; FLUX: 1024 px). Blocks
a family pins (DiT: block 0, whose label/timestep embedding the output layer reads) are always kept.
The hidden states h_i below are the group's residual streams joined into one token sequence (FLUX:
[text; image], see `dit_graft.families.flux`).

    method: importance   (ShortGPT, Men et al. 2024) BI_i = 1 − E_tokens[cos(h_i, h_{i+1})], h_i the
                         input of block i. A block that barely turns its input changes the residual
                         stream least; the `keep` highest BI are kept (ties: the earlier).

    method: learnable    (TinyFusion, Fang et al. 2024) groups of `group_size` (M) consecutive blocks, each
                         keeping `keep_per_group` (N): a Gumbel-softmax search over each group's N:M masks
                         with jointly trained LoRA (see `dit_graft.depth_search`). `keep` is derived, N·L/M
                         (L must be a multiple of M); a `keep` given anyway must equal it.

    method: contiguous   (PPCL) collapses redundant contiguous spans, each into ONE block initialised from
                         the span's first block (the rest of the span is dropped; stage-1 training, driven
                         by the plan's spans, then fits that block to the whole span). The similarity along
                         depth is S(a, c) = E_tokens[cos(h_a, h_c)], h_L the last block's output; collapsing
                         span [a … b] costs 1 − S(a, b+1), what the whole span does to the residual stream.
                         Starting from one span per block, the two adjacent spans whose union costs least
                         (ties: the earlier) merge, until `keep` spans remain. A pinned block may only
                         start a span.

The plan's `scores` (per block): BI for importance and contiguous, the final probability of being kept
for learnable. The learnable-only options (group_size … tau_end) must keep their defaults with the
other methods, so that a misplaced option is an error rather than silently ignored.

On the meta device (dry runs) no block can be scored: the plan keeps the pinned blocks and then the
first ones (learnable: the first ones of each group; `scores: None`, "unscored" in the dry run), which
gives the right shapes and costs; a real conversion scores on the loaded teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from dit_graft.errors import RecipeError
from dit_graft.operators.base import Operator, Options, register
from dit_graft.operators.depth import (
    DROPPED,
    BlockGroup,
    DepthChoice,
    Restructure,
    calibration_inputs,
    calibration_latent,
    is_meta,
    prune_layer_map,
    renumbered_path,
    spans_from_kept,
)

LEARNABLE_ONLY = ("group_size", "keep_per_group", "search_steps", "lora_rank", "lr", "mask_lr", "tau", "tau_end")


class PruneDepthOptions(Options):
    """Options of the `prune_depth` structure edit; the learnable-only ones must keep their defaults elsewhere."""

    method: Literal["importance", "learnable", "contiguous"] = "importance"
    keep: int | None = Field(
        default=None,
        ge=1,
        validate_default=True,
        description="blocks to keep (required; learnable: derived, keep_per_group × blocks / group_size)",
    )
    calibration_samples: int = Field(default=8, ge=1, le=4096, description="random teacher inputs scored/searched on")
    seed: int = Field(default=0, ge=0, description="seed of the calibration inputs (and the learnable search)")
    calibration_resolution: int | None = Field(
        default=None, ge=1, description="image size in pixels of the calibration inputs (default: the model's own)"
    )
    group_size: int = Field(default=2, ge=1, description="learnable: M, blocks per group")
    keep_per_group: int = Field(default=1, ge=1, description="learnable: N, blocks kept per group")
    search_steps: int = Field(default=100, ge=1, description="learnable: search steps")
    lora_rank: int = Field(default=4, ge=0, description="learnable: LoRA rank (0: no LoRA)")
    lr: float = Field(default=1e-3, gt=0, description="learnable: LoRA learning rate")
    mask_lr: float = Field(default=5e-2, gt=0, description="learnable: mask-logit learning rate")
    tau: float = Field(default=4.0, gt=0, description="learnable: Gumbel-softmax temperature at the start")
    tau_end: float = Field(default=0.1, gt=0, description="learnable: temperature at the end (exponential decay)")

    @field_validator("keep")
    @classmethod
    def _keep_needed(cls, keep: int | None, info: ValidationInfo) -> int | None:
        method = info.data.get("method")
        if keep is None and method in ("importance", "contiguous"):
            raise ValueError(f"method {method} needs keep (the number of blocks to keep)")
        return keep

    @field_validator(*LEARNABLE_ONLY)
    @classmethod
    def _learnable_only(cls, value, info: ValidationInfo):
        method = info.data.get("method")
        default = cls.model_fields[info.field_name].default
        if method is not None and method != "learnable" and value != default:
            raise ValueError(f"an option of method learnable only (this edit's method is {method})")
        if info.field_name == "keep_per_group" and "group_size" in info.data and value > info.data["group_size"]:
            raise ValueError(f"keep_per_group={value} exceeds group_size={info.data['group_size']}")
        return value


def block_importance(model: nn.Module, options: PruneDepthOptions, group: str | None = None) -> list[float]:
    """BI_i = 1 − mean cosine similarity of block i's input and output tokens, over seeded random teacher inputs.

    `group`: the family's depth block group whose blocks are scored (None: the first)."""
    sims = block_similarity(model, options, reach=1, group=group)
    return [1.0 - sims[i][i + 1] for i in range(len(sims) - 1)]


def block_similarity(
    model: nn.Module, options: PruneDepthOptions, reach: int | None = None, group: str | None = None
) -> list[list[float]]:
    """S[a][c] = mean over tokens of cos(h_a, h_c) for a < c ≤ a + reach (h_i: block i's input streams joined,
    h_L: the last block's output), over seeded random teacher inputs; 0 elsewhere. `reach` None: every pair.

    The blocks are those of the family's depth block group `group` (None: the first)."""
    from dit_graft.model.family import family_for

    family = family_for(model)
    streams = family.depth_group(group).streams
    blocks = family.depth_group(group).blocks(model)
    resolution = calibration_latent(model, family, options.calibration_resolution)
    x, t, cond = calibration_inputs(model, family, options.calibration_samples, options.seed, resolution)
    states: list[torch.Tensor | None] = [None] * (len(blocks) + 1)

    def hook(i):
        def record(module, args, kwargs, out):
            states[i] = streams.joined(streams.inputs(module, args, kwargs)).float()
            if i == len(blocks) - 1:
                states[i + 1] = streams.joined(streams.outputs(out)).float()

        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            family.forward(model, x, t, cond)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    n = len(states)
    sims = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for c in range(a + 1, n if reach is None else min(n, a + reach + 1)):
            sims[a][c] = torch.nn.functional.cosine_similarity(states[a], states[c], dim=-1).mean().item()
    return sims


def choose_blocks(scores: list[float] | None, num_layers: int, keep: int, pinned: tuple[int, ...]) -> list[int]:
    """The kept block indices, ascending: the pinned ones, then the highest scores (no scores: the first ones)."""
    pinned = tuple(p for p in pinned if p < num_layers)[:keep]
    rest = [i for i in range(num_layers) if i not in pinned]
    if scores is not None:
        rest = sorted(rest, key=lambda i: (-scores[i], i))
    return sorted([*pinned, *rest[: keep - len(pinned)]])


def contiguous_spans(sims: list[list[float]], keep: int, pinned: tuple[int, ...]) -> list[list[int]] | None:
    """Merges adjacent spans, least 1 − S(first, last + 1) first, until `keep` remain (None: pins forbid it)."""
    spans = [[i] for i in range(len(sims) - 1)]
    while len(spans) > keep:
        best = None
        for j in range(len(spans) - 1):
            if spans[j + 1][0] in pinned:
                continue
            loss = 1.0 - sims[spans[j][0]][spans[j + 1][-1] + 1]
            if best is None or loss < best[0]:
                best = (loss, j)
        if best is None:
            return None
        j = best[1]
        spans[j : j + 2] = [spans[j] + spans[j + 1]]
    return spans


def _plan(model: nn.Module, family, group: BlockGroup, options: PruneDepthOptions, where: str) -> DepthChoice:
    n = group.num_blocks(model)
    pinned = tuple(p for p in group.pinned if p < n)
    try:
        family.latent_shape(model, calibration_latent(model, family, options.calibration_resolution))
    except ValueError as e:
        raise RecipeError(f"{where}.calibration_resolution: {e}") from None
    scores = None
    if options.method == "learnable":
        kept, scores = _plan_learnable(model, family, group, options, where, n, pinned)
    else:
        if options.keep > n:
            raise RecipeError(f"{where}.keep: keep={options.keep} exceeds the model's {n} blocks (group {group.name})")
        if options.keep < len(pinned):
            raise RecipeError(f"{where}.keep: keep={options.keep} is fewer than the family's pinned blocks {pinned}")
        if options.method == "importance":
            scores = None if is_meta(model) else block_importance(model, options, group.name)
            kept = choose_blocks(scores, n, options.keep, pinned)
        else:
            if is_meta(model):
                kept = choose_blocks(None, n, options.keep, pinned)
            else:
                sims = block_similarity(model, options, group=group.name)
                scores = [1.0 - sims[i][i + 1] for i in range(n)]
                spans = contiguous_spans(sims, options.keep, pinned)
                if spans is None:
                    raise RecipeError(f"{where}.keep: keep={options.keep} cannot keep the pinned blocks {pinned}")
                kept = [s[0] for s in spans]
    return DepthChoice(
        layers=kept,
        spans=spans_from_kept(kept, n),
        layer_map=prune_layer_map(kept, n),
        kept=kept,
        scores=scores,
    )


def _plan_learnable(model, family, group, options, where, n, pinned) -> tuple[list[int], list[float] | None]:
    from dit_graft.depth_search import candidate_masks, learnable_search

    m, k = options.group_size, options.keep_per_group
    if n % m:
        raise RecipeError(
            f"{where}.group_size: group_size={m} does not divide the model's {n} blocks (group {group.name})"
        )
    derived = k * n // m
    if options.keep is not None and options.keep != derived:
        raise RecipeError(
            f"{where}.keep: keep={options.keep}, but method learnable keeps keep_per_group × blocks / group_size "
            f"= {k} × {n} / {m} = {derived} (drop keep or set it to {derived})"
        )
    candidates = candidate_masks(n, m, k, pinned)
    if not all(candidates):
        raise RecipeError(f"{where}.keep_per_group: keep_per_group={k} cannot keep the pinned blocks {pinned}")
    if is_meta(model):
        return sorted(i for masks in candidates for i in masks[0]), None
    try:
        return learnable_search(model, family, group, options, candidates)
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from None


def _check(edit, num_blocks: int) -> None:
    kept = edit.kept or []
    if not kept or kept != sorted(set(kept)) or not all(0 <= i < num_blocks for i in kept):
        raise ValueError(f"kept blocks {kept} are not ascending indices below {num_blocks}")
    if edit.layer_map != prune_layer_map(kept, num_blocks):
        raise ValueError(f"layer_map does not number the kept blocks {kept} 0 … {len(kept) - 1}")
    if edit.spans is not None and edit.spans != spans_from_kept(kept, num_blocks):
        raise ValueError(f"spans {edit.spans} do not start at the kept blocks {kept}")


def _apply(model: nn.Module, family, group: BlockGroup, edit) -> None:
    group.keep(model, edit.kept)


def _move_path(path: str, layer: int, edit) -> str | None:
    new = edit.layer_map[layer]
    return None if new == DROPPED else renumbered_path(path, layer, new)


def _describe(edit) -> str:
    dropped = [i for i, new in edit.layer_map.items() if new == DROPPED]
    merged = [s for s in edit.spans or [] if len(s) > 1] if edit.options.get("method") == "contiguous" else []
    spans = f", spans {merged}" if merged else ""
    scored = "" if edit.scores is not None else " (unscored: no weights)"
    return f"{len(edit.layer_map)} → {len(edit.kept)}, dropped {dropped}{spans}{scored}"


register(
    Operator(
        name="prune_depth",
        site="depth",
        summary="Structure edit: keep `keep` blocks — method importance: highest 1 − cos(block input, output) "
        "(ShortGPT); learnable: N of every M by a Gumbel-softmax mask search with LoRA (TinyFusion); "
        "contiguous: collapse the most redundant contiguous spans to their first block (PPCL). "
        "Exports as a stock diffusers model.",
        options=PruneDepthOptions,
        build=None,
        installs="structure",
        paper="ShortGPT (Men et al. 2024); TinyFusion (Fang et al. 2024); PPCL",
        structure=Restructure(plan=_plan, check=_check, apply=_apply, move_path=_move_path, describe=_describe),
    )
)
