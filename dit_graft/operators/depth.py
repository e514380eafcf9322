"""What a depth operator (`site: depth`) supplies to the planner, and what the depth operators share.

A depth operator does not build a module per site: it rewrites the block list. It hands the planner a
`Restructure` (the `structure` field of its `Operator`), whose hooks plan the edit to pure data (a
`DepthChoice`, recorded on the `PlannedEdit`), check a recorded edit, apply it to a model, and say
where a module of an old block lives afterwards. The planner and the walker call only these hooks,
so a new depth operator needs no change to `dit_graft.plan`.

The recorded contract (old = block index before the edit, new = after it), for every depth edit:

- `spans[new]` is the ascending, contiguous list of old blocks that new block `new` stands in for; the
  spans cover every old block exactly once, in order (the stage-1 trainer regresses new block `new`
  on the teacher's span: the input of old block `spans[new][0]` → the output of `spans[new][-1]`);
- `layer_map[old]` is the new block that carries old block `old`'s weights, or `"dropped"` when
  they are gone; a carried block always lies in the span of its new block;
- `kept` (block-dropping edits only) lists the old blocks that survive as whole blocks, ascending.

Block indices count within one `BlockGroup`, the family's list of blocks the edit rewrites (DiT: `blocks`;
PixArt: `self`; FLUX: `double` or `single`); the other groups' blocks and paths are untouched. A group's
`Streams` say which residual streams its blocks update and in which format they return them, so that
scoring, skipping and summing blocks works the same on a DiT block (one tensor) and a FLUX block
(`(text, image)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dit_graft.model.calibration import calibration_inputs, calibration_latent, is_meta
from dit_graft.model.site import BlockGroup, Streams

# moved to dit_graft.model; re-exported for older imports
__all__ = ["BlockGroup", "Streams", "calibration_inputs", "calibration_latent", "is_meta"]

DROPPED = "dropped"

LayerMap = dict[int, int | Literal["dropped"]]


@dataclass
class DepthChoice:
    """What planning a depth edit decided (see the module docstring for the meaning of each field)."""

    layers: list[int]  # the old blocks the edit keeps or changes (reported in the model card)
    spans: list[list[int]]
    layer_map: LayerMap
    kept: list[int] | None = None
    scores: list[float] | None = None  # per old block; None when planned without weights (meta device)


@dataclass(frozen=True)
class Restructure:
    """The hooks a depth operator gives the planner and the walker; the callables take these arguments:

    - `plan(model, family, group, options, where) -> DepthChoice`: decides the edit on the `BlockGroup`
      `group` of `model` (possibly on the meta device); `where` ("graft.3.options") prefixes RecipeErrors
      about options
    - `check(edit, num_blocks) -> None`: raises ValueError if a recorded `PlannedEdit` (a graft.json's) is
      not one this operator plans on `num_blocks` blocks; run on every depth edit before anything changes
    - `apply(model, family, group, edit) -> None`: rewrites `model`'s block list `group` in place as `edit`
      records
    - `move_path(path, layer, edit) -> str | None`: the path, after the edit, of the module at `path`
      in old block `layer` of the edit's group (None: dropped)
    - `describe(edit) -> str`: one line for the dry run ("6 → 3, dropped [1, 3, 5]")
    """

    plan: Any
    check: Any
    apply: Any
    move_path: Any
    describe: Any


def renumbered_path(path: str, old: int, new: int, insert: tuple[str, ...] = ()) -> str:
    """`path` with its first component equal to the block index `old` replaced by `new` (+ `insert` after it)."""
    parts = path.split(".")
    i = parts.index(str(old))
    return ".".join([*parts[:i], str(new), *insert, *parts[i + 1 :]])


def spans_from_kept(kept: list[int], num_blocks: int) -> list[list[int]]:
    """Spans of a block-dropping edit: kept block k stands for itself and the dropped blocks up to the next kept one.

    Dropped blocks before the first kept one belong to the first span.
    """
    bounds = [0, *kept[1:], num_blocks]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def prune_layer_map(kept: list[int], num_blocks: int) -> LayerMap:
    """old → new index of the kept blocks, "dropped" for the others."""
    new_index = {old: new for new, old in enumerate(kept)}
    return {i: new_index.get(i, DROPPED) for i in range(num_blocks)}


def check_spans(spans: list[list[int]], layer_map: LayerMap, num_blocks: int) -> None:
    """Raises ValueError unless `spans` partition 0 … n−1 in order and `layer_map` keeps each block in its span."""
    flat = [i for s in spans for i in s]
    if flat != list(range(num_blocks)) or any(not s for s in spans):
        raise ValueError(f"spans {spans} do not cover blocks 0-{num_blocks - 1} once each, in order")
    if sorted(layer_map) != list(range(num_blocks)):
        raise ValueError(f"layer_map names blocks {sorted(layer_map)}, not 0-{num_blocks - 1}")
    for new, span in enumerate(spans):
        targets = {layer_map[i] for i in span} - {DROPPED}
        if targets != {new}:
            raise ValueError(f"layer_map sends the blocks of span {new} ({span}) to {sorted(map(str, targets))}")
