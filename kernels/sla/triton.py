"""Triton kernels for SLA's marginal linear part, its autograd.Function, and the two parts together.

The sparse part is block-sparse attention over the critical map: block_sparse's kernels run it. The linear part is
linear attention restricted, per query block I, to its marginal key blocks. Per key block J the kernels form the
fp32 state S_J = φ(K_J)ᵀ V_J and key sum z_J = Σ_j φ(k_j); query block I then needs A_I = Σ_{J marginal for I} S_J
(z alike), accumulated directly over the marginal blocks: never as a total minus the other blocks, which cancels.
That sum is the product of the 0/1 marginal map with the stacked block states, so it runs as a tiled matrix
product (each state read once per tile of query blocks, not once per query block), in tf32x3 on GPUs: the map's
entries are exact, so only the states' own rounding to two tf32 halves (~2⁻²² relative) is lost.
The backward is the same chain transposed: per query block dq and dA_I = Σ_i φ(q_i) g_iᵀ, then
dS_J = Σ_{I: J marginal for I} dA_I by the same product with the transposed map, then dk, dv per key tile.
A_I is recomputed in the backward rather than saved: it is 4× the size of q at d = dv = 128, block 64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._dispatch import check_launchable, interpret_requested, triton_interpreting
from ..block_sparse.triton import block_sparse_attention_triton
from ..linear_attention.triton import _feature, _feature_grad
from . import MAX_TRITON_HEAD_DIM

# Triton decides interpreter-or-GPU when a kernel is decorated: the kernels below now, its own helpers at its import.
INTERPRETED = interpret_requested() and triton_interpreting()

# Tiles of the masked block sum: map rows (query blocks) x state columns, reduced over map columns (key blocks).
# The CPU interpreter pays per program, not per element: wider column tiles there (tests/kernels/test_sla.py runs
# the GPU's width too).
SUM_BLOCK_R = 64
SUM_BLOCK_J = 32
SUM_BLOCK_C = 1024 if INTERPRETED else 128


@triton.jit
def _block_state_kernel(
    k_ptr,
    v_ptr,
    x_ptr,
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
    N_BLOCKS,
    C,
    FEATURE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Row J of x: S_J = Σ_{j in block J} φ(k_j) v_jᵀ (row-major, d x dv), then z_J = Σ φ(k_j)."""
    i_blk, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh

    state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(i_blk * BLOCK, tl.minimum(i_blk * BLOCK + BLOCK, N), TILE):
        rows = start + offs_t
        mask_n = rows < N
        mask_k = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_k, other=0.0)
        v = tl.load(
            v_base + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        )
        # Padded rows and columns must stay zero: elu1 maps 0 to 1.
        k_feat = tl.where(mask_k, _feature(k.to(tl.float32), FEATURE_MAP), 0.0)  # [TILE, BLOCK_D]
        state = tl.dot(tl.trans(k_feat.to(v.dtype)), v, state, input_precision=PRECISION)  # [BLOCK_D, BLOCK_DV]
        ksum += tl.sum(k_feat, axis=0)

    x_row = x_ptr + (i_bh.to(tl.int64) * N_BLOCKS + i_blk) * C
    tl.store(x_row + offs_d[:, None] * DV + offs_dv[None, :], state, mask=mask_d[:, None] & mask_dv[None, :])
    tl.store(x_row + D * DV + offs_d, ksum, mask=mask_d)


@triton.jit
def _masked_block_sum_kernel(
    m_ptr,
    x_ptr,
    y_ptr,
    R,
    J,
    C,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y[r, c] = Σ_j m[r, j] x[j, c] for one (batch, head): a 0/1 map [R, J] times fp32 rows [J, C]."""
    i_r, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_j = tl.arange(0, BLOCK_J)
    mask_r = rows < R
    mask_c = cols < C
    m_base = m_ptr + i_bh.to(tl.int64) * R * J
    x_base = x_ptr + i_bh.to(tl.int64) * J * C

    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for j_start in range(0, J, BLOCK_J):
        js = j_start + offs_j
        mask_j = js < J
        m = tl.load(m_base + rows[:, None] * J + js[None, :], mask=mask_r[:, None] & mask_j[None, :], other=0)
        m = m.to(tl.float32)  # [BLOCK_R, BLOCK_J]
        # Chunks of the map with nothing kept (negligible or critical blocks only) cost no product.
        if tl.max(m) > 0:
            x = tl.load(x_base + js[:, None] * C + cols[None, :], mask=mask_j[:, None] & mask_c[None, :], other=0.0)
            acc = tl.dot(m, x, acc, input_precision=PRECISION)  # [BLOCK_R, BLOCK_C]
    y_base = y_ptr + i_bh.to(tl.int64) * R * C
    tl.store(y_base + rows[:, None] * C + cols[None, :], acc, mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def _fwd_kernel(
    q_ptr,
    y_ptr,
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
    N_BLOCKS,
    C,
    eps,
    FEATURE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """o = φ(q) A_I / (φ(q)·z_I + eps) for one query tile of query block I."""
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_blk = i_tile // (BLOCK // TILE)
    rows = i_tile * TILE + tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = rows < N
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    mask_q = mask_n[:, None] & mask_d[None, :]

    y_row = y_ptr + (i_bh.to(tl.int64) * N_BLOCKS + i_blk) * C
    mask_state = mask_d[:, None] & mask_dv[None, :]
    state = tl.load(y_row + offs_d[:, None] * DV + offs_dv[None, :], mask=mask_state, other=0.0)
    ksum = tl.load(y_row + D * DV + offs_d, mask=mask_d, other=0.0)
    q = tl.load(
        q_ptr + i_b * stride_qb + i_h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_q,
        other=0.0,
    )
    q_feat = tl.where(mask_q, _feature(q.to(tl.float32), FEATURE_MAP), 0.0)  # [TILE, BLOCK_D]
    numerator = tl.dot(q_feat, state, input_precision=PRECISION)  # [TILE, BLOCK_DV]
    denominator = tl.sum(q_feat * ksum[None, :], axis=1) + eps  # [TILE]
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
    y_ptr,
    dq_ptr,
    dy_ptr,
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
    N_BLOCKS,
    C,
    eps,
    FEATURE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dq for query block I, and row I of dy: dA_I = Σ_i φ(q_i) g_iᵀ, then dz_I = Σ_i dden_i φ(q_i).

    With g_i = do_i / den_i and dden_i = -(do_i · num_i) / den_i²: dφ(q_i) = A_I g_i + dden_i z_I.
    """
    i_blk, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    mask_state = mask_d[:, None] & mask_dv[None, :]
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    do_base = do_ptr + i_b * stride_dob + i_h * stride_doh
    dq_base = dq_ptr + i_b * stride_dqb + i_h * stride_dqh

    y_row = y_ptr + (i_bh.to(tl.int64) * N_BLOCKS + i_blk) * C
    state = tl.load(y_row + offs_d[:, None] * DV + offs_dv[None, :], mask=mask_state, other=0.0)
    ksum = tl.load(y_row + D * DV + offs_d, mask=mask_d, other=0.0)
    dstate = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    dksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(i_blk * BLOCK, tl.minimum(i_blk * BLOCK + BLOCK, N), TILE):
        rows = start + offs_t
        mask_n = rows < N
        mask_q = mask_n[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_q, other=0.0)
        q = q.to(tl.float32)
        do = tl.load(
            do_base + rows[:, None] * stride_don + offs_dv[None, :] * stride_dod,
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        ).to(tl.float32)
        q_feat = tl.where(mask_q, _feature(q, FEATURE_MAP), 0.0)  # [TILE, BLOCK_D]
        numerator = tl.dot(q_feat, state, input_precision=PRECISION)  # [TILE, BLOCK_DV]
        denominator = tl.sum(q_feat * ksum[None, :], axis=1) + eps  # [TILE]
        g = do / denominator[:, None]
        d_denominator = -tl.sum(g * numerator, axis=1) / denominator  # [TILE]
        dq_feat = tl.dot(g, tl.trans(state), input_precision=PRECISION) + d_denominator[:, None] * ksum[None, :]
        dq = dq_feat * _feature_grad(q, FEATURE_MAP)  # [TILE, BLOCK_D]
        tl.store(
            dq_base + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
            dq.to(dq_ptr.dtype.element_ty),
            mask=mask_q,
        )
        dstate = tl.dot(tl.trans(q_feat), g, dstate, input_precision=PRECISION)  # [BLOCK_D, BLOCK_DV]
        dksum += tl.sum(q_feat * d_denominator[:, None], axis=0)

    dy_row = dy_ptr + (i_bh.to(tl.int64) * N_BLOCKS + i_blk) * C
    tl.store(dy_row + offs_d[:, None] * DV + offs_dv[None, :], dstate, mask=mask_state)
    tl.store(dy_row + D * DV + offs_d, dksum, mask=mask_d)


@triton.jit
def _bwd_dkv_kernel(
    k_ptr,
    v_ptr,
    dx_ptr,
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
    N_BLOCKS,
    C,
    FEATURE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dk = (dS_J v_j + dz_J) ⊙ φ'(k_j) and dv = dS_Jᵀ φ(k_j) for one key tile of key block J."""
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_blk = i_tile // (BLOCK // TILE)
    rows = i_tile * TILE + tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = rows < N
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    mask_k = mask_n[:, None] & mask_d[None, :]
    mask_v = mask_n[:, None] & mask_dv[None, :]

    dx_row = dx_ptr + (i_bh.to(tl.int64) * N_BLOCKS + i_blk) * C
    mask_state = mask_d[:, None] & mask_dv[None, :]
    dstate = tl.load(dx_row + offs_d[:, None] * DV + offs_dv[None, :], mask=mask_state, other=0.0)
    dksum = tl.load(dx_row + D * DV + offs_d, mask=mask_d, other=0.0)
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
    k_feat = tl.where(mask_k, _feature(k, FEATURE_MAP), 0.0)  # [TILE, BLOCK_D]
    dk_feat = tl.dot(v, tl.trans(dstate), input_precision=PRECISION) + dksum[None, :]  # [TILE, BLOCK_D]
    dk = dk_feat * _feature_grad(k, FEATURE_MAP)
    dv = tl.dot(k_feat, dstate, input_precision=PRECISION)  # [TILE, BLOCK_DV]
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


def _launch_config(q: torch.Tensor, v: torch.Tensor, block: int, backward: bool = False) -> dict:
    """Tile size, dot precision, warps and stages for these head dims, dtype and block, forward or backward."""
    if max(q.shape[-1], v.shape[-1]) > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"sla_attention: the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}")
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    block_dv = max(16, triton.next_power_of_2(v.shape[-1]))
    large = block_d * block_dv > 64 * 128
    # As linear_attention: exact fp32 products for fp32 inputs, and for the backward's 128 x 128 states.
    exact = q.dtype == torch.float32 or (backward and large)
    return {
        "PRECISION": "ieee" if exact else "tf32",
        # A [d, dv] fp32 state and a [TILE, d] tile share the registers: smaller tiles past 64 x 128.
        "TILE": min(block, 32 if large else 64),
        "BLOCK": block,
        "BLOCK_D": block_d,
        "BLOCK_DV": block_dv,
        "num_warps": 8 if large else 4,
        "num_stages": 2,
    }


def _sum_precision(x: torch.Tensor) -> str:
    """tf32x3 where tensor cores take tf32 (fp32-accurate here, the map being exact), plain fp32 elsewhere."""
    if INTERPRETED or not x.is_cuda or torch.version.hip is not None:
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(x.device) >= (8, 0) else "ieee"


def block_states(k: torch.Tensor, v: torch.Tensor, block: int, feature_map: str, config: dict) -> torch.Tensor:
    """Per key block, [S_J flattened (d * dv) | z_J (d)] in fp32: [B*H, n_blocks, d * dv + d]."""
    B, H, N, D = k.shape
    DV = v.shape[-1]
    n_blocks = triton.cdiv(N, block)
    x = torch.empty(B * H, n_blocks, D * DV + D, device=k.device, dtype=torch.float32)
    _block_state_kernel[(n_blocks, B * H)](
        k, v, x, *k.stride(), *v.stride(), H, N, D, DV, n_blocks, x.shape[-1],
        FEATURE_MAP=feature_map, **config,
    )  # fmt: skip
    return x


def masked_block_sum(block_map: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y[bh, r] = Σ_j block_map[bh, r, j] x[bh, j]: a bool map [B*H, R, J] (contiguous) and fp32 rows [B*H, J, C]."""
    BH, R, J = block_map.shape
    C = x.shape[-1]
    y = torch.empty(BH, R, C, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(R, SUM_BLOCK_R), triton.cdiv(C, SUM_BLOCK_C), BH)
    _masked_block_sum_kernel[grid](
        block_map, x, y, R, J, C, PRECISION=_sum_precision(x),
        BLOCK_R=SUM_BLOCK_R, BLOCK_J=SUM_BLOCK_J, BLOCK_C=SUM_BLOCK_C, num_warps=4, num_stages=2,
    )  # fmt: skip
    return y


def marginal_linear_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index_marginal: torch.Tensor,
    block: int,
    feature_map: str,
    eps: float,
) -> torch.Tensor:
    """The linear part [B, H, N, dv] in q's dtype."""
    check_launchable("sla_attention", INTERPRETED, q, k, v)
    B, H, N, D = q.shape
    DV = v.shape[-1]
    config = _launch_config(q, v, block)
    x = block_states(k, v, block, feature_map, config)  # [B*H, nk, C]
    y = masked_block_sum(block_index_marginal.flatten(0, 1).contiguous(), x)  # [B*H, nq, C]

    o = torch.empty(B, H, N, DV, device=q.device, dtype=q.dtype)
    _fwd_kernel[(triton.cdiv(N, config["TILE"]), B * H)](
        q, y, o, *q.stride(), *o.stride(), H, N, D, DV, y.shape[1], y.shape[-1], eps,
        FEATURE_MAP=feature_map, **config,
    )  # fmt: skip
    return o


def marginal_linear_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index_marginal: torch.Tensor,
    do: torch.Tensor,
    block: int,
    feature_map: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of the linear part, recomputing the aggregated states A_I."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    config = _launch_config(q, v, block, backward=True)
    marginal = block_index_marginal.flatten(0, 1)  # [B*H, nq, nk]
    x = block_states(k, v, block, feature_map, config)  # [B*H, nk, C]
    y = masked_block_sum(marginal.contiguous(), x)  # [B*H, nq, C]
    n_blocks, C = y.shape[1], y.shape[-1]

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dy = torch.empty_like(y)
    _bwd_dq_kernel[(n_blocks, B * H)](
        q, do, y, dq, dy, *q.stride(), *do.stride(), *dq.stride(), H, N, D, DV, n_blocks, C, eps,
        FEATURE_MAP=feature_map, **config,
    )  # fmt: skip
    del y
    dx = masked_block_sum(marginal.transpose(-1, -2).contiguous(), dy)  # [B*H, nk, C]

    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    _bwd_dkv_kernel[(triton.cdiv(N, config["TILE"]), B * H)](
        k, v, dx, dk, dv, *k.stride(), *v.stride(), *dk.stride(), *dv.stride(), H, N, D, DV, n_blocks, C,
        FEATURE_MAP=feature_map, **config,
    )  # fmt: skip
    return dq, dk, dv


class MarginalLinearAttentionFunction(torch.autograd.Function):
    """Autograd wrapper for the linear part: saves q, k, v and the marginal map; recomputes the block states."""

    @staticmethod
    def forward(ctx, q, k, v, block_index_marginal, block, feature_map, eps):
        o = marginal_linear_fwd(q, k, v, block_index_marginal, block, feature_map, eps)
        ctx.save_for_backward(q, k, v, block_index_marginal)
        ctx.block, ctx.feature_map, ctx.eps = block, feature_map, eps
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, block_index_marginal = ctx.saved_tensors
        dq, dk, dv = marginal_linear_bwd(q, k, v, block_index_marginal, do, ctx.block, ctx.feature_map, ctx.eps)
        return dq, dk, dv, None, None, None, None


def sla_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index_critical: torch.Tensor,
    block_index_marginal: torch.Tensor,
    block: int = 64,
    feature_map: str = "relu",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_sparse, o_linear) on [B, H, N, d] tensors with the Triton kernels."""
    o_sparse = block_sparse_attention_triton(q, k, v, block_index_critical, block)
    o_linear = MarginalLinearAttentionFunction.apply(q, k, v, block_index_marginal, block, feature_map, eps)
    return o_sparse, o_linear
