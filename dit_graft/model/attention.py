"""Attention = a family-side adapter + an operator-side core, joined by one processor class.

- `AttentionAdapter` (family side, one per calling convention): from the arguments diffusers passes an
  attention processor, produces q, k, v as [B, H, N, d] after the family's norms and RoPE, with the
  `TokenLayout` of the call; and writes the core's output back (output projection, text/image split, ...).
- `AttentionCore` (operator side, one per operator, family-agnostic): attention on [B, H, N, d] given the
  layout; holds the operator's own parameters (a depthwise conv, SLA's proj_l, ...).
- `GraftedAttnProcessor`: THE processor class installed on every family's attention modules; the core is a
  registered submodule, so its weights save under `<attention>.processor.core.*`.

Operators declare what they need (`AttentionNeeds`), sites what they can give (`AttentionCaps`);
`AttentionNeeds.refusal` is the one rule between them, applied at plan time.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dit_graft.model.layout import TokenLayout
from dit_graft.model.site import AttentionCaps, TokenGrid

TEXT_ARRANGEMENTS = ("none", "prefix", "cross")


@dataclass(frozen=True)
class AttentionNeeds:
    """What an attention operator's core needs from a site.

    - `grid_dims`: the grid dimensions it works on (2, 3 or both); empty: it needs no grid (sequence operators)
    - `text`: the text arrangements it handles ("none", "prefix": CLEAR's rule on a joint sequence, "cross")
    - `keys`: False for an operator with no keys (a token mixer): refused where text reaches the grid tokens
      only through the keys (`AttentionCaps.keys`)
    """

    grid_dims: tuple[int, ...] = ()
    text: tuple[str, ...] = TEXT_ARRANGEMENTS
    keys: bool = True

    def refusal(self, caps: AttentionCaps | None) -> str | None:
        """Why a site with `caps` cannot give this operator what it needs; None when it can."""
        if caps is None:
            return "the site is not an attention site"
        if not self.keys and caps.keys:
            return (
                "it has no keys, so the image tokens would lose their only path to the text tokens (the site "
                "brings the text in through attention alone); there is no CLEAR-style form of it"
            )
        if caps.text not in self.text:
            what = {
                "prefix": "a joint text-image sequence",
                "cross": "cross-attention to the text",
                "none": "self-attention",
            }
            return f"it does not handle {what[caps.text]} (it handles: {', '.join(what[t] for t in self.text)})"
        if self.grid_dims:
            if caps.grid_dims is None:
                return "it needs a token grid, and the site's tokens have none"
            if caps.grid_dims not in self.grid_dims:
                dims = " or ".join(f"{d}-D" for d in self.grid_dims)
                return f"it works on {dims} token grids, and the site's grid is {caps.grid_dims}-D"
        return None


@dataclass
class AttnContext:
    """What an adapter's `output` needs back, plus the key mask the core applies."""

    key_mask: torch.Tensor | None = None  # (B, Nk) bool, True = the key takes part (PixArt's caption mask)
    dtype: torch.dtype = torch.float32  # the dtype the attention module's output projections take
    extra: dict[str, Any] = field(default_factory=dict)


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) → (B, H, N, C/H)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) → (B, N, H·d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def bind(args: tuple, kwargs: dict, names: tuple[str, ...]) -> dict[str, Any]:
    """The call's arguments by name: positional ones take `names` in order (as diffusers passes them)."""
    if len(args) > len(names):
        raise TypeError(f"attention processor called with {len(args)} positional arguments, expected ≤ {len(names)}")
    out = dict(zip(names, args, strict=False))
    for k, v in kwargs.items():
        if k in out:
            raise TypeError(f"attention processor got {k!r} twice")
        out[k] = v
    return out


class AttentionAdapter(abc.ABC):
    """One family's attention calling convention: q, k, v and the layout in, the module's output out.

    `grid` is the model's TokenGrid (shared by every site, updated per forward). `caps` says what the convention
    can give a core.
    """

    caps: AttentionCaps = AttentionCaps()

    def __init__(self, grid: TokenGrid) -> None:
        self.grid = grid

    def check(self, attn: nn.Module, op: str) -> None:  # noqa: B027 - optional hook
        """Refuses module features the adapter does not reproduce (ValueError), before anything is swapped."""

    @abc.abstractmethod
    def qkv(
        self, attn: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout, AttnContext]:
        """q, k, v ([B, H, N, d]) after the family's norms and RoPE, the call's TokenLayout, and a context."""

    @abc.abstractmethod
    def output(self, attn: nn.Module, o: torch.Tensor, ctx: AttnContext) -> Any:
        """The core's output o ([B, H, Nq, d]) → what the attention module returns."""

    def call_tokens(self, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """(N grid tokens, T text tokens in the same sequence) of one call, for FLOP formulas; None: no formula
        describes the call (cross-attention, a mask, unknown text length)."""
        return None

    def layout(self, n: int, text: int = 0, context: int | None = None) -> TokenLayout:
        """The layout of n grid tokens on the model's recorded grid (unknown grid: a square one, or none)."""
        return TokenLayout(text=text, grid=self.grid.find(n), context=context, tokens=n)


class AttentionCore(nn.Module, abc.ABC):
    """An operator's attention on [B, H, N, d]: family-agnostic; `op` and `options` say which operator built it.

    q/k/v have the teacher's heads; a core that regroups heads does it itself. `key_mask` (B, Nk) bool, when
    given, marks the keys that take part.
    """

    op: str = "?"

    def __init__(self, options: Any = None) -> None:
        super().__init__()
        self.options = options

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, H, Nq, d] attention outputs."""


class GraftedAttnProcessor(nn.Module):
    """The one processor class installed on every family's attention modules: adapter + core."""

    def __init__(self, adapter: AttentionAdapter, core: AttentionCore) -> None:
        super().__init__()
        self.adapter = adapter
        self.core = core

    @property
    def grid(self) -> TokenGrid:
        return self.adapter.grid

    def forward(self, attn: nn.Module, *args, **kwargs):
        q, k, v, layout, ctx = self.adapter.qkv(attn, args, kwargs)
        o = self.core(q, k, v, layout, ctx.key_mask)
        return self.adapter.output(attn, o, ctx)

    def extra_repr(self) -> str:
        return f"adapter={type(self.adapter).__name__}, op={self.core.op}"
