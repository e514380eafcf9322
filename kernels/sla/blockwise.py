"""Bounded-memory PyTorch path for sparse-linear attention.

The sparse part is block_sparse's blockwise path over the critical map. The linear part forms, per key block J,
the state S_J = φ(K_J)ᵀ V_J and key sum z_J = Σ_{j ∈ J} φ(k_j) (padding tokens of a short last block contribute
nothing: φ is applied before padding), then per query block I sums them over its marginal blocks directly — the
0/1 map times the stacked states, never "all minus the others", which cancels — and reads out
φ(q_i)ᵀ S_I / (φ(q_i)ᵀ z_I + eps). Query blocks are processed in chunks, so the [n_qblocks, d·dv] sums never
exist at once. With no map (linear part over every key) one global state is used.
"""

from __future__ import annotations

import torch

from .._blockwise import chunk_size, compute_dtype, n_blocks, pad_tokens, run_chunks
from ..block_sparse.blockwise import block_sparse_attention_blockwise
from ..linear_attention.naive import feature_map_fn


def marginal_linear_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index_marginal: torch.Tensor | None,
    block: int = 64,
    feature_map: str = "relu",
    eps: float = 1e-6,
    key_block: int | None = None,
) -> torch.Tensor:
    """Linear attention over each query block's marginal key blocks (every key when the map is None)."""
    key_block = key_block or block
    B, H, N, D = q.shape
    DV = v.shape[-1]
    BH = B * H
    dtype = compute_dtype(q)
    q_feat = feature_map_fn(feature_map, q.to(dtype)).reshape(BH, N, D)
    k_feat = feature_map_fn(feature_map, k.to(dtype)).reshape(BH, N, D)
    vf = v.to(dtype).reshape(BH, N, DV)
    if block_index_marginal is None:
        state = torch.einsum("bnd,bne->bde", k_feat, vf)  # [BH, d, dv]
        numerator = torch.einsum("bnd,bde->bne", q_feat, state)
        denominator = torch.einsum("bnd,bd->bn", q_feat, k_feat.sum(dim=1)) + eps
        return (numerator / denominator[..., None]).reshape(B, H, N, DV).to(q.dtype)

    nq, nk = n_blocks(N, block), n_blocks(N, key_block)
    kb = pad_tokens(k_feat, nk * key_block).reshape(BH, nk, key_block, D)
    vb = pad_tokens(vf, nk * key_block).reshape(BH, nk, key_block, DV)
    states = torch.cat(
        [torch.einsum("bjtd,bjte->bjde", kb, vb).reshape(BH, nk, D * DV), kb.sum(dim=2)], dim=-1
    )  # [BH, nk, d·dv + d]
    qb = pad_tokens(q_feat, nq * block).reshape(BH, nq, block, D)
    marginal = block_index_marginal.reshape(BH, nq, nk).to(dtype)

    def chunk(start: int, stop: int, qb: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        c = stop - start
        sums = torch.matmul(marginal[:, start:stop], states)  # [BH, c, d·dv + d]
        s, z = sums[..., : D * DV].reshape(BH, c, D, DV), sums[..., D * DV :]
        qc = qb[:, start:stop]  # [BH, c, block, d]
        numerator = torch.matmul(qc, s)  # [BH, c, block, dv]
        denominator = torch.einsum("bctd,bcd->bct", qc, z) + eps
        return numerator / denominator[..., None]

    step = chunk_size(nq, BH * (D * DV + D + block * DV))
    o = torch.cat(run_chunks(chunk, nq, step, qb, states), dim=1)  # [BH, nq, block, dv]
    return o.reshape(B, H, nq * block, DV)[:, :, :N].to(q.dtype)


def sla_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index_critical: torch.Tensor,
    block_index_marginal: torch.Tensor | None,
    block: int = 64,
    feature_map: str = "relu",
    eps: float = 1e-6,
    key_block: int | None = None,
    text: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_sparse, o_linear) in bounded memory: gathered critical blocks, per-block linear states (a T-token text
    prefix as in naive.py: dense text rows and columns in the sparse part, zeros on text rows in the linear part)."""
    o_sparse = block_sparse_attention_blockwise(q, k, v, block_index_critical, block, key_block, text)
    t = text
    o_linear = marginal_linear_attention_blockwise(
        q[:, :, t:], k[:, :, t:], v[:, :, t:], block_index_marginal, block, feature_map, eps, key_block
    )
    if t:
        o_linear = torch.cat([o_linear.new_zeros(*o_linear.shape[:2], t, o_linear.shape[-1]), o_linear], dim=2)
    return o_sparse, o_linear
