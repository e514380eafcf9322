"""Where operators go and what the model around them looks like: sites, token grids, block groups, streams.

The bottom layer: families fill these in, operators and the planner read them; nothing here knows a family or
an operator.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionCaps:
    """What an attention site can give an operator's core.

    - `keys`: whether the site's output needs attention over keys to carry information between token sets
      (True wherever the text reaches the image tokens only through the keys, as in FLUX's joint attention);
      an operator without keys (`gated_conv`) is refused there
    - `grid_dims`: the dimensions of the token grid the site's calls carry (2: images, 3: video); None: no grid
    - `text`: how text takes part: "none" (self-attention over the grid tokens), "prefix" (T text tokens in front
      of the grid tokens in one joint sequence), "cross" (the keys are the text context)
    """

    keys: bool = False
    grid_dims: int | None = 2
    text: Literal["none", "prefix", "cross"] = "none"


class TokenGrid:
    """The grid shape of the current forward's tokens ((h, w) or (frames, h, w)) and the text length beside them.

    A family's forward pre-hook keeps it up to date; every site of a model shares it, so operators (and their
    caches) see the grid of the call they are in.
    """

    def __init__(self, shape: tuple[int, ...] | None = None, text: int | None = None) -> None:
        self.shape = tuple(shape) if shape is not None else None
        self.text = text
        self.cache: dict[tuple, Any] = {}  # per-shape data operators share across layers (masks)

    @property
    def hw(self) -> tuple[int, ...] | None:
        """The grid shape (the 2-D name kept for images)."""
        return self.shape

    @hw.setter
    def hw(self, shape: tuple[int, ...] | None) -> None:
        self.shape = tuple(shape) if shape is not None else None

    def resolve(self, n: int) -> tuple[int, ...]:
        """Grid for a sequence of n grid tokens: the recorded one, else a square one."""
        if self.shape is not None and math.prod(self.shape) == n:
            return self.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer a token grid for {n} tokens (no grid recorded, not square)")
        return side, side

    def find(self, n: int) -> tuple[int, ...] | None:
        """`resolve`, or None where there is no grid of n tokens."""
        try:
            return self.resolve(n)
        except ValueError:
            return None


@dataclass
class Site:
    """One place in a model where an operator can go: an attention module or an MLP.

    `group` names the family's block group (DiT: blocks; PixArt: self, cross; FLUX: double, single). An attention
    site carries the family's `adapter` for its calling convention (what it can give a core: `adapter.caps`);
    `grid_dims` says what grid an MLP operator that mixes tokens on it (a conv) meets.
    """

    path: str  # module path, e.g. "transformer_blocks.3.attn1"
    kind: Literal["attention", "mlp"]
    layer: int
    dim: int  # model width at this site
    heads: int | None = None  # teacher's attention heads (attention sites)
    grid: TokenGrid = field(default_factory=TokenGrid, repr=False)
    group: str = "blocks"
    # a dit_graft.model.attention.AttentionAdapter (typed Any: attention.py imports this module)
    adapter: Any = field(default=None, repr=False)
    grid_dims: int | None = 2  # the token grid's dimensions at this site (2: images, 3: video; None: no grid)

    @property
    def attention(self) -> AttentionCaps | None:
        """What this attention site can give a core (None for MLP sites)."""
        return None if self.adapter is None else self.adapter.caps

    def call_tokens(self, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """(N, T) of one call of this site's module, as its forward pre-hook sees it; None: unknown."""
        return None if self.adapter is None else self.adapter.call_tokens(args, kwargs)


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


def block_paths(block: nn.Module, path: str) -> list[str]:
    """The paths of the diffusers blocks in `block`: itself, or the branches of a parallel_blocks pair."""
    branches = getattr(block, "branches", None)
    if not isinstance(branches, nn.ModuleList):
        return [path]
    return [p for j, b in enumerate(branches) for p in block_paths(b, f"{path}.branches.{j}")]
