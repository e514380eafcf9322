"""The operator registry: what an operator is and how the walker installs what it builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from dit_graft.registry import Registry


class Options(BaseModel):
    """Base class of operator options: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class TokenGrid:
    """The (height, width) of the current token grid, set by a hook on the model's forward."""

    def __init__(self, hw: tuple[int, int] | None = None) -> None:
        self.hw = hw

    def resolve(self, n: int) -> tuple[int, int]:
        """Grid for a sequence of n tokens: the recorded one, else a square one."""
        if self.hw is not None and self.hw[0] * self.hw[1] == n:
            return self.hw
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"cannot infer a token grid for {n} tokens (no grid recorded, not square)")
        return side, side


@dataclass
class Site:
    """One place in a model where an operator can go: an attention module or an MLP."""

    path: str  # module path, e.g. "transformer_blocks.3.attn1"
    kind: Literal["attention", "mlp"]
    layer: int
    dim: int  # model width at this site
    heads: int | None = None  # teacher's attention heads (attention sites)
    grid: TokenGrid = field(default_factory=TokenGrid, repr=False)


@dataclass(frozen=True)
class Operator:
    """An operator: `build(old_module, site, options)` returns the module that replaces `old_module`.

    `installs` says how the walker puts it in: as the attention module's processor (the Attention and
    its to_q/to_k/to_v/to_out stay and are inherited for free) or as a replacement module.
    """

    name: str
    site: Literal["attention", "mlp"]
    summary: str
    options: type[Options]
    build: Any  # Callable[[nn.Module, Site, Options], nn.Module | None]
    installs: Literal["processor", "module"] = "processor"
    paper: str = ""

    def parse_options(self, raw: dict[str, Any]) -> Options:
        return self.options.model_validate(raw)


OPERATORS: Registry[Operator] = Registry("operator")


def register(op: Operator) -> Operator:
    """Registers an operator under its name."""
    return OPERATORS.register(op.name)(op)


def new_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters a built processor/module adds (all of them: builders add only new ones)."""
    return [n for n, _ in module.named_parameters()]


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) → (B, H, N, C/H)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) → (B, N, H·d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)
