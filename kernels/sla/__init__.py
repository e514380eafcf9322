"""Sparse-linear attention (SLA): exact softmax over each query block's critical key blocks, linear attention
over its marginal ones, nothing over the rest. The operator adds the parts as o_sparse + proj_l(o_linear)."""

from __future__ import annotations

import math

import torch

from .._checks import check_qkv, head_dim_over
from .._dispatch import pytorch_path, use_triton
from ..block_sparse import BLOCK_SIZES
from ..linear_attention import FEATURE_MAPS
from .blockwise import sla_attention_blockwise
from .index import sla_block_index
from .naive import sla_attention_naive

# The sparse part runs on block_sparse's kernels and the linear part keeps a [d, dv] fp32 state: both stop at 128.
MAX_TRITON_HEAD_DIM = 128
# φ for the linear part: the linear kernel's relu and elu1, and softmax over the head dim (thu-ml's default).
SLA_FEATURE_MAPS = (*FEATURE_MAPS, "softmax")
# Which keys the linear part sums over: each query block's marginal blocks, or every key (thu-ml's current code).
LINEAR_KEYS = ("marginal", "all")

__all__ = ["LINEAR_KEYS", "SLA_FEATURE_MAPS", "sla_attention", "sla_block_index"]


def _check_block_map(
    name: str, q: torch.Tensor, block_map: torch.Tensor, block: int, key_block: int, text: int = 0
) -> None:
    """Raises ValueError unless block_map is a bool [B, H, n_qblocks, n_kblocks] map for q's N and these blocks."""
    if not isinstance(block_map, torch.Tensor) or block_map.dtype != torch.bool:
        got = block_map.dtype if isinstance(block_map, torch.Tensor) else type(block_map).__name__
        raise ValueError(f"sla_attention: {name} must be a bool tensor, got {got}")
    if block_map.device != q.device:
        raise ValueError(f"sla_attention: {name} is on {block_map.device}, q on {q.device}")
    B, H, N, _ = q.shape
    N -= text
    expected = (B, H, math.ceil(N / block), math.ceil(N / key_block))
    if block_map.shape != expected:
        blocks = f"block={block}" if key_block == block else f"block={block}, key_block={key_block}"
        tokens = f"N={N}" if not text else f"N={N} after {text} text tokens"
        raise ValueError(
            f"sla_attention: {name} must be [B, H, n_qblocks, n_kblocks] = {expected} "
            f"for {tokens}, {blocks}, got {tuple(block_map.shape)}"
        )


def triton_gap(q: torch.Tensor, v: torch.Tensor, block: int, key_block: int, text: int = 0) -> str | None:
    """Why the Triton kernels cannot run this call (None when they can)."""
    if text:
        return "the Triton kernels take no text prefix"
    if key_block != block:
        return f"the Triton kernels take one block size for queries and keys, got block={block}, key_block={key_block}"
    return head_dim_over(MAX_TRITON_HEAD_DIM, q, v)


def _sla_triton(q, k, v, critical, marginal, block, feature_map, eps):
    """Both parts on the Triton kernels; softmax features enter as relu(softmax(x)) = softmax(x), computed first."""
    from ..block_sparse.triton import block_sparse_attention_triton
    from ..linear_attention.triton import linear_attention_triton
    from .triton import MarginalLinearAttentionFunction

    o_sparse = block_sparse_attention_triton(q, k, v, critical, block)
    fq, fk, fmap = q, k, feature_map
    if feature_map == "softmax":
        fq, fk, fmap = torch.softmax(q, dim=-1), torch.softmax(k, dim=-1), "relu"
    if marginal is None:
        o_linear = linear_attention_triton(fq, fk, v, fmap, eps)
    else:
        o_linear = MarginalLinearAttentionFunction.apply(fq, fk, v, marginal, block, fmap, eps)
    return o_sparse, o_linear


def sla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index_critical: torch.Tensor,
    block_index_marginal: torch.Tensor | None,
    block: int = 64,
    feature_map: str = "relu",
    eps: float = 1e-6,
    *,
    key_block: int | None = None,
    linear_keys: str = "marginal",
    text: int = 0,
    fallback: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_sparse, o_linear), each [B, H, N, dv] in q's dtype, from q, k [B, H, N, d] and v [B, H, N, dv].

    o_sparse is softmax(q kᵀ / √d) v over each query block's critical key blocks (zeros where it has none);
    o_linear is φ(q)ᵀ Σ φ(k) vᵀ / (φ(q)ᵀ Σ φ(k) + eps) with both sums over its marginal key blocks only (zeros where
    it has none), or over every key with linear_keys="all" (the marginal map is then ignored and may be None).
    φ is relu, elu1 (ELU + 1) or softmax over the head dim. Query blocks hold `block` tokens, key blocks
    `key_block` (default: block); the maps are bool [B, H, ceil(N / block), ceil(N / key_block)], e.g. from
    sla_block_index; each part reads only its own map, so a block in both maps counts in both. text = T > 0: the
    blocks cut the N − T tokens after a T-token text prefix; the sparse part keeps text rows and columns dense
    (CLEAR's rule), the linear part covers the grid tokens only (zeros on the text rows). The parts come back
    separately so that the caller applies its own (zero-initialised) proj_l: out = o_sparse + proj_l(o_linear).
    Triton on CUDA (head dims up to 128, one block size: key_block ≠ block takes the PyTorch path, and a forced
    Triton backend raises saying so), elsewhere the bounded-memory PyTorch path (blockwise.py);
    DIT_GRAFT_KERNELS=triton|blockwise|naive forces one (naive: the dense reference).
    fallback=True: a forced Triton backend that cannot take the call runs the PyTorch path instead of raising
    (for operators, which choose their Triton route themselves).
    """
    key_block = block if key_block is None else key_block
    check_qkv("sla_attention", q, k, v)
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"sla_attention: block must be one of {BLOCK_SIZES}, got {block!r}")
    if isinstance(key_block, bool) or key_block not in BLOCK_SIZES:
        raise ValueError(f"sla_attention: key_block must be one of {BLOCK_SIZES}, got {key_block!r}")
    if isinstance(text, bool) or not isinstance(text, int) or not 0 <= text < q.shape[2]:
        raise ValueError(f"sla_attention: text must be an int in [0, N={q.shape[2]}), got {text!r}")
    if linear_keys not in LINEAR_KEYS:
        raise ValueError(f"sla_attention: linear_keys must be one of {', '.join(LINEAR_KEYS)}, got {linear_keys!r}")
    _check_block_map("block_index_critical", q, block_index_critical, block, key_block, text)
    if linear_keys == "all":
        block_index_marginal = None
    else:
        _check_block_map("block_index_marginal", q, block_index_marginal, block, key_block, text)
    if feature_map not in SLA_FEATURE_MAPS:
        raise ValueError(
            f"sla_attention: feature_map must be one of {', '.join(SLA_FEATURE_MAPS)}, got {feature_map!r}"
        )
    if not eps > 0:
        raise ValueError(f"sla_attention: eps must be positive, got {eps}")
    args = (q, k, v, block_index_critical, block_index_marginal, block, feature_map, eps)
    gap = triton_gap(q, v, block, key_block, text)
    if not (fallback and gap) and use_triton("sla_attention", q, k, v, unsupported=gap):
        return _sla_triton(*args)
    if pytorch_path(q) == "naive":
        return sla_attention_naive(*args, key_block, text)
    return sla_attention_blockwise(*args, key_block, text)
