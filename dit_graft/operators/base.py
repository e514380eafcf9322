"""The operator registry: what an operator is and how the walker installs what it builds.

Also the helpers that several operators share (self-attention plumbing, the masked-softmax processor,
the token-grid and sequence-band geometry of `local` and `swa`, identity-initialised depthwise convs, FFN
inheritance and unit importance), so that no operator module imports another: `local`, `swa` and FLUX's
joint processors (`text_attention`) read the same window rules from here.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
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

    def call_tokens(self, hidden_states, encoder_hidden_states, attention_mask) -> tuple[int, int] | None:
        """(N, T) of one attention call at a site on this grid: N image tokens, T text tokens in the same sequence.

        Plain self-attention on (B, N, C) tokens is (N, 0); a call with a context (cross-attention) or a mask is
        None: no FLOP formula describes it. Grids of joint text-image sequences (FLUX) override this.
        """
        if hidden_states.ndim != 3 or encoder_hidden_states is not None or attention_mask is not None:
            return None
        return hidden_states.shape[1], 0


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
    its to_q/to_k/to_v/to_out stay and are inherited for free), as a replacement module, or, for
    `structure` edits (site `depth`), not through `build` at all: the operator's `structure` hooks
    resolve the edit to data and change the block list (see `dit_graft.operators.depth`).

    `flops(site, tokens, options) -> int`, when given, is the attention core's forward FLOPs for one
    image of `tokens` tokens at `site`, as the operator's kernel does the work (a masked or sparse
    operator counts only the kept query-key pairs). Conventions, those of torch's FlopCounterMode so
    that the two add up: 2 FLOPs per multiply-add, matmuls and convolutions only (no softmax, no
    elementwise products, no bias adds); the Attention's q/k/v/out projections are excluded (no
    processor changes them; FlopCounterMode measures them), the operator's own layers included.

    These formulas are dit-graft's one FLOP-correction mechanism (`attention_core_flops`): a cost
    report measures a model with FlopCounterMode and replaces each attention site's core by its
    formula. Formulas were kept over corrections that processors accumulate while running (the other
    mechanism there was): they are pure functions of shapes and options, so they also serve where
    nothing runs (`dit-graft operators`, the benchmarks' ratios), they are tested against
    FlopCounterMode on the dense PyTorch paths, and a processor's forward keeps no counting state.
    FLUX's joint processors compose theirs from these (`text_attention.clear_flops`).
    """

    name: str
    site: Literal["attention", "mlp", "depth"]
    summary: str
    options: type[Options]
    build: Any  # Callable[[nn.Module, Site, Options], nn.Module | None]
    installs: Literal["processor", "module", "structure"] = "processor"
    paper: str = ""
    flops: Any = None  # Callable[[Site, int, Options], int] | None
    structure: Any = None  # depth operators: a dit_graft.operators.depth.Restructure (plan, check, apply, ...)

    def parse_options(self, raw: dict[str, Any]) -> Options:
        return self.options.model_validate(raw)


OPERATORS: Registry[Operator] = Registry("operator")


def register(op: Operator) -> Operator:
    """Registers an operator under its name; what its builder returns is tagged with (name, options).

    The tag (`installed_operator`) lets cost reports find the operator and its options on a grafted
    model without the plan.
    """
    build = op.build

    def tagged_build(old: nn.Module, site: Site, options: Options):
        new = build(old, site, options)
        if new is not None:
            new._dit_graft_operator = (op.name, options)
        return new

    return OPERATORS.register(op.name)(replace(op, build=tagged_build))


def installed_operator(module: Any) -> tuple[Operator, Options] | None:
    """The operator and options that built `module` (a processor or a replacement module), if one did."""
    tag = getattr(module, "_dit_graft_operator", None)
    if tag is None:
        return None
    return OPERATORS.get(tag[0]), tag[1]


# diffusers' own processors: the teacher's softmax attention (FLUX's over the joint text-image sequence)
STOCK_SOFTMAX_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "FluxAttnProcessor", "FluxAttnProcessor2_0")


def attention_core_flops(processor: Any, site: Site, tokens: int, text: int = 0) -> int | None:
    """The attention core's FLOPs of one call with `tokens` image and `text` text tokens, by formula; None: no formula.

    The processor's own `core_flops(site, tokens, text)` (FLUX's joint processors), else the formula of the
    operator that built it (`Operator.flops`, self-attention only), else softmax's for diffusers' own processors
    over the whole sequence. Where this is None, a cost report keeps FlopCounterMode's measurement.
    """
    own = getattr(processor, "core_flops", None)
    if callable(own):
        return own(site, tokens, text)
    if type(processor).__name__ in STOCK_SOFTMAX_PROCESSORS:
        softmax = OPERATORS.get("softmax")
        return softmax.flops(site, tokens + text, softmax.parse_options({}))
    found = installed_operator(processor)
    if found is None or found[0].flops is None or text:
        return None
    op, options = found
    return op.flops(site, tokens, options)


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


def self_attention_qkv(
    attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states, attention_mask, op: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, d) from the Attention's own projections and norm_q/norm_k; refuses context and masks."""
    if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
        raise ValueError(f"the {op} operator replaces self-attention on (B, N, C) tokens only (no context)")
    q = to_heads(attn.to_q(hidden_states), attn.heads)  # (B, H, N, d)
    k = to_heads(attn.to_k(hidden_states), attn.heads)
    v = to_heads(attn.to_v(hidden_states), attn.heads)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def attention_output(attn: nn.Module, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The Attention's output projection and dropout applied to per-head outputs o (B, H, N, d) → (B, N, C)."""
    o = attn.to_out[0](from_heads(o).to(dtype))  # (B, N, C)
    return attn.to_out[1](o)


class MaskedSoftmaxProcessor(nn.Module, abc.ABC):
    """Exact softmax self-attention with the Attention's projections and a boolean mask from `mask(n, device)`.

    Subclasses define `mask`; masks are cached per key; `None` means no mask (every key visible).
    """

    op = "masked softmax"

    def __init__(self) -> None:
        super().__init__()
        self._masks: dict[tuple, torch.Tensor | None] = {}

    @abc.abstractmethod
    def mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        """The (n, n) boolean mask of visible keys for n tokens, or None when every key is visible."""

    def cached(self, key: tuple, build) -> torch.Tensor | None:
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q, k, v = self_attention_qkv(attn, hidden_states, encoder_hidden_states, attention_mask, self.op)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(q.shape[2], q.device))  # (B, H, N, d)
        return attention_output(attn, o, q.dtype)


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
