"""Triton forward and backward kernels for block-sparse softmax attention, and their autograd.Function.

FlashAttention-2 structure: the forward keeps an online softmax over the key blocks a query block lists and saves
the row log-sum-exp; the backward recomputes probabilities, dq walking the same lists and dk, dv walking the
transposed (key block → query blocks) lists. Sparsity blocks larger than 64 are processed as 64-token tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._dispatch import check_launchable, interpret_requested, triton_interpreting
from . import MAX_TRITON_HEAD_DIM
from .index import kept_block_lists

# Triton decides interpreter-or-GPU when a kernel is decorated: the kernels below now, its own helpers at its import.
INTERPRETED = interpret_requested() and triton_interpreting()

LOG2E = 1.4426950408889634
MAX_TILE = 64


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    kv_index_ptr,
    kv_count_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    N,
    D,
    DV,
    N_BLOCKS,
    qk_scale,
    PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Online softmax over the listed key blocks for one query tile; writes o and the base-2 row log-sum-exp."""
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_row_block = (i_bh.to(tl.int64) * N_BLOCKS) + i_tile // (BLOCK // TILE)
    rows = i_tile * TILE + tl.arange(0, TILE)
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_r = rows < N
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh

    q = tl.load(
        q_ptr + i_b * stride_qb + i_h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    )
    row_max = tl.full([TILE], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([TILE], dtype=tl.float32)
    acc = tl.zeros([TILE, BLOCK_DV], dtype=tl.float32)
    count = tl.load(kv_count_ptr + i_row_block)
    for t in range(count):
        j = tl.load(kv_index_ptr + i_row_block * N_BLOCKS + t)
        # Tiles past N are skipped, so every visited tile has a valid key and row_max stays finite.
        for start in range(j * BLOCK, tl.minimum(j * BLOCK + BLOCK, N), TILE):
            cols = start + offs_t
            mask_c = cols < N
            k = tl.load(
                k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_c[:, None] & mask_d[None, :],
                other=0.0,
            )
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=mask_c[:, None] & mask_dv[None, :],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [TILE, TILE], base-2 logits
            s = tl.where(mask_c[None, :], s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            alpha = tl.exp2(row_max - new_max)
            p = tl.exp2(s - new_max[:, None])
            row_sum = row_sum * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # [TILE, BLOCK_DV]
            row_max = new_max

    # A query block listing no key block has row_sum = 0: its output is zero.
    has_keys = row_sum > 0
    row_sum = tl.where(has_keys, row_sum, 1.0)
    o = acc / row_sum[:, None]
    tl.store(
        o_ptr + i_b * stride_ob + i_h * stride_oh + rows[:, None] * stride_on + offs_dv[None, :] * stride_od,
        o.to(o_ptr.dtype.element_ty),
        mask=mask_r[:, None] & mask_dv[None, :],
    )
    tl.store(lse_ptr + i_bh.to(tl.int64) * N + rows, tl.where(has_keys, row_max + tl.log2(row_sum), 0.0), mask=mask_r)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    kv_index_ptr,
    kv_count_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dqd,
    H,
    N,
    D,
    DV,
    N_BLOCKS,
    qk_scale,
    sm_scale,
    PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dq = scale Σ_j p_ij (dp_ij - δ_i) k_j over the listed key blocks, for one query tile."""
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_row_block = (i_bh.to(tl.int64) * N_BLOCKS) + i_tile // (BLOCK // TILE)
    rows = i_tile * TILE + tl.arange(0, TILE)
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_r = rows < N
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    mask_q = mask_r[:, None] & mask_d[None, :]
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh

    q = tl.load(
        q_ptr + i_b * stride_qb + i_h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_q,
        other=0.0,
    )
    do = tl.load(
        do_ptr + i_b * stride_dob + i_h * stride_doh + rows[:, None] * stride_don + offs_dv[None, :] * stride_dod,
        mask=mask_r[:, None] & mask_dv[None, :],
        other=0.0,
    )
    lse = tl.load(lse_ptr + i_bh.to(tl.int64) * N + rows, mask=mask_r, other=0.0)
    delta = tl.load(delta_ptr + i_bh.to(tl.int64) * N + rows, mask=mask_r, other=0.0)
    dq = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
    count = tl.load(kv_count_ptr + i_row_block)
    for t in range(count):
        j = tl.load(kv_index_ptr + i_row_block * N_BLOCKS + t)
        for start in range(j * BLOCK, tl.minimum(j * BLOCK + BLOCK, N), TILE):
            cols = start + offs_t
            mask_c = cols < N
            k = tl.load(
                k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_c[:, None] & mask_d[None, :],
                other=0.0,
            )
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=mask_c[:, None] & mask_dv[None, :],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [TILE, TILE]
            p = tl.where(mask_r[:, None] & mask_c[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [TILE, TILE]
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # [TILE, BLOCK_D]
    tl.store(
        dq_ptr + i_b * stride_dqb + i_h * stride_dqh + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
        (dq * sm_scale).to(dq_ptr.dtype.element_ty),
        mask=mask_q,
    )


@triton.jit
def _bwd_dkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    q_index_ptr,
    q_count_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    H,
    N,
    D,
    DV,
    N_BLOCKS,
    qk_scale,
    sm_scale,
    PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dv = Σ_i p_ijᵀ do_i and dk = scale Σ_i ds_ijᵀ q_i over the query blocks listing this key tile's block."""
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_col_block = (i_bh.to(tl.int64) * N_BLOCKS) + i_tile // (BLOCK // TILE)
    cols = i_tile * TILE + tl.arange(0, TILE)
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_c = cols < N
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    mask_k = mask_c[:, None] & mask_d[None, :]
    mask_v = mask_c[:, None] & mask_dv[None, :]
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    do_base = do_ptr + i_b * stride_dob + i_h * stride_doh

    k = tl.load(
        k_ptr + i_b * stride_kb + i_h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=mask_k,
        other=0.0,
    )
    v = tl.load(
        v_ptr + i_b * stride_vb + i_h * stride_vh + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        mask=mask_v,
        other=0.0,
    )
    dk = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([TILE, BLOCK_DV], dtype=tl.float32)
    count = tl.load(q_count_ptr + i_col_block)
    for t in range(count):
        i = tl.load(q_index_ptr + i_col_block * N_BLOCKS + t)
        for start in range(i * BLOCK, tl.minimum(i * BLOCK + BLOCK, N), TILE):
            rows = start + offs_t
            mask_r = rows < N
            q = tl.load(
                q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_r[:, None] & mask_d[None, :],
                other=0.0,
            )
            do = tl.load(
                do_base + rows[:, None] * stride_don + offs_dv[None, :] * stride_dod,
                mask=mask_r[:, None] & mask_dv[None, :],
                other=0.0,
            )
            lse = tl.load(lse_ptr + i_bh.to(tl.int64) * N + rows, mask=mask_r, other=0.0)
            delta = tl.load(delta_ptr + i_bh.to(tl.int64) * N + rows, mask=mask_r, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [TILE, TILE], rows are queries
            p = tl.where(mask_r[:, None] & mask_c[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dv = tl.dot(tl.trans(p).to(do.dtype), do, dv, input_precision=PRECISION)  # [TILE, BLOCK_DV]
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [TILE, TILE]
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk, input_precision=PRECISION)  # [TILE, BLOCK_D]
    tl.store(
        dk_ptr + i_b * stride_dkb + i_h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        (dk * sm_scale).to(dk_ptr.dtype.element_ty),
        mask=mask_k,
    )
    tl.store(
        dv_ptr + i_b * stride_dvb + i_h * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
        dv.to(dv_ptr.dtype.element_ty),
        mask=mask_v,
    )


def _launch_config(q: torch.Tensor, v: torch.Tensor, block: int) -> dict:
    """Tile and block sizes, dot precision, warps and stages for these head dims, dtype and sparsity block."""
    if max(q.shape[-1], v.shape[-1]) > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"block_sparse_attention: the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}")
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    block_dv = max(16, triton.next_power_of_2(v.shape[-1]))
    return {
        # fp32 inputs get exact fp32 products; half inputs already carry less precision than tf32.
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "BLOCK": block,
        "TILE": min(block, MAX_TILE),
        "BLOCK_D": block_d,
        "BLOCK_DV": block_dv,
        "num_warps": 8 if max(block_d, block_dv) > 64 else 4,
        "num_stages": 2,
    }


def block_sparse_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [B, H, N, dv] and the base-2 row log-sum-exp [B*H, N] (fp32)."""
    check_launchable("block_sparse_attention", INTERPRETED, q, k, v)
    B, H, N, D = q.shape
    DV = v.shape[-1]
    config = _launch_config(q, v, block)
    kv_index, kv_count = kept_block_lists(block_index)  # [B*H, nq, nk], [B*H, nq]
    sm_scale = D**-0.5

    o = torch.empty(B, H, N, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
    _fwd_kernel[(triton.cdiv(N, config["TILE"]), B * H)](
        q, k, v, o, lse, kv_index, kv_count, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, N, D, DV, block_index.shape[-1], sm_scale * LOG2E, **config,
    )  # fmt: skip
    return o, lse


def block_sparse_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    block_index: torch.Tensor,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv given the forward's output and row log-sum-exp."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    config = _launch_config(q, v, block)
    kv_index, kv_count = kept_block_lists(block_index)  # [B*H, nq, nk], [B*H, nq]
    q_index, q_count = kept_block_lists(block_index.transpose(-1, -2))  # [B*H, nk, nq], [B*H, nk]
    sm_scale = D**-0.5
    delta = (do.float() * o.float()).sum(dim=-1)  # [B, H, N]
    n_tiles = triton.cdiv(N, config["TILE"])

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    _bwd_dq_kernel[(n_tiles, B * H)](
        q, k, v, do, lse, delta, dq, kv_index, kv_count,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, N, D, DV, block_index.shape[-1], sm_scale * LOG2E, sm_scale, **config,
    )  # fmt: skip
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    _bwd_dkv_kernel[(n_tiles, B * H)](
        q, k, v, do, lse, delta, dk, dv, q_index, q_count,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, N, D, DV, block_index.shape[-1], sm_scale * LOG2E, sm_scale, **config,
    )  # fmt: skip
    return dq, dk, dv


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o, the row log-sum-exp and the block map."""

    @staticmethod
    def forward(ctx, q, k, v, block_index, block):
        o, lse = block_sparse_fwd(q, k, v, block_index, block)
        ctx.save_for_backward(q, k, v, o, lse, block_index)
        ctx.block = block
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, block_index = ctx.saved_tensors
        dq, dk, dv = block_sparse_bwd(q, k, v, o, lse, do, block_index, ctx.block)
        return dq, dk, dv, None, None


def block_sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block: int = 64
) -> torch.Tensor:
    """Block-sparse softmax attention on [B, H, N, d] tensors with the Triton kernels."""
    return BlockSparseAttentionFunction.apply(q, k, v, block_index, block)
