"""Bounded-memory PyTorch path for block-sparse softmax attention: per query block, only its kept key blocks.

Each query block's kept key blocks are listed (kept first, in ascending order, padded to the longest list), their
keys and values gathered, and exact softmax taken over the gathered keys with a mask that drops the padding slots
and the tokens past N of a short last block. Query blocks are processed in chunks (kernels/_blockwise.py), so
memory grows with the kept blocks, never with N².
"""

from __future__ import annotations

import torch

from .._blockwise import (
    attend,
    chunk_size,
    compute_dtype,
    n_blocks,
    pad_tokens,
    run_chunks,
    text_rows,
    with_text_keys,
)


def block_sparse_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block: int = 64,
    key_block: int | None = None,
    text: int = 0,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over the kept key blocks, in fp32 (float64 stays float64); rows keeping none give zeros.

    block_index is bool [B, H, ceil(N / block), ceil(N / key_block)]; key_block defaults to block. With text = T > 0
    the first T tokens are a text prefix (CLEAR's rule): the blocks cut the N tokens after it, text queries see
    every key and every query sees the text keys.
    """
    key_block = key_block or block
    B, H, length, D = q.shape
    N = length - text
    DV = v.shape[-1]
    BH = B * H
    dtype = compute_dtype(q)
    nq, nk = n_blocks(N, block), n_blocks(N, key_block)
    counts = block_index.sum(dim=-1).reshape(BH, nq)  # [BH, nq]
    width = max(1, int(counts.max()))  # the longest list; at least one slot so that empty maps still give a graph
    # A stable descending sort of 1/0 puts kept blocks first, in ascending order.
    order = torch.sort(block_index.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    order = order[..., :width].reshape(BH, nq, width)  # [BH, nq, width]
    slot_ok = torch.arange(width, device=q.device) < counts[..., None]  # [BH, nq, width]
    token_ok = (torch.arange(nk * key_block, device=q.device) < N).view(nk, key_block)  # [nk, key_block]
    rows = torch.arange(BH, device=q.device)[:, None, None]
    scale = D**-0.5

    qf = q.to(dtype).reshape(BH, length, D)
    kf = k.to(dtype).reshape(BH, length, D)
    vf = v.to(dtype).reshape(BH, length, DV)
    qb = pad_tokens(qf[:, text:], nq * block).reshape(BH, nq, block, D)
    kb = pad_tokens(kf[:, text:], nk * key_block).reshape(BH, nk, key_block, D)
    vb = pad_tokens(vf[:, text:], nk * key_block).reshape(BH, nk, key_block, DV)

    def chunk(start, stop, qb, kb, vb, kf, vf):
        c = stop - start
        index = order[:, start:stop]  # [BH, c, width]
        keys = kb[rows, index].reshape(BH, c, width * key_block, D)
        values = vb[rows, index].reshape(BH, c, width * key_block, DV)
        mask = (slot_ok[:, start:stop, :, None] & token_ok[index]).reshape(BH, c, 1, width * key_block)
        keys, values, mask = with_text_keys(keys, values, mask, kf[:, :text], vf[:, :text])
        return attend(qb[:, start:stop], keys, values, mask, scale)  # [BH, c, block, DV]

    step = chunk_size(nq, BH * block * (text + width * key_block))
    o = torch.cat(run_chunks(chunk, nq, step, qb, kb, vb, kf, vf), dim=1)  # [BH, nq, block, DV]
    o = o.reshape(BH, nq * block, DV)[:, :N]
    o = torch.cat([*text_rows(qf, kf, vf, text, scale), o], dim=1) if text else o
    return o.reshape(B, H, length, DV).to(q.dtype)
