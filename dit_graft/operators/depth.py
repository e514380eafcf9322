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

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

DROPPED = "dropped"

LayerMap = dict[int, int | Literal["dropped"]]


@dataclass(frozen=True)
class Streams:
    """The residual streams a group's blocks update: the forward arguments that carry them in, named in the
    order the block returns them (one name: the block returns that tensor; several: a tuple of them).

    DiT and PixArt blocks: `("hidden_states",)`; FLUX blocks: `("encoder_hidden_states", "hidden_states")`,
    returned as (text, image). Every stream is (B, tokens, C).
    """

    names: tuple[str, ...] = ("hidden_states",)

    def inputs(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The streams `block` was called with (a hook's args/kwargs), in output order."""
        if args:  # positional: named by the signature of the diffusers block (a pair's: its first branch's)
            while isinstance(getattr(block, "branches", None), nn.ModuleList):
                block = block.branches[0]
            kwargs = inspect.signature(block.forward).bind_partial(*args, **kwargs).arguments
        return tuple(kwargs[n] for n in self.names)

    def outputs(self, out: Any) -> tuple[torch.Tensor, ...]:
        """The streams a block returned, in order."""
        return (out,) if len(self.names) == 1 else tuple(out)

    def pack(self, streams: tuple[torch.Tensor, ...]) -> Any:
        """Streams in the block's own output format."""
        return streams[0] if len(self.names) == 1 else tuple(streams)

    def joined(self, streams: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The streams as one token sequence (B, Σ tokens, C), text before image as FLUX joins them."""
        return streams[0] if len(streams) == 1 else torch.cat(streams, dim=1)


@dataclass(frozen=True)
class BlockGroup:
    """A list of blocks that depth edits rewrite: `model.<attr>`, counted by the config's `config_key`.

    `pinned` are blocks no depth edit may drop (the model reads something from them besides their output).
    """

    name: str
    attr: str
    config_key: str
    streams: Streams = Streams()
    pinned: tuple[int, ...] = ()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(getattr(model, self.attr))

    def num_blocks(self, model: nn.Module) -> int:
        return len(getattr(model, self.attr))

    def keep(self, model: nn.Module, kept: list[int]) -> None:
        """Keeps the blocks `kept` (renumbered 0 … k−1) and sets the config's count: a stock model again."""
        old = getattr(model, self.attr)
        setattr(model, self.attr, nn.ModuleList([old[i] for i in kept]))
        model.register_to_config(**{self.config_key: len(kept)})

    def owns(self, path: str) -> bool:
        """Whether the module at `path` lives in one of this group's blocks."""
        return path.split(".", 1)[0] == self.attr

    def path(self, index: int) -> str:
        return f"{self.attr}.{index}"


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


def is_meta(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "meta"


def calibration_latent(model: nn.Module, family: Any, pixels: int | None) -> int | None:
    """The latent size of calibration inputs of `pixels` pixels (None: None, the family's default size)."""
    if pixels is None:
        return None
    scale = family.vae_scale(model)
    if pixels % scale:
        raise ValueError(f"{pixels} px is not a multiple of the VAE factor {scale}")
    return pixels // scale


def calibration_inputs(model: nn.Module, family: Any, n: int, seed: int, resolution: int | None = None):
    """n seeded random teacher inputs on the model's device: latents x ~ N(0, I), timesteps, conditions.

    Timesteps are uniform over the 1000 training steps (flow-matching families: σ = (k + 1) / 1000, k in
    0 … 999); `resolution` is the latent size (default: the family's). The conditions are the family's
    evenly spread ones in a seeded order; the global RNG is untouched.
    """
    from dit_graft.families.base import conditions_to, take_rows

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *family.latent_shape(model, resolution), generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    if family.objective == "flow_velocity":
        t = (t + 1).float() / 1000
    cond = family.conditions(model, n)
    cond = take_rows(cond, torch.randperm(n, generator=gen) % next(iter(cond.values())).shape[0])
    return x.to(device), t.to(device), conditions_to(cond, device)
