"""Shared pieces of the bounded-memory PyTorch paths: exact softmax over gathered keys, chunked, checkpointed.

The `blockwise` module of each op gathers, per group of queries (a query block, a grid tile, a frame group), only
the keys that group can see, and calls `attend` on them with the fine-grained token mask over the gathered part.
Groups are processed in chunks sized so that one chunk holds at most CHUNK_ELEMENTS scores; under autograd each
chunk is checkpointed (its scores are recomputed in backward instead of saved), so peak memory is one chunk's
scores plus the inputs, outputs and gathered keys — proportional to the kept work, never N x N.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Scores (and as many softmax weights) one chunk may hold: 2²⁴ fp32 = 64 MiB each.
CHUNK_ELEMENTS = 2**24


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over the keys `mask` keeps; q [..., M, d], k [..., L, d], v [..., L, dv].

    mask is bool, broadcastable to [..., M, L], or None for all keys. Rows keeping no key give zeros and zero
    gradients (they attend to every key inside SDPA, then are zeroed, so no NaN reaches autograd). Runs torch's
    SDPA on [prod(...), 1, M, d] with the mask expanded to that batch (measured 2x faster on CPU than a broadcast
    mask, and than an explicit softmax), in q's dtype, which the caller chooses (fp32 or float64).
    """
    batch, M, L = q.shape[:-2], q.shape[-2], k.shape[-2]
    flat = lambda x: x.reshape(-1, 1, x.shape[-2], x.shape[-1])  # noqa: E731
    empty = None
    if mask is not None:
        empty = ~mask.any(dim=-1, keepdim=True)  # [..., M, 1]
        if empty.any():
            mask = mask | empty
        else:
            empty = None
        mask = mask.expand(*batch, M, L).reshape(-1, 1, M, L)
    o = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask, scale=scale)
    o = o.reshape(*batch, M, v.shape[-1])
    return o if empty is None else o.masked_fill(empty, 0.0)


def chunk_size(groups: int, scores_per_group: int, budget: int | None = None) -> int:
    """How many of `groups` groups, each holding scores_per_group scores, one chunk takes (at least one).

    budget defaults to CHUNK_ELEMENTS, read at call time.
    """
    budget = CHUNK_ELEMENTS if budget is None else budget
    return max(1, min(groups, budget // max(1, scores_per_group)))


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record a graph through any of these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def run_chunks(fn: Callable[..., torch.Tensor], n: int, step: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """[fn(start, stop, *tensors) for each chunk [start, stop) of range(n)], each chunk checkpointed under autograd.

    Checkpointing keeps a chunk's scores and softmax weights out of the saved activations: backward recomputes
    them one chunk at a time, as FlashAttention recomputes its tiles.
    """
    outs = []
    grad = needs_grad(*tensors)
    for start in range(0, n, step):
        stop = min(n, start + step)
        if grad:
            outs.append(checkpoint(fn, start, stop, *tensors, use_reentrant=False))
        else:
            outs.append(fn(start, stop, *tensors))
    return outs


def n_blocks(n: int, block: int) -> int:
    """Blocks of `block` tokens covering n tokens (the last may be short)."""
    return math.ceil(n / block)


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """x [..., N, d] zero-padded along N to `length` tokens (x itself when N == length)."""
    n = x.shape[-2]
    if n == length:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, length - n))


def text_rows(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, text: int, scale: float) -> list[torch.Tensor]:
    """Dense attention of the first `text` query rows of qf [BH, L, d] over every key, in chunks of rows."""
    if text == 0:
        return []

    def dense(start: int, stop: int, qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
        return attend(qf[:, start:stop], kf, vf, None, scale)

    return run_chunks(dense, text, chunk_size(text, qf.shape[0] * kf.shape[1]), qf, kf, vf)


def with_text_keys(
    keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepends the text keys kt, vt [BH, T, ·] (always visible) to gathered keys [BH, c, L, ·] and their mask.

    mask broadcasts to [BH, c, M, L]; the returned one to [BH, c, M, T + L].
    """
    T = kt.shape[1]
    if T == 0:
        return keys, values, mask
    BH, c = keys.shape[:2]
    keys = torch.cat([kt[:, None].expand(BH, c, T, kt.shape[-1]), keys], dim=2)
    values = torch.cat([vt[:, None].expand(BH, c, T, vt.shape[-1]), values], dim=2)
    visible = torch.ones(*mask.shape[:-1], T, dtype=torch.bool, device=mask.device)
    return keys, values, torch.cat([visible, mask], dim=-1)


def text_prefix_mask(image: torch.Tensor, text: int) -> torch.Tensor:
    """The (..., T + N, T + N) mask of an (..., N, N) image-pair mask under CLEAR's rule: text rows and columns
    dense (the references' form of a text prefix)."""
    if text == 0:
        return image
    mask = image.new_ones(*image.shape[:-2], text + image.shape[-2], text + image.shape[-1])
    mask[..., text:, text:] = image
    return mask
