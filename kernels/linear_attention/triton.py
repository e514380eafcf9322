"""Triton forward and backward kernels for non-causal linear attention, and their autograd.Function.

Forward: per N-split partial states (Σ φ(k_j) v_jᵀ and Σ φ(k_j)) are summed, then each query block reads the
state once. Backward mirrors it: per N-split partial dstate/dksum (dq written on the way), summed, then dk, dv.
Splitting N across programs keeps the GPU busy with a single head; φ, the normaliser and masks for head dims
that are not powers of two all live inside the kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._dispatch import check_launchable, interpret_requested, triton_interpreting
from . import MAX_TRITON_HEAD_DIM

# Triton decides interpreter-or-GPU when a kernel is decorated: the kernels below now, its own helpers at its import.
INTERPRETED = interpret_requested() and triton_interpreting()

# Enough programs for the state reduction to fill a large GPU even with one head.
TARGET_PROGRAMS = 256


@triton.jit
def _feature(x, FEATURE_MAP: tl.constexpr):
    """φ(x) in fp32."""
    if FEATURE_MAP == "relu":
        y = tl.maximum(x, 0.0)
    else:
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    return y


@triton.jit
def _feature_grad(x, FEATURE_MAP: tl.constexpr):
    """φ'(x) in fp32."""
    if FEATURE_MAP == "relu":
        y = tl.where(x > 0, 1.0, 0.0)
    else:
        y = tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    return y


@triton.jit
def _fwd_state_kernel(
    k_ptr,
    v_ptr,
    state_ptr,
    ksum_ptr,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    H,
    N,
    D,
    DV,
    BLOCKS_PER_SPLIT,
    FEATURE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Partial Σ_j φ(k_j) v_jᵀ and Σ_j φ(k_j) over one N-split of one (batch, head)."""
    i_split, i_bh = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(0)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh

    state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    split_start = i_split * BLOCKS_PER_SPLIT * BLOCK_N
    split_end = tl.minimum(split_start + BLOCKS_PER_SPLIT * BLOCK_N, N)
    for start in range(split_start, split_end, BLOCK_N):
        rows = start + offs_n
        mask_n = rows < N
        mask_k = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_k, other=0.0)
        v = tl.load(
            v_base + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        )
        # Padded rows and columns must stay zero: elu1 maps 0 to 1.
        k_feat = tl.where(mask_k, _feature(k.to(tl.float32), FEATURE_MAP), 0.0)  # [BLOCK_N, BLOCK_D]
        state = tl.dot(tl.trans(k_feat.to(v.dtype)), v, state, input_precision=PRECISION)  # [BLOCK_D, BLOCK_DV]
        ksum += tl.sum(k_feat, axis=0)

    partial = i_bh.to(tl.int64) * n_splits + i_split
    tl.store(
        state_ptr + partial * D * DV + offs_d[:, None] * DV + offs_dv[None, :],
        state,
        mask=mask_d[:, None] & mask_dv[None, :],
    )
    tl.store(ksum_ptr + partial * D + offs_d, ksum, mask=mask_d)


@triton.jit
def _fwd_output_kernel(
    q_ptr,
    state_ptr,
    ksum_ptr,
    o_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    N,
    D,
    DV,
    eps,
    FEATURE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """o = φ(q) S / (φ(q)·z + eps) for one query block of one (batch, head)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    rows = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = rows < N
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    mask_q = mask_n[:, None] & mask_d[None, :]

    state = tl.load(
        state_ptr + i_bh.to(tl.int64) * D * DV + offs_d[:, None] * DV + offs_dv[None, :],
        mask=mask_d[:, None] & mask_dv[None, :],
        other=0.0,
    )
    ksum = tl.load(ksum_ptr + i_bh.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0)
    q = tl.load(
        q_ptr + i_b * stride_qb + i_h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_q,
        other=0.0,
    )
    q_feat = tl.where(mask_q, _feature(q.to(tl.float32), FEATURE_MAP), 0.0)  # [BLOCK_N, BLOCK_D]
    numerator = tl.dot(q_feat, state, input_precision=PRECISION)  # [BLOCK_N, BLOCK_DV]
    denominator = tl.sum(q_feat * ksum[None, :], axis=1) + eps  # [BLOCK_N]
    o = numerator / denominator[:, None]
    tl.store(
        o_ptr + i_b * stride_ob + i_h * stride_oh + rows[:, None] * stride_on + offs_dv[None, :] * stride_od,
        o.to(o_ptr.dtype.element_ty),
        mask=mask_n[:, None] & mask_dv[None, :],
    )


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    do_ptr,
    state_ptr,
    ksum_ptr,
    dq_ptr,
    dstate_ptr,
    dksum_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
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
    BLOCKS_PER_SPLIT,
    eps,
    FEATURE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dq for the query blocks of one N-split, and that split's partial dS = Σ φ(q_i) g_iᵀ and dz = Σ dden_i φ(q_i).

    With g_i = do_i / den_i and dden_i = -(do_i · num_i) / den_i²: dφ(q_i) = S g_i + dden_i z.
    """
    i_split, i_bh = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(0)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    mask_state = mask_d[:, None] & mask_dv[None, :]
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    do_base = do_ptr + i_b * stride_dob + i_h * stride_doh
    dq_base = dq_ptr + i_b * stride_dqb + i_h * stride_dqh

    state = tl.load(
        state_ptr + i_bh.to(tl.int64) * D * DV + offs_d[:, None] * DV + offs_dv[None, :], mask=mask_state, other=0.0
    )
    ksum = tl.load(ksum_ptr + i_bh.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0)
    dstate = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    dksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    split_start = i_split * BLOCKS_PER_SPLIT * BLOCK_N
    split_end = tl.minimum(split_start + BLOCKS_PER_SPLIT * BLOCK_N, N)
    for start in range(split_start, split_end, BLOCK_N):
        rows = start + offs_n
        mask_n = rows < N
        mask_q = mask_n[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_q, other=0.0)
        q = q.to(tl.float32)
        do = tl.load(
            do_base + rows[:, None] * stride_don + offs_dv[None, :] * stride_dod,
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        ).to(tl.float32)
        q_feat = tl.where(mask_q, _feature(q, FEATURE_MAP), 0.0)  # [BLOCK_N, BLOCK_D]
        numerator = tl.dot(q_feat, state, input_precision=PRECISION)  # [BLOCK_N, BLOCK_DV]
        denominator = tl.sum(q_feat * ksum[None, :], axis=1) + eps  # [BLOCK_N]
        g = do / denominator[:, None]
        d_denominator = -tl.sum(g * numerator, axis=1) / denominator  # [BLOCK_N]
        dq_feat = tl.dot(g, tl.trans(state), input_precision=PRECISION) + d_denominator[:, None] * ksum[None, :]
        dq = dq_feat * _feature_grad(q, FEATURE_MAP)  # [BLOCK_N, BLOCK_D]
        tl.store(
            dq_base + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
            dq.to(dq_ptr.dtype.element_ty),
            mask=mask_q,
        )
        dstate = tl.dot(tl.trans(q_feat), g, dstate, input_precision=PRECISION)  # [BLOCK_D, BLOCK_DV]
        dksum += tl.sum(q_feat * d_denominator[:, None], axis=0)

    partial = i_bh.to(tl.int64) * n_splits + i_split
    tl.store(dstate_ptr + partial * D * DV + offs_d[:, None] * DV + offs_dv[None, :], dstate, mask=mask_state)
    tl.store(dksum_ptr + partial * D + offs_d, dksum, mask=mask_d)


@triton.jit
def _bwd_dkv_kernel(
    k_ptr,
    v_ptr,
    dstate_ptr,
    dksum_ptr,
    dk_ptr,
    dv_ptr,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
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
    FEATURE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dk = (dS v_j + dz) ⊙ φ'(k_j) and dv = dSᵀ φ(k_j) for one key block of one (batch, head)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    rows = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = rows < N
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    mask_k = mask_n[:, None] & mask_d[None, :]
    mask_v = mask_n[:, None] & mask_dv[None, :]

    dstate = tl.load(
        dstate_ptr + i_bh.to(tl.int64) * D * DV + offs_d[:, None] * DV + offs_dv[None, :],
        mask=mask_d[:, None] & mask_dv[None, :],
        other=0.0,
    )
    dksum = tl.load(dksum_ptr + i_bh.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0)
    k = tl.load(
        k_ptr + i_b * stride_kb + i_h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=mask_k,
        other=0.0,
    ).to(tl.float32)
    v = tl.load(
        v_ptr + i_b * stride_vb + i_h * stride_vh + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        mask=mask_v,
        other=0.0,
    ).to(tl.float32)
    k_feat = tl.where(mask_k, _feature(k, FEATURE_MAP), 0.0)  # [BLOCK_N, BLOCK_D]
    dk_feat = tl.dot(v, tl.trans(dstate), input_precision=PRECISION) + dksum[None, :]  # [BLOCK_N, BLOCK_D]
    dk = dk_feat * _feature_grad(k, FEATURE_MAP)
    dv = tl.dot(k_feat, dstate, input_precision=PRECISION)  # [BLOCK_N, BLOCK_DV]
    tl.store(
        dk_ptr + i_b * stride_dkb + i_h * stride_dkh + rows[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        dk.to(dk_ptr.dtype.element_ty),
        mask=mask_k,
    )
    tl.store(
        dv_ptr + i_b * stride_dvb + i_h * stride_dvh + rows[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
        dv.to(dv_ptr.dtype.element_ty),
        mask=mask_v,
    )


def _launch_config(q: torch.Tensor, v: torch.Tensor, backward: bool = False) -> dict:
    """Block sizes, dot precision, warps and stages for these head dims and dtype, forward or backward."""
    if max(q.shape[-1], v.shape[-1]) > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"linear_attention: the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}")
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    block_dv = max(16, triton.next_power_of_2(v.shape[-1]))
    large = block_d * block_dv > 64 * 128
    # fp32 inputs get exact fp32 products; half inputs already carry less precision than tf32. At 128 x 128 the
    # backward's tf32 operand staging would need 168 KiB of shared memory, more than an A100 has: exact fp32 there.
    exact = q.dtype == torch.float32 or (backward and large)
    return {
        "PRECISION": "ieee" if exact else "tf32",
        # Keeps the pipelined dq loop under 160 KiB of shared memory at d = dv = 128 in fp32.
        "BLOCK_N": 32 if large else 64,
        "BLOCK_D": block_d,
        "BLOCK_DV": block_dv,
        "num_warps": 8 if large else 4,
        "num_stages": 2,
    }


def _splits(n: int, block_n: int, batch_heads: int) -> tuple[int, int]:
    """How many N-splits the state reductions use, and how many block_n blocks each covers."""
    n_blocks = triton.cdiv(n, block_n)
    splits = min(n_blocks, max(1, triton.cdiv(TARGET_PROGRAMS, batch_heads)))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    return triton.cdiv(n_blocks, blocks_per_split), blocks_per_split


def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output [B, H, N, dv] and the reduced fp32 state S [B*H, d, dv] and key sum z [B*H, d]."""
    check_launchable("linear_attention", INTERPRETED, q, k, v)
    B, H, N, D = q.shape
    DV = v.shape[-1]
    config = _launch_config(q, v)
    n_splits, blocks_per_split = _splits(N, config["BLOCK_N"], B * H)

    state_partial = torch.empty(B * H, n_splits, D, DV, device=q.device, dtype=torch.float32)
    ksum_partial = torch.empty(B * H, n_splits, D, device=q.device, dtype=torch.float32)
    _fwd_state_kernel[(n_splits, B * H)](
        k, v, state_partial, ksum_partial, *k.stride(), *v.stride(), H, N, D, DV, blocks_per_split,
        FEATURE_MAP=feature_map, **config,
    )  # fmt: skip
    state = state_partial.sum(dim=1)  # [B*H, d, dv]
    ksum = ksum_partial.sum(dim=1)  # [B*H, d]

    o = torch.empty(B, H, N, DV, device=q.device, dtype=q.dtype)
    _fwd_output_kernel[(triton.cdiv(N, config["BLOCK_N"]), B * H)](
        q, state, ksum, o, *q.stride(), *o.stride(), H, N, D, DV, eps,
        FEATURE_MAP=feature_map, **config,
    )  # fmt: skip
    return o, state, ksum


def linear_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    ksum: torch.Tensor,
    do: torch.Tensor,
    feature_map: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv given the forward's reduced state and key sum."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    config = _launch_config(q, v, backward=True)
    n_splits, blocks_per_split = _splits(N, config["BLOCK_N"], B * H)

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dstate_partial = torch.empty(B * H, n_splits, D, DV, device=q.device, dtype=torch.float32)
    dksum_partial = torch.empty(B * H, n_splits, D, device=q.device, dtype=torch.float32)
    _bwd_dq_kernel[(n_splits, B * H)](
        q, do, state, ksum, dq, dstate_partial, dksum_partial, *q.stride(), *do.stride(), *dq.stride(),
        H, N, D, DV, blocks_per_split, eps,
        FEATURE_MAP=feature_map, **config,
    )  # fmt: skip
    dstate = dstate_partial.sum(dim=1)  # [B*H, d, dv]
    dksum = dksum_partial.sum(dim=1)  # [B*H, d]

    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    _bwd_dkv_kernel[(triton.cdiv(N, config["BLOCK_N"]), B * H)](
        k, v, dstate, dksum, dk, dv, *k.stride(), *v.stride(), *dk.stride(), *dv.stride(), H, N, D, DV,
        FEATURE_MAP=feature_map, **config,
    )  # fmt: skip
    return dq, dk, dv


class LinearAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v and the small reduced state; recomputes the rest in backward."""

    @staticmethod
    def forward(ctx, q, k, v, feature_map, eps):
        o, state, ksum = linear_attention_fwd(q, k, v, feature_map, eps)
        ctx.save_for_backward(q, k, v, state, ksum)
        ctx.feature_map = feature_map
        ctx.eps = eps
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, state, ksum = ctx.saved_tensors
        dq, dk, dv = linear_attention_bwd(q, k, v, state, ksum, do, ctx.feature_map, ctx.eps)
        return dq, dk, dv, None, None


def linear_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str = "relu", eps: float = 1e-6
) -> torch.Tensor:
    """Non-causal linear attention on [B, H, N, d] tensors with the Triton kernels."""
    return LinearAttentionFunction.apply(q, k, v, feature_map, eps)
