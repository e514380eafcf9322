"""Attention processors where text tokens take part: FLUX's joint attention and PixArt's cross-attention.

FLUX attends over one joint sequence [text; image] (L = T + N tokens). In a double-stream block the
text and image tokens have their own projections (`add_q_proj`/`to_q`, ...) and output projections
(`to_add_out`/`to_out`); a single-stream block already holds the joint sequence and has no output
projection (its `proj_out` mixes attention and MLP). The processors here follow CLEAR:

- text queries attend to every key with exact softmax, as in the teacher;
- image queries attend with the operator over the image grid plus all T text keys.

RoPE: q and k get FLUX's rotary embedding (`image_rotary_emb`, text ids first) exactly as the teacher's
processor applies it (diffusers' `apply_rotary_emb` on (B, L, H, d)), after the per-head RMS norms and
before anything else, so the softmax parts see the teacher's q·k. For `linear` the feature map is
applied after RoPE: φ(R q)ᵀ φ(R k). Positions then still shape the kernel (through which channels
survive the ReLU), and the kept softmax rows need no second set of un-rotated projections.

- `softmax` (JointSoftmaxProcessor): every query over every key; the teacher's computation.
- `local` (JointLocalProcessor): image query i sees the text keys and the image keys inside its window on
  the h×w grid (the `local` operator's circle/square rule). PyTorch path: one SDPA with a boolean
  (L, L) mask, exact, dense work; `flop_correction` reports the window-only work a sparse kernel does.
- `linear` (JointLinearProcessor): image queries by linear attention over all L keys (text and image,
  LiT's ReLU or ELU + 1 feature map, `heads` regrouped from the teacher's heads after RoPE, optional
  zero-initialised depthwise conv of the image values on the grid).

Every teacher weight is inherited: the processors use the FluxAttention's own projections and norms.

PixArt's cross-attention (`attn2`, image queries over the T5 caption tokens) can take `linear`
(CrossLinearProcessor): ReLU/ELU + 1 linear attention over the caption tokens the attention mask keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from dit_graft.kernels import linear_attention
from dit_graft.operators.base import Site, TokenGrid, from_heads, to_heads
from dit_graft.operators.linear import LinearOptions
from dit_graft.operators.local import LocalOptions, grid_window_is_full, grid_window_mask, grid_window_pairs


class JointGrid(TokenGrid):
    """The image token grid plus the number of text tokens in front of it in FLUX's joint sequence."""

    def __init__(self, hw: tuple[int, int] | None = None, text: int | None = None) -> None:
        super().__init__(hw)
        self.text = text
        # joint attention masks and their kept-pair counts, shared by every layer of a model
        self.masks: dict[tuple, tuple[torch.Tensor, int]] = {}


def check_flux_attention(attn: nn.Module, op: str) -> None:
    """Refuses what the joint processors do not handle, before anything is swapped."""
    if not all(hasattr(attn, a) for a in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "head_dim")):
        raise ValueError(f"the FLUX {op} processor needs a FluxAttention (got {type(attn).__name__})")
    if getattr(attn, "fused_projections", False):
        raise ValueError(f"the FLUX {op} processor needs unfused projections (call unfuse_qkv_projections first)")


class JointAttnProcessor(nn.Module):
    """Base: the teacher's projections, norms and RoPE; text rows by softmax; image rows by `image_rows`."""

    op = "softmax"

    def __init__(self, grid: JointGrid) -> None:
        super().__init__()
        self.grid = grid
        self.flop_correction = 0  # kernel FLOPs − dense FLOPs of the PyTorch path, added up by count_flops

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError(f"the FLUX {self.op} processor takes no attention mask")
        q, k, v, text = self.joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        o = self.attend(q, k, v, text)  # (B, L, C)
        if encoder_hidden_states is None:
            return o  # single-stream block: its proj_out mixes attention and MLP
        o_text, o_image = o.split([text, o.shape[1] - text], dim=1)
        return attn.to_out[1](attn.to_out[0](o_image.contiguous())), attn.to_add_out(o_text.contiguous())

    def joint_qkv(self, attn, hidden_states, encoder_hidden_states, rotary):
        """q, k, v (B, H, L, d) of the joint [text; image] sequence, RoPE applied to q and k; and T."""
        heads = (attn.to_q.out_features // attn.head_dim, attn.head_dim)
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads))  # (B, N, H, d)
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads))
        v = attn.to_v(hidden_states).unflatten(-1, heads)
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            tq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, heads))  # (B, T, H, d)
            tk = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, heads))
            tv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads)
            q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)  # (B, L, H, d)
        else:
            text = self.text_tokens(hidden_states.shape[1])
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), text  # (B, H, L, d)

    def text_tokens(self, joint: int) -> int:
        """T for a single-stream block's joint sequence of `joint` tokens, from the model's recorded grid."""
        if self.grid.text is None:
            raise ValueError(f"the FLUX {self.op} processor needs the text length (run it inside the FLUX model)")
        return self.grid.text

    def image_grid(self, n: int) -> tuple[int, int]:
        return self.grid.resolve(n)

    def attend(self, q, k, v, text: int) -> torch.Tensor:
        """(B, H, L, d) q, k, v → (B, L, H·d) attention outputs, text rows first."""
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(q, text))
        return o.transpose(1, 2).flatten(2).to(q.dtype)

    def mask(self, q: torch.Tensor, text: int) -> torch.Tensor | None:
        return None


def _sdpa_flops(b: int, h: int, lq: int, lk: int, d: int) -> int:
    """FlopCounterMode's count for one SDPA call: q·kᵀ and p·v, 2 FLOPs per multiply-add each."""
    return 4 * b * h * lq * lk * d


class JointSoftmaxProcessor(JointAttnProcessor):
    """Exact softmax attention over the joint sequence: the teacher's computation, as an explicit operator."""


class JointLocalProcessor(JointAttnProcessor):
    """CLEAR on FLUX: image queries see the text keys and the image keys within a radius on the grid."""

    op = "local"

    def __init__(self, options: LocalOptions, grid: JointGrid) -> None:
        super().__init__(grid)
        self.radius = options.window
        self.shape = options.shape

    def mask(self, q: torch.Tensor, text: int) -> torch.Tensor | None:
        b, heads, joint, d = q.shape
        h, w = self.image_grid(joint - text)
        if grid_window_is_full(h, w, self.radius, self.shape):
            return None
        key = ("local", self.radius, self.shape, text, h, w, q.device)
        if key not in self.grid.masks:
            mask = torch.ones(joint, joint, dtype=torch.bool, device=q.device)  # text rows and text columns: all
            mask[text:, text:] = grid_window_mask(h, w, self.radius, self.shape, q.device)
            pairs = text * joint + (joint - text) * text + grid_window_pairs(h, w, self.radius, self.shape)
            self.grid.masks[key] = (mask, pairs)
        mask, pairs = self.grid.masks[key]
        self.flop_correction += 4 * b * heads * d * pairs - _sdpa_flops(b, heads, joint, joint, d)
        return mask


class JointLinearProcessor(JointAttnProcessor):
    """LiT on FLUX: image queries by linear attention over every key; text queries by softmax."""

    op = "linear"

    def __init__(self, dim: int, heads: int, options: LinearOptions, grid: JointGrid) -> None:
        super().__init__(grid)
        self.heads = heads
        self.feature_map = options.feature_map
        self.norm = options.norm
        self.eps = options.eps
        self.dwconv = None
        if options.dwconv:
            k = options.dwconv
            self.dwconv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
            nn.init.zeros_(self.dwconv.weight)
            nn.init.zeros_(self.dwconv.bias)
        self.out_scale = nn.Parameter(torch.ones(dim // heads)) if options.norm == "output_norm" else None

    def attend(self, q, k, v, text: int) -> torch.Tensor:
        b, teacher_heads, joint, d = q.shape
        o_text = F.scaled_dot_product_attention(q[:, :, :text], k, v)  # (B, H, T, d): softmax over all keys
        o_text = o_text.transpose(1, 2).flatten(2)  # (B, T, C)
        ql, kl, vl = (self._regroup(x) for x in (q, k, v))  # (B, H', L, d')
        if self.norm == "divide":
            o = linear_attention(ql, kl, vl, feature_map=self.feature_map, eps=self.eps)
        else:
            phi = F.relu if self.feature_map == "relu" else (lambda x: F.elu(x) + 1)
            qf, kf, vf = phi(ql.float()), phi(kl.float()), vl.float()
            o = qf @ (kf.transpose(-1, -2) @ vf) / joint  # (B, H', L, d')
            o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.out_scale).to(q.dtype)
        o_image = o[:, :, text:].transpose(1, 2).flatten(2)  # (B, N, C): the text rows' linear outputs are unused
        if self.dwconv is not None:
            n = joint - text
            h, w = self.image_grid(n)
            grid_v = v[:, :, text:].transpose(1, 2).flatten(2).transpose(1, 2).reshape(b, -1, h, w)  # (B, C, h, w)
            o_image = o_image + self.dwconv(grid_v).flatten(2).transpose(1, 2)
        return torch.cat([o_text.to(q.dtype), o_image.to(q.dtype)], dim=1)  # (B, L, C)

    def _regroup(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, d) teacher heads → (B, H', L, H·d/H') linear-attention heads."""
        b, h, n, d = x.shape
        if h == self.heads:
            return x
        return x.transpose(1, 2).reshape(b, n, self.heads, h * d // self.heads).transpose(1, 2)


def build_joint_softmax(old: nn.Module, site: Site, options) -> JointSoftmaxProcessor:
    check_flux_attention(old, "softmax")
    return JointSoftmaxProcessor(site.grid)


def build_joint_local(old: nn.Module, site: Site, options: LocalOptions) -> JointLocalProcessor:
    check_flux_attention(old, "local")
    return JointLocalProcessor(options, site.grid)


def build_joint_linear(old: nn.Module, site: Site, options: LinearOptions) -> JointLinearProcessor:
    check_flux_attention(old, "linear")
    heads = options.heads or site.heads
    if site.dim % heads:
        raise ValueError(f"heads={heads} does not divide the attention width {site.dim}")
    return JointLinearProcessor(site.dim, heads, options, site.grid)


JOINT_BUILDERS = {"softmax": build_joint_softmax, "local": build_joint_local, "linear": build_joint_linear}


class CrossLinearProcessor(nn.Module):
    """Linear cross-attention (PixArt's `attn2`): image queries over the caption tokens the mask keeps.

    o_i = φ(q_i)ᵀ Σ_j m_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j m_j φ(k_j) + ε), m_j = 1 for kept caption tokens; the state
    Σ_j m_j φ(k_j) v_jᵀ is (d × d) per head and sample, so the cost is O((N + T)·d²) instead of O(N·T·d).
    """

    op = "linear"

    def __init__(self, heads: int, options: LinearOptions) -> None:
        super().__init__()
        self.heads = heads
        self.feature_map = options.feature_map
        self.eps = options.eps

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            raise ValueError("the cross-attention linear processor needs (B, N, C) queries and a text context")
        phi = F.relu if self.feature_map == "relu" else (lambda x: F.elu(x) + 1)
        b, t = encoder_hidden_states.shape[:2]
        acc = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32  # the sums in fp32 at least
        q = phi(to_heads(attn.to_q(hidden_states), self.heads).to(acc))  # (B, H, N, d)
        k = phi(to_heads(attn.to_k(encoder_hidden_states), self.heads).to(acc))  # (B, H, T, d)
        v = to_heads(attn.to_v(encoder_hidden_states), self.heads).to(acc)
        if attention_mask is not None:  # PixArt passes a (B, 1, T) bias: 0 keep, −10000 drop
            keep = (attention_mask.reshape(b, -1, t)[:, 0] > -1).to(k.dtype)  # (B, T)
            k = k * keep[:, None, :, None]
        state = k.transpose(-1, -2) @ v  # (B, H, d, d)
        norm = q @ k.sum(2, keepdim=True).transpose(-1, -2) + self.eps  # (B, H, N, 1)
        o = from_heads((q @ state) / norm).to(hidden_states.dtype)  # (B, N, C)
        return attn.to_out[1](attn.to_out[0](o))


def build_cross_linear(old: nn.Module, site: Site, options: LinearOptions) -> CrossLinearProcessor:
    if options.norm != "divide" or options.dwconv:
        raise ValueError("linear cross-attention takes norm: divide and dwconv: 0 (the keys are text, not a grid)")
    if not getattr(old, "is_cross_attention", False):
        raise ValueError("the cross-attention linear processor needs a cross-attention module")
    heads = options.heads or site.heads
    if site.dim % heads:
        raise ValueError(f"heads={heads} does not divide the attention width {site.dim}")
    return CrossLinearProcessor(heads, options)
