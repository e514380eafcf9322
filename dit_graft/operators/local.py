"""`local`: CLEAR's conv-like local attention (Liu et al. 2024).

Each query attends, with exact softmax, only to the keys near it on the 2D token grid:

    o_i = Σ_{j ∈ W(i)} softmax_j(q_i·k_j / √d) v_j

Token n sits at p_n = (n // w, n % w) on the h×w grid (row-major, as diffusers' PatchEmbed flattens
it). With (Δy, Δx) = p_i − p_j and the radius r = `window` (a float, in tokens):

    shape: circle   j ∈ W(i)  ⇔  Δy² + Δx² < r²          (CLEAR's circular window, strict)
    shape: square   j ∈ W(i)  ⇔  max(|Δy|, |Δx|) ≤ r     (a (2⌊r⌋+1)² box)

Borders are not padded: a query near an edge has fewer keys. A token always sees itself (r > 0), so
no row is empty. r² is taken in float64, so e.g. r = √2 (r² = 2.0000000000000004) includes the
diagonal neighbours. The PyTorch path builds the boolean (N, N) mask once per (h, w, device) and
runs `F.scaled_dot_product_attention` with it: exact, but still O(N²) work (the saving needs a
sparse kernel). A window that covers the whole grid passes no mask: it is softmax attention.

Inheritance: the processor uses the Attention's own to_q/to_k/to_v/to_out (and norm_q/norm_k when
present), so every teacher weight is kept; it adds no parameters.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dit_graft.operators.base import Operator, Options, Site, TokenGrid, from_heads, register, to_heads


class LocalOptions(Options):
    """Options of the `local` operator."""

    window: float = Field(default=8.0, gt=0, description="radius r on the token grid, in tokens")
    shape: Literal["circle", "square"] = "circle"


def check_self_attention(attn: nn.Module, op: str) -> None:
    """Refuses Attention features the grafted processors do not reproduce, before anything is swapped."""
    unsupported = {
        "cross-attention": getattr(attn, "is_cross_attention", False),
        "spatial_norm": getattr(attn, "spatial_norm", None) is not None,
        "group_norm": getattr(attn, "group_norm", None) is not None,
        "residual_connection": getattr(attn, "residual_connection", False),
        "rescale_output_factor": getattr(attn, "rescale_output_factor", 1.0) != 1.0,
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise ValueError(f"the {op} operator replaces plain self-attention only (this one has {', '.join(found)})")


def grid_window_mask(h: int, w: int, radius: float, shape: str, device: torch.device) -> torch.Tensor:
    """(N, N) boolean mask, True where key j lies in query i's window on the h×w grid (N = h·w)."""
    ys = torch.arange(h, device=device, dtype=torch.int32)
    xs = torch.arange(w, device=device, dtype=torch.int32)
    dy = (ys[:, None] - ys[None, :]).view(h, 1, h, 1)  # (h_i, 1, h_j, 1)
    dx = (xs[:, None] - xs[None, :]).view(1, w, 1, w)  # (1, w_i, 1, w_j)
    if shape == "circle":
        # dist² is an integer, so dist² < r² ⇔ dist² < ⌈r²⌉
        mask = dy * dy + dx * dx < math.ceil(radius * radius)
    else:
        reach = math.floor(radius)
        mask = (dy.abs() <= reach) & (dx.abs() <= reach)
    return mask.reshape(h * w, h * w)


def grid_window_is_full(h: int, w: int, radius: float, shape: str) -> bool:
    """Whether every query's window holds every key (the farthest pair is the two opposite corners)."""
    if shape == "circle":
        return (h - 1) ** 2 + (w - 1) ** 2 < math.ceil(radius * radius)
    return max(h, w) - 1 <= math.floor(radius)


class MaskedSoftmaxProcessor(nn.Module):
    """Exact softmax self-attention with the Attention's projections and a boolean mask from `mask(n, device)`.

    Masks are cached per key; `None` means no mask (every key visible).
    """

    op = "masked softmax"

    def __init__(self) -> None:
        super().__init__()
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        raise NotImplementedError

    def cached(self, key: tuple, build) -> torch.Tensor | None:
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError(f"the {self.op} operator replaces self-attention on (B, N, C) tokens only (no context)")
        n = hidden_states.shape[1]
        q = to_heads(attn.to_q(hidden_states), attn.heads)  # (B, H, N, d)
        k = to_heads(attn.to_k(hidden_states), attn.heads)
        v = to_heads(attn.to_v(hidden_states), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(n, q.device))  # (B, H, N, d)
        o = attn.to_out[0](from_heads(o).to(q.dtype))  # (B, N, C)
        return attn.to_out[1](o)


class LocalAttnProcessor(MaskedSoftmaxProcessor):
    """CLEAR local attention: softmax over the keys within a radius on the 2D token grid."""

    op = "local"

    def __init__(self, options: LocalOptions, grid: TokenGrid) -> None:
        super().__init__()
        self.radius = options.window
        self.shape = options.shape
        self.grid = grid

    def mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        h, w = self.grid.resolve(n)
        if grid_window_is_full(h, w, self.radius, self.shape):
            return None
        return self.cached((h, w, device), lambda: grid_window_mask(h, w, self.radius, self.shape, device))


def build_local(old: nn.Module, site: Site, options: LocalOptions) -> LocalAttnProcessor:
    check_self_attention(old, "local")
    return LocalAttnProcessor(options, site.grid)


register(
    Operator(
        name="local",
        site="attention",
        summary="Exact softmax over keys within radius r on the 2D token grid; inherited q/k/v/out (CLEAR).",
        options=LocalOptions,
        build=build_local,
        paper="CLEAR (Liu et al. 2024)",
    )
)
