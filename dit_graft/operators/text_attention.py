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
survive the ReLU), and the kept softmax rows need no second set of un-rotated projections. Block
selection (`sparse`, `sla`) also scores the rotated q and k.

- `softmax` (JointSoftmaxProcessor): every query over every key; the teacher's computation.
- `local` (JointLocalProcessor): image query i sees the text keys and the image keys inside its window on
  the h×w grid (the `local` operator's circle/square rule).
- `swa` (JointSwaProcessor): image query i sees the text keys and the image keys j with |i − j| ≤ ⌊w/2⌋,
  i and j counted along the image tokens (row-major), as `swa` counts them on DiT.
- `sparse` (JointSparseProcessor): per head, image query blocks rank the image key blocks by mean-pooled
  q·k (blocks of b image tokens from the first image token, as `sparse` cuts them on DiT) and attend with
  one softmax over the T text keys plus the `keep` best image key blocks.
- `sla` (JointSlaProcessor): the text keys count as critical for every image query: softmax over the text
  keys plus the critical image key blocks, + proj_l(linear attention over the marginal image key blocks),
  negligible blocks skipped; proj_l (d × d, no bias) starts at zero, so at inheritance time it is `sparse`
  with `keep: critical`, and `critical: 1.0` is softmax attention whatever proj_l holds.
- `linear` (JointLinearProcessor): image queries by linear attention over all L keys (text and image,
  LiT's ReLU or ELU + 1 feature map, `heads` regrouped from the teacher's heads after RoPE, optional
  zero-initialised depthwise conv of the image values on the grid).

PyTorch paths: `local` and `swa` run one SDPA with a boolean (L, L) mask, cached per shape on the
model's JointGrid: exact, dense work. `sparse` and `sla` call the block-sparse kernels
(`block_sparse_attention`, `sla_attention`; Triton on CUDA) on the joint sequence when the text fills whole
blocks (T a multiple of `block`, e.g. FLUX.1's 512 or 256 T5 tokens): text blocks are then kept by every
query block and text query blocks keep everything. Otherwise text and image tokens would share a block, and
the sparse part runs as one SDPA with the equivalent (L, L) token mask instead: same result, dense work.

`gated_conv` is refused on FLUX: it has no keys, so image tokens would lose their only path to the text
(FLUX conditions image tokens on the prompt through joint attention alone), and it has no CLEAR form.

FLOPs (`core_flops(site, tokens, text)`, what the kernels compute for one image of N = `tokens` image
tokens and T = `text` text tokens; `attention_core_flops` in operators/base.py): the text rows' softmax
4·T·L·C, the image rows' text keys 4·N·T·C, and the operator's own formula on the N image tokens
(`Operator.flops`: kept pairs for local/swa/sparse, SLA's parts; softmax's 4·N²·C makes the total
4·L²·C). `linear` computes its linear attention over all L rows (the text rows' results unused) and its conv
over the N image tokens: 4·T·L·C + linear's formula on L tokens without the conv + 2·N·C·k².

Every teacher weight is inherited: the processors use the FluxAttention's own projections and norms.

PixArt's cross-attention (`attn2`, image queries over the T5 caption tokens) can take `linear`
(CrossLinearProcessor): ReLU/ELU + 1 linear attention over the caption tokens the attention mask keeps.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from dit_graft.kernels import block_sparse_attention, linear_attention, sla_attention, sla_block_index, topk_block_index
from dit_graft.operators.base import (
    OPERATORS,
    Options,
    Site,
    TokenGrid,
    attention_pairs_flops,
    band_mask,
    from_heads,
    grid_window_is_full,
    grid_window_mask,
    to_heads,
)

# Scores one call of the dense reference kernels may hold (about four [B, h, L, L] fp32 tensors for sla);
# off CUDA the block-sparse parts run a few heads at a time. The Triton kernels hold none.
REFERENCE_SCORES = 2**27

# Attention operators with no FLUX form, and why (the refusal names the reason).
JOINT_REFUSED = {
    "gated_conv": "it has no keys, so the image tokens would lose their only path to the text tokens (FLUX "
    "conditions image tokens on the prompt through joint attention alone); there is no CLEAR-style joint form",
}


class JointGrid(TokenGrid):
    """The image token grid plus the number of text tokens in front of it in FLUX's joint sequence."""

    def __init__(self, hw: tuple[int, int] | None = None, text: int | None = None) -> None:
        super().__init__(hw)
        self.text = text
        # joint attention masks, shared by every layer of a model
        self.masks: dict[tuple, torch.Tensor] = {}

    def call_tokens(self, hidden_states, encoder_hidden_states, attention_mask) -> tuple[int, int] | None:
        """(N, T) of a joint-attention call: a double-stream block's image tokens and text beside them, or a
        single-stream block's joint sequence split by the recorded text length."""
        if hidden_states.ndim != 3 or attention_mask is not None:
            return None
        if encoder_hidden_states is not None:
            return hidden_states.shape[1], encoder_hidden_states.shape[1]
        if self.text is None:
            return None
        return hidden_states.shape[1] - self.text, self.text


def check_flux_attention(attn: nn.Module, op: str) -> None:
    """Refuses what the joint processors do not handle, before anything is swapped."""
    if not all(hasattr(attn, a) for a in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "head_dim")):
        raise ValueError(f"the FLUX {op} processor needs a FluxAttention (got {type(attn).__name__})")
    if getattr(attn, "fused_projections", False):
        raise ValueError(f"the FLUX {op} processor needs unfused projections (call unfuse_qkv_projections first)")


def clear_flops(op: str, site: Site, tokens: int, text: int, options: Options) -> int:
    """Text rows over all L keys + image rows over the T text keys + operator `op`'s formula on the N image tokens."""
    joint = tokens + text
    return attention_pairs_flops(text * joint + tokens * text, site.dim) + OPERATORS.get(op).flops(
        site, tokens, options
    )


class JointAttnProcessor(nn.Module):
    """Base: the teacher's projections, norms and RoPE; text rows by softmax; image rows by `attend`'s operator."""

    op = "softmax"

    def __init__(self, grid: JointGrid, options: Options) -> None:
        super().__init__()
        self.grid = grid
        self.options = options

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
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).flatten(2).to(q.dtype)

    def core_flops(self, site: Site, tokens: int, text: int) -> int:
        """Attention-core FLOPs of one call with `tokens` image and `text` text tokens (module doc)."""
        return clear_flops(self.op, site, tokens, text, self.options)


class JointSoftmaxProcessor(JointAttnProcessor):
    """Exact softmax attention over the joint sequence: the teacher's computation, as an explicit operator."""


class JointMaskedProcessor(JointAttnProcessor, abc.ABC):
    """Image queries see the text keys and the image keys `image_mask` keeps; one SDPA with the (L, L) mask."""

    @abc.abstractmethod
    def image_mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        """(N, N) boolean mask of the image keys each image query sees; None when it sees them all."""

    @abc.abstractmethod
    def mask_key(self, n: int) -> tuple:
        """What the image mask depends on besides N (options, grid), for the shared mask cache."""

    def attend(self, q, k, v, text: int) -> torch.Tensor:
        joint = q.shape[2]
        n = joint - text
        key = (self.op, *self.mask_key(n), text, n, q.device)
        if key not in self.grid.masks:
            image = self.image_mask(n, q.device)
            mask = None
            if image is not None:
                mask = torch.ones(joint, joint, dtype=torch.bool, device=q.device)  # text rows and columns: all
                mask[text:, text:] = image
            self.grid.masks[key] = mask
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.grid.masks[key])
        return o.transpose(1, 2).flatten(2).to(q.dtype)


class JointLocalProcessor(JointMaskedProcessor):
    """CLEAR on FLUX: image queries see the text keys and the image keys within a radius on the grid."""

    op = "local"

    def mask_key(self, n: int) -> tuple:
        return self.options.window, self.options.shape, self.image_grid(n)

    def image_mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        h, w = self.image_grid(n)
        radius, shape = self.options.window, self.options.shape
        return None if grid_window_is_full(h, w, radius, shape) else grid_window_mask(h, w, radius, shape, device)


class JointSwaProcessor(JointMaskedProcessor):
    """Sliding windows on FLUX: image queries see the text keys and the image keys within ⌊w/2⌋ positions."""

    op = "swa"

    def mask_key(self, n: int) -> tuple:
        return (self.options.window,)

    def image_mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        half = self.options.window // 2
        return None if n - 1 <= half else band_mask(n, half, device)


def joint_block_sparse(q, k, v, text: int, image_blocks: torch.Tensor, block: int) -> torch.Tensor:
    """Softmax (B, H, L, d): text rows over every key; image rows over the text keys + the kept image key blocks.

    `image_blocks` is the bool (B, H, nb, nb) map over the image tokens' blocks (the first at the first image token).
    """
    b, heads, joint, _ = q.shape
    n = joint - text
    step = heads if q.is_cuda else max(1, REFERENCE_SCORES // (b * joint * joint))
    if text % block == 0:  # text fills whole blocks: one block map over the joint sequence
        tb = text // block
        nb = image_blocks.shape[-1]
        index = image_blocks.new_ones(b, heads, tb + nb, tb + nb)
        index[:, :, tb:, tb:] = image_blocks
        parts = [
            block_sparse_attention(
                q[:, s : s + step], k[:, s : s + step], v[:, s : s + step], index[:, s : s + step], block
            )
            for s in range(0, heads, step)
        ]
        return torch.cat(parts, dim=1)
    parts = []
    for s in range(0, heads, step):
        kept = image_blocks[:, s : s + step].repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :n]
        mask = kept.new_ones(*kept.shape[:2], joint, joint)  # (B, h, L, L)
        mask[:, :, text:, text:] = kept
        parts.append(F.scaled_dot_product_attention(q[:, s : s + step], k[:, s : s + step], v[:, s : s + step], mask))
    return torch.cat(parts, dim=1)


class JointSparseProcessor(JointAttnProcessor):
    """Block-sparse on FLUX: image query blocks see the text keys and their top-k image key blocks."""

    op = "sparse"

    def attend(self, q, k, v, text: int) -> torch.Tensor:
        block = self.options.block
        image_blocks = topk_block_index(q[:, :, text:], k[:, :, text:], block, self.options.keep)  # (B, H, nb, nb)
        o = joint_block_sparse(q, k, v, text, image_blocks, block)  # (B, H, L, d)
        return o.transpose(1, 2).flatten(2).to(q.dtype)


class JointSlaProcessor(JointAttnProcessor):
    """SLA on FLUX: softmax over the text keys + critical image blocks, + proj_l(linear over marginal ones)."""

    op = "sla"

    def __init__(self, head_dim: int, grid: JointGrid, options: Options) -> None:
        super().__init__(grid, options)
        self.proj_l = nn.Linear(head_dim, head_dim, bias=False)
        nn.init.zeros_(self.proj_l.weight)

    def attend(self, q, k, v, text: int) -> torch.Tensor:
        opts = self.options
        qi, ki, vi = q[:, :, text:], k[:, :, text:], v[:, :, text:]  # (B, H, N, d)
        critical, marginal = sla_block_index(qi, ki, opts.block, opts.critical, opts.negligible)  # (B, H, nb, nb)
        o = joint_block_sparse(q, k, v, text, critical, opts.block)  # (B, H, L, d)
        b, heads, n, _ = qi.shape
        step = heads if q.is_cuda else max(1, REFERENCE_SCORES // (b * n * n))
        none = torch.zeros_like(critical)  # the critical blocks' softmax is `o` above; only the linear part here
        o_linear = torch.cat(
            [
                sla_attention(
                    qi[:, s : s + step],
                    ki[:, s : s + step],
                    vi[:, s : s + step],
                    none[:, s : s + step],
                    marginal[:, s : s + step],
                    opts.block,
                    opts.feature_map,
                    opts.eps,
                )[1]
                for s in range(0, heads, step)
            ],
            dim=1,
        )  # (B, H, N, d): zeros where a query block has no marginal block
        o_image = o[:, :, text:] + self.proj_l(o_linear)
        o = torch.cat([o[:, :, :text], o_image.to(o.dtype)], dim=2)
        return o.transpose(1, 2).flatten(2).to(q.dtype)


class JointLinearProcessor(JointAttnProcessor):
    """LiT on FLUX: image queries by linear attention over every key; text queries by softmax."""

    op = "linear"

    def __init__(self, dim: int, heads: int, options: Options, grid: JointGrid) -> None:
        super().__init__(grid, options)
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

    def core_flops(self, site: Site, tokens: int, text: int) -> int:
        """Text rows' softmax + linear attention over all L rows + the conv over the N image tokens."""
        joint = tokens + text
        linear = OPERATORS.get("linear").flops(site, joint, self.options.model_copy(update={"dwconv": 0}))
        return attention_pairs_flops(text * joint, site.dim) + linear + 2 * tokens * site.dim * self.options.dwconv**2


def _build_joint(op: str, processor: type):
    """The builder of a joint processor that takes only the token grid and the options."""

    def build(old: nn.Module, site: Site, options):
        check_flux_attention(old, op)
        return processor(site.grid, options)

    return build


def build_joint_sla(old: nn.Module, site: Site, options) -> JointSlaProcessor:
    check_flux_attention(old, "sla")
    return JointSlaProcessor(old.head_dim, site.grid, options)


def build_joint_linear(old: nn.Module, site: Site, options) -> JointLinearProcessor:
    check_flux_attention(old, "linear")
    heads = options.heads or site.heads
    if site.dim % heads:
        raise ValueError(f"heads={heads} does not divide the attention width {site.dim}")
    return JointLinearProcessor(site.dim, heads, options, site.grid)


JOINT_BUILDERS = {
    "softmax": _build_joint("softmax", JointSoftmaxProcessor),
    "local": _build_joint("local", JointLocalProcessor),
    "swa": _build_joint("swa", JointSwaProcessor),
    "sparse": _build_joint("sparse", JointSparseProcessor),
    "sla": build_joint_sla,
    "linear": build_joint_linear,
}


class CrossLinearProcessor(nn.Module):
    """Linear cross-attention (PixArt's `attn2`): image queries over the caption tokens the mask keeps.

    o_i = φ(q_i)ᵀ Σ_j m_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j m_j φ(k_j) + ε), m_j = 1 for kept caption tokens; the state
    Σ_j m_j φ(k_j) v_jᵀ is (d × d) per head and sample, so the cost is O((N + T)·d²) instead of O(N·T·d).
    """

    op = "linear"

    def __init__(self, heads: int, options: Options) -> None:
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


def build_cross_linear(old: nn.Module, site: Site, options) -> CrossLinearProcessor:
    if options.norm != "divide" or options.dwconv:
        raise ValueError("linear cross-attention takes norm: divide and dwconv: 0 (the keys are text, not a grid)")
    if not getattr(old, "is_cross_attention", False):
        raise ValueError("the cross-attention linear processor needs a cross-attention module")
    heads = options.heads or site.heads
    if site.dim % heads:
        raise ValueError(f"heads={heads} does not divide the attention width {site.dim}")
    return CrossLinearProcessor(heads, options)
