"""The operator registry: what an operator is, how the walker builds what it installs, and shared helpers.

An attention operator is a core (`dit_graft.model.attention.AttentionCore`) computing attention on
[B, H, N, d] given the call's `TokenLayout`; the walker puts it in a `GraftedAttnProcessor` with the family's
adapter for the site (`build_replacement`). The operator declares what it needs (`Operator.needs`: a grid and
its dimensions, keys, the text arrangements it handles) and what options a site cannot take (`Operator.check`);
`refusal` applies both at plan time, so an operator is refused with its reason before anything is built.

Also the helpers that several operators share (the token-grid and sequence-band geometry of `local` and
`swa`, masked softmax, identity-initialised depthwise convs, FFN inheritance and unit importance), so that no
operator module imports another.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from pydantic import BaseModel, ConfigDict
from torch import nn

from dit_graft.model.attention import AttentionCore, AttentionNeeds, GraftedAttnProcessor
from dit_graft.model.layout import TokenLayout
from dit_graft.model.site import Site, TokenGrid
from dit_graft.registry import Registry

__all__ = ["Site", "TokenGrid"]  # re-exported from dit_graft.model for older imports; the rest is public too


class Options(BaseModel):
    """Base class of operator options: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Case:
    """A contract-test case an operator declares: options to run it with, and whether they equal the teacher.

    `exact`: at these options the operator computes the teacher's attention (full coverage: a window over the
    whole grid, every block kept), so the contract suite checks the student against the teacher. `only` names
    the families ("flux") or family block groups ("flux/single") a case is for (empty: everywhere).
    """

    options: dict[str, Any] = field(default_factory=dict)
    exact: bool = False
    only: tuple[str, ...] = ()

    def applies(self, family: str, group: str) -> bool:
        return not self.only or family in self.only or f"{family}/{group}" in self.only


class UnsupportedOperator(ValueError):
    """An operator a site cannot take; the message says why."""


@dataclass(frozen=True)
class Operator:
    """An operator and how the walker builds what it installs.

    - attention operators (`site: attention`, `installs: processor`): `core(site, options)` returns the
      `AttentionCore`; the walker joins it with the family's adapter in a `GraftedAttnProcessor`. `core` None:
      the site's stock processor (the `softmax` operator). `needs` (an `AttentionNeeds`) is checked against the
      site's `AttentionCaps` at plan time; `check(site, options)` raises ValueError for options the site cannot
      take (e.g. a conv over the keys of cross-attention)
    - MLP operators (`installs: module`): `build(old_module, site, options)` returns the replacement module
    - depth operators (`installs: structure`, site `depth`): the `structure` hooks resolve the edit to data and
      change the block list (see `dit_graft.operators.depth`)

    `flops(site, tokens, options) -> int`, when given, is the attention core's forward FLOPs for one
    image of `tokens` tokens at `site`, as the operator's kernel does the work (a masked or sparse
    operator counts only the kept query-key pairs). Conventions, those of torch's FlopCounterMode so
    that the two add up: 2 FLOPs per multiply-add, matmuls and convolutions only (no softmax, no
    elementwise products, no bias adds); the Attention's q/k/v/out projections are excluded (no
    processor changes them; FlopCounterMode measures them), the operator's own layers included.
    With a text prefix (`layout_flops`), the text rows and text keys add softmax's pairs (CLEAR's rule) unless
    the operator gives its own `prefix_flops(site, layout, options)`.

    These formulas are dit-graft's one FLOP-correction mechanism (`attention_core_flops`): a cost
    report measures a model with FlopCounterMode and replaces each attention site's core by its
    formula. They are pure functions of shapes and options, so they also serve where nothing runs
    (`dit-graft operators`, the benchmarks' ratios), and they are tested against FlopCounterMode on
    the dense PyTorch paths.

    `cases` are the operator's contract-test cases (`Case`): the suite in tests/test_contract.py runs each one
    on every family's tiny model where the operator is accepted.
    """

    name: str
    site: Literal["attention", "mlp", "depth"]
    summary: str
    options: type[Options]
    build: Any = None  # Callable[[nn.Module, Site, Options], nn.Module] (MLP operators)
    installs: Literal["processor", "module", "structure"] = "processor"
    paper: str = ""
    flops: Any = None  # Callable[[Site, int, Options], int] | None
    structure: Any = None  # depth operators: a dit_graft.operators.depth.Restructure (plan, check, apply, ...)
    core: Any = None  # attention operators: Callable[[Site, Options], AttentionCore]; None: the stock processor
    needs: AttentionNeeds = AttentionNeeds()
    check: Any = None  # Callable[[Site, Options], None]: ValueError for options this site cannot take
    prefix_flops: Any = None  # Callable[[Site, TokenLayout, Options], int]: FLOPs with a text prefix
    cases: tuple[Case, ...] = (Case(),)

    def parse_options(self, raw: dict[str, Any]) -> Options:
        return self.options.model_validate(raw)


OPERATORS: Registry[Operator] = Registry("operator")


def register(op: Operator) -> Operator:
    """Registers an operator under its name."""
    if op.site == "attention" and op.installs == "processor" and op.build is not None:
        raise ValueError(f"attention operator {op.name!r}: give a core, not a build function")
    return OPERATORS.register(op.name)(op)


def tag(module: Any, op: Operator, options: Options) -> Any:
    """Tags what an operator built with (name, options): cost reports find the operator on a grafted model."""
    if module is not None:
        module._dit_graft_operator = (op.name, options)
    return module


def installed_operator(module: Any) -> tuple[Operator, Options] | None:
    """The operator and options that built `module` (a processor or a replacement module), if one did."""
    tagged = getattr(module, "_dit_graft_operator", None)
    if tagged is None:
        return None
    return OPERATORS.get(tagged[0]), tagged[1]


def refusal(op: Operator, site: Site, options: Options | None = None) -> str | None:
    """Why `site` cannot take `op` (with `options`); None when it can. The one plan-time rule."""
    if op.site != site.kind:
        return f"it is a {op.site} operator"
    if op.site == "attention" and op.installs == "processor":
        if site.adapter is None:
            return "the site has no attention adapter"
        reason = op.needs.refusal(site.attention)
        if reason is not None:
            return reason
    elif op.needs.grid_dims and site.grid_dims not in op.needs.grid_dims:
        dims = " or ".join(f"{d}-D" for d in op.needs.grid_dims)
        return f"it works on {dims} token grids, and the site's grid is {site.grid_dims or 'no'}-D"
    if op.check is not None and options is not None:
        try:
            op.check(site, options)
        except ValueError as e:
            return str(e)
    return None


def accepted(site: Site) -> list[str]:
    """The operators whose needs the site meets (some options may still be refused there)."""
    return [
        name
        for name, op in OPERATORS.items()
        if op.site == site.kind and op.installs != "structure" and refusal(op, site) is None
    ]


def build_replacement(op: Operator, family: Any, site: Site, old: nn.Module, options: Options) -> Any:
    """What `op` installs at `site` (a processor, or a module); ValueError (UnsupportedOperator) saying why not."""
    reason = refusal(op, site, options)
    if reason is not None:
        raise UnsupportedOperator(reason)
    if op.site == "attention" and op.installs == "processor":
        if op.core is None:
            return tag(family.stock_processor(site), op, options)
        site.adapter.check(old, op.name)
        return tag(GraftedAttnProcessor(site.adapter, op.core(site, options)), op, options)
    return tag(op.build(old, site, options), op, options)


# diffusers' own processors: the teacher's softmax attention (FLUX's over the joint text-image sequence)
STOCK_SOFTMAX_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "FluxAttnProcessor", "FluxAttnProcessor2_0")


def layout_flops(op: Operator, site: Site, layout: TokenLayout, options: Options) -> int | None:
    """The core's FLOPs of one call with this layout: the operator's formula, CLEAR's composition with text.

    Without text: `op.flops` on the N grid tokens. With a text prefix of T tokens (L = T + N): the operator's
    `prefix_flops`, else the text rows over all L keys + the image rows over the T text keys (softmax pairs) +
    `op.flops` on the N image tokens (softmax's 4·N²·C makes the total 4·L²·C). Cross-attention: None.
    """
    if op.flops is None or layout.is_cross:
        return None
    n, t = layout.image, layout.text
    if t == 0:
        return op.flops(site, n, options)
    if op.prefix_flops is not None:
        return op.prefix_flops(site, layout, options)
    return attention_pairs_flops(t * (t + n) + n * t, site.dim) + op.flops(site, n, options)


def attention_core_flops(processor: Any, site: Site, tokens: int, text: int = 0) -> int | None:
    """The attention core's FLOPs of one call with `tokens` image and `text` text tokens, by formula; None: no formula.

    The formula of the operator that built the processor (`layout_flops`), else softmax's for diffusers' own
    processors over the whole sequence. Where this is None, a cost report keeps FlopCounterMode's measurement.
    """
    found = installed_operator(processor)
    if found is None and type(processor).__name__ in STOCK_SOFTMAX_PROCESSORS:
        found = OPERATORS.get("softmax"), OPERATORS.get("softmax").parse_options({})
    if found is None:
        return None
    op, options = found
    layout = TokenLayout(text=text, grid=site.grid.find(tokens), tokens=tokens)
    return layout_flops(op, site, layout, options)


def key_bias(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """An SDPA boolean mask (B, 1, 1, Nk) from a (B, Nk) key mask; None stays None."""
    return None if key_mask is None else key_mask[:, None, None, :]


class MaskedCore(AttentionCore, abc.ABC):
    """Exact softmax with a boolean mask over the image pairs (`image_mask(layout, device)`), CLEAR's rule with text.

    Masks are cached per key (layout, device); `image_mask` returning None means every image key is visible.
    """

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._masks: dict[tuple, torch.Tensor | None] = {}

    @abc.abstractmethod
    def image_mask(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        """The (N, N) boolean mask of the image keys each image query sees; None when it sees them all."""

    def mask_key(self, layout: TokenLayout) -> tuple:
        return (layout.text, layout.grid, layout.image)

    def mask(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        key = (*self.mask_key(layout), device)
        if key not in self._masks:
            self._masks[key] = layout.pair_mask(self.image_mask(layout, device))
        return self._masks[key]

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        if layout.is_cross:
            raise ValueError(f"the {self.op} operator does not take cross-attention")
        mask = self.mask(layout, q.device)
        if key_mask is not None:
            mask = key_bias(key_mask) if mask is None else mask & key_bias(key_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def new_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters a built processor/module adds (all of them: builders add only new ones)."""
    return [n for n, _ in module.named_parameters()]


def band_pairs(n: int, reach: int) -> int:
    """Pairs (i, j) of positions in range(n) with |i − j| ≤ reach: Σ_{|δ| ≤ m} (n − |δ|), m = min(reach, n − 1)."""
    m = min(reach, n - 1)
    return (2 * m + 1) * n - m * (m + 1)


def band_mask(n: int, half: int, device: torch.device) -> torch.Tensor:
    """(N, N) boolean mask, True where |i − j| ≤ half."""
    idx = torch.arange(n, device=device, dtype=torch.int32)
    return (idx[:, None] - idx[None, :]).abs() <= half


def grid_window_mask(h: int, w: int, radius: float, shape: str, device: torch.device) -> torch.Tensor:
    """(N, N) boolean mask, True where key j lies in query i's window on the h×w grid (N = h·w).

    circle: Δy² + Δx² < r² (strict); square: max(|Δy|, |Δx|) ≤ ⌊r⌋; positions row-major, (n // w, n % w).
    """
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


def grid_window_pairs(h: int, w: int, radius: float, shape: str) -> int:
    """Query-key pairs inside the windows on the h×w grid: the number of True entries of `grid_window_mask`."""
    if shape == "square":
        reach = math.floor(radius)
        return band_pairs(h, reach) * band_pairs(w, reach)
    r2 = math.ceil(radius * radius)
    pairs = 0
    for dy in range(-(h - 1), h):
        room = r2 - dy * dy  # dx² < room
        if room > 0:
            pairs += (h - abs(dy)) * band_pairs(w, math.isqrt(room - 1))
    return pairs


def attention_pairs_flops(pairs: int, channels: int) -> int:
    """Softmax-attention core FLOPs over `pairs` query-key pairs: q·k and p·v, one multiply-add per channel each."""
    return 4 * pairs * channels


def block_share(name: str, value: int | float, zero_ok: bool = False) -> int | float:
    """Validates a per-query-block share of key blocks: a block count (int) or a fraction (float), never a bool.

    Counts must be ≥ 1 and fractions in (0, 1]; with `zero_ok` (a share that may be empty), ≥ 0 and [0, 1).
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a fraction or a block count, not a bool")
    low, interval = (0, "[0, 1)") if zero_ok else (1, "(0, 1]")
    if isinstance(value, int) and value < low:
        raise ValueError(f"{name} as a block count must be ≥ {low} (got {value})")
    if isinstance(value, float) and not (0.0 <= value < 1.0 if zero_ok else 0.0 < value <= 1.0):
        raise ValueError(f"{name} as a fraction must be in {interval} (got {value}); write an int for a block count")
    return value


def identity_depthwise(conv: nn.Conv2d) -> nn.Conv2d:
    """Sets a depthwise conv to the identity: centre tap 1, others 0, bias 0."""
    k = conv.kernel_size[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, k // 2, k // 2] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


@dataclass
class FeedForwardLayout:
    """The parts of a diffusers FeedForward (GELU activation) that a replacement inherits."""

    fc1: nn.Linear
    fc2: nn.Linear
    approximate: str
    dropout: float
    final_dropout: bool


def read_feedforward(old: nn.Module, site: Site, op: str) -> FeedForwardLayout:
    """The teacher FFN's layers, or a ValueError naming what this operator cannot inherit."""
    if not isinstance(old, FeedForward) or not isinstance(old.net[0], GELU):
        act = type(old.net[0]).__name__ if isinstance(old, FeedForward) else None
        raise ValueError(f"{op} needs a diffusers FeedForward with a GELU activation (got {type(old).__name__}, {act})")
    fc1, fc2 = old.net[0].proj, old.net[2]
    if fc1.in_features != site.dim:
        raise ValueError(f"{op}: the FFN's input width {fc1.in_features} is not the model width {site.dim}")
    return FeedForwardLayout(fc1, fc2, old.net[0].approximate, old.net[1].p, len(old.net) == 4)


def magnitude_importance(ffn: FeedForwardLayout) -> torch.Tensor:
    """s_i = ‖W₁[i, :]‖ · ‖W₂[:, i]‖, one score per hidden unit (`mlp_ratio`, `prune_width`, `moe`)."""
    return ffn.fc1.weight.detach().float().norm(dim=1) * ffn.fc2.weight.detach().float().norm(dim=0)


def inherit(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copies a teacher tensor into a student tensor of the same shape."""
    if dst.shape != src.shape:
        raise ValueError(f"cannot inherit {name}: student shape {tuple(dst.shape)} != teacher {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def prefix_block_sparse(q, k, v, layout: TokenLayout, image_blocks: torch.Tensor, block: int, attend, scores: int):
    """Block-sparse softmax (B, H, L, d) with CLEAR's rule: text rows over every key, image rows over the text keys
    and the image key blocks `image_blocks` keeps ((B, H, nb, nb) bool, the first block at the first image token).

    `attend(q, k, v, index, block)` is the block-sparse kernel. When the text fills whole blocks, one block map
    covers the joint sequence (`TokenLayout.block_map`); otherwise text and image tokens would share a block and
    the sparse part runs as one SDPA with the equivalent token mask (`TokenLayout.pair_mask`): same result, dense
    work. Off CUDA a few heads at a time (at most `scores` scores per call).
    """
    b, heads, length, _ = q.shape
    n = layout.image
    step = heads if q.is_cuda else max(1, scores // (b * length * length))
    index = layout.block_map(image_blocks, block)
    parts = []
    for s in range(0, heads, step):
        sl = slice(s, s + step)
        if index is not None:
            parts.append(attend(q[:, sl], k[:, sl], v[:, sl], index[:, sl], block))
        else:
            kept = image_blocks[:, sl].repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :n]
            parts.append(F.scaled_dot_product_attention(q[:, sl], k[:, sl], v[:, sl], layout.pair_mask(kept)))
    return torch.cat(parts, dim=1)


def describe_needs(op: Operator) -> str:
    """What an operator needs from a site, in a few words (`dit-graft operators`)."""
    needs = op.needs
    parts = []
    if needs.grid_dims:
        parts.append(" or ".join(f"{d}-D" for d in needs.grid_dims) + " grid")
    if op.site == "attention":
        names = {"none": "self", "prefix": "joint text prefix", "cross": "cross"}
        parts.append(", ".join(names[t] for t in needs.text))
        if not needs.keys:
            parts.append("no keys")
    return "; ".join(parts) or "-"
