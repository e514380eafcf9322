"""`parallel_blocks`: run pairs of consecutive blocks side by side (the grafting paper's parallel variant).

A structure edit (`site: depth`) on one block group (the edit's `group`; default the family's first).
Each chosen pair (b₁, b₂) of consecutive teacher blocks becomes one `ParallelBlocks` module that runs
both inherited blocks on the same input, with the same block arguments (timestep, labels, ...), and
adds up their residual updates, on every residual stream the blocks update (FLUX: text and image):

    out = x + (b₁(x) − x) + (b₂(x) − x)       (computed as b₁(x) + (b₂(x) − x))

returned in the blocks' own format ((text, image) on FLUX), so the depth drops from L to L − #pairs and
the pair's two blocks can run concurrently. Nothing is dropped and nothing is added: every teacher
weight is kept, inside the pair module (state-dict keys `transformer_blocks.{i}.branches.{0,1}.…`;
FLUX single: `single_transformer_blocks.{i}.branches.…`). Distillation then teaches the pair to
reproduce the two sequential blocks (stage 1 regresses pair i on its span: the input of b₁ → the
output of b₂).

    pairs: all          the even-aligned pairs (0, 1), (2, 3), …; an odd last block stays alone
    pairs: [0, 4, 7]    the pairs starting at these blocks: (0, 1), (4, 5), (7, 8); they may not overlap

The plan records, for new block i, `spans[i]` = the pair [a, a+1] or the lone block [a], and
`layer_map` sends both blocks of a pair to the same new index. Later edits number layers in the new
model; an attention/MLP edit on layer i changes both blocks of pair i.

Export: the config's block count (`num_layers`; FLUX single: `num_single_layers`) becomes L − #pairs,
but a pair module is not a diffusers block, so the export does NOT load with the stock diffusers
class: load it with `dit_graft.from_pretrained(out)`, which replays the plan (graft.json) on the
teacher's config and then loads the weights strictly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from dit_graft.errors import RecipeError
from dit_graft.operators.base import Operator, Options, register
from dit_graft.operators.depth import BlockGroup, DepthChoice, Restructure, Streams, renumbered_path


class ParallelBlocksOptions(Options):
    """Options of the `parallel_blocks` structure edit."""

    pairs: Literal["all"] | list[int] = Field(
        default="all", description="all (even-aligned pairs) or the first blocks of the pairs, e.g. [0, 4]"
    )

    @field_validator("pairs")
    @classmethod
    def _disjoint(cls, pairs):
        if isinstance(pairs, list):
            if not pairs:
                raise ValueError("name at least one pair (its first block), or all")
            if any(p < 0 for p in pairs):
                raise ValueError(f"block indices are ≥ 0 (got {pairs})")
            starts = sorted(pairs)
            for a, b in zip(starts, starts[1:], strict=False):
                if b - a < 2:
                    raise ValueError(f"pairs starting at {a} and {b} overlap (each pair is blocks i, i+1)")
            return starts
        return pairs


class ParallelBlocks(nn.Module):
    """Blocks run on the same input whose residual updates add up: b₁(x) + Σ_{j>1} (b_j(x) − x), per stream.

    `streams` says which arguments carry the residual streams in and how the blocks return them.
    """

    def __init__(self, branches: list[nn.Module], streams: Streams = Streams()) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.streams = streams

    @property
    def norm1(self) -> nn.Module:
        # DiT's output layer reads transformer_blocks[0].norm1.emb (the label/timestep embedding): the
        # pair answers with its first block's, the embedding the teacher's output layer read
        return self.branches[0].norm1

    def forward(self, *args, **kwargs) -> Any:
        inputs = self.streams.inputs(self, args, kwargs)
        out = self.streams.outputs(self.branches[0](*args, **kwargs))
        for branch in self.branches[1:]:
            update = self.streams.outputs(branch(*args, **kwargs))
            out = tuple(o + (u - x) for o, u, x in zip(out, update, inputs, strict=True))
        return self.streams.pack(out)


def pair_starts(pairs: str | list[int], num_blocks: int, where: str) -> list[int]:
    """The first blocks of the pairs on a model of `num_blocks` blocks."""
    if pairs == "all":
        starts = list(range(0, num_blocks - 1, 2))
    else:
        bad = [a for a in pairs if a + 1 >= num_blocks]
        if bad:
            raise RecipeError(
                f"{where}.pairs: a pair starting at block {bad[0]} needs block {bad[0] + 1}; "
                f"the model has blocks 0-{num_blocks - 1}"
            )
        starts = list(pairs)
    if not starts:
        raise RecipeError(f"{where}.pairs: a model of {num_blocks} block(s) has no pair of blocks to run in parallel")
    return starts


def _plan(model: nn.Module, family, group: BlockGroup, options: ParallelBlocksOptions, where: str) -> DepthChoice:
    n = group.num_blocks(model)
    starts = set(pair_starts(options.pairs, n, where))
    spans: list[list[int]] = []
    i = 0
    while i < n:
        spans.append([i, i + 1] if i in starts else [i])
        i += len(spans[-1])
    layer_map = {old: new for new, span in enumerate(spans) for old in span}
    return DepthChoice(layers=sorted(i for a in starts for i in (a, a + 1)), spans=spans, layer_map=layer_map)


def _check(edit, num_blocks: int) -> None:
    if edit.spans is None or any(len(s) > 2 for s in edit.spans) or edit.kept is not None:
        raise ValueError(f"spans {edit.spans} are not pairs and single blocks (kept: {edit.kept})")
    if any(new == "dropped" for new in edit.layer_map.values()):
        raise ValueError("parallel_blocks drops no block")


def _apply(model: nn.Module, family, group: BlockGroup, edit) -> None:
    """Keeps the first block of every span, then puts each pair's module in its first block's place."""
    old = group.blocks(model)
    group.keep(model, [s[0] for s in edit.spans])
    blocks = getattr(model, group.attr)
    for new, span in enumerate(edit.spans):
        if len(span) > 1:
            blocks[new] = ParallelBlocks([old[i] for i in span], group.streams)


def _move_path(path: str, layer: int, edit) -> str:
    new = edit.layer_map[layer]
    span = edit.spans[new]
    branch = ("branches", str(span.index(layer))) if len(span) > 1 else ()
    return renumbered_path(path, layer, new, branch)


def _describe(edit) -> str:
    pairs = [s for s in edit.spans if len(s) > 1]
    return f"{len(edit.layer_map)} → {len(edit.spans)}, in parallel {pairs}"


register(
    Operator(
        name="parallel_blocks",
        site="depth",
        summary="Structure edit: each chosen pair of consecutive blocks runs on the same input, residual updates "
        "summed (depth L → L − pairs; grafting's parallel variant); reloads with dit_graft.from_pretrained.",
        options=ParallelBlocksOptions,
        build=None,
        installs="structure",
        paper="Grafting (Chandrasegaran et al. 2025), parallel blocks",
        structure=Restructure(plan=_plan, check=_check, apply=_apply, move_path=_move_path, describe=_describe),
    )
)
