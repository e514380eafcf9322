"""Triton forward and backward kernels for 2D local (tile) attention, and their autograd.Function.

Tokens are row-major over an h x w grid. A program owns a TH x TW tile of query tokens (64 of them) and walks only
the key tiles covering the bounding box of its queries' windows, [y0 - r, y1 + r] x [x0 - r, x1 + r] clipped to
the grid, so work is O(N · (TH + 2r)(TW + 2r) / (TH · TW)) rather than O(N²); a per-element test keeps each
query's own window (square or circle). FlashAttention-2 structure otherwise: online softmax and the base-2 row
log-sum-exp forward; dq walking the same boxes, dk and dv walking each key tile's box of queries (the window is
symmetric, so the queries that see a key tile lie in the same box around it).
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

LOG2E = 1.4426950408889634
TILE_TOKENS = 64


@triton.jit
def _in_window(qy, qx, ky, kx, R, SHAPE: tl.constexpr):
    """[len(q), len(k)] bool: key (ky, kx) within radius R of query (qy, qx), square or circle."""
    dy = ky[None, :] - qy[:, None]
    dx = kx[None, :] - qx[:, None]
    if SHAPE == "square":
        inside = (tl.abs(dy) <= R) & (tl.abs(dx) <= R)
    else:
        inside = dy * dy + dx * dx < R * R
    return inside


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
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
    GH,
    GW,
    R,
    D,
    DV,
    qk_scale,
    SHAPE: tl.constexpr,
    PRECISION: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Online softmax over the key tiles of one query tile's window box; writes o and the base-2 log-sum-exp."""
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    N = GH * GW
    ty, tx = i_tile // tl.cdiv(GW, TW), i_tile % tl.cdiv(GW, TW)
    offs_t = tl.arange(0, TH * TW)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    qy = ty * TH + offs_t // TW
    qx = tx * TW + offs_t % TW
    mask_q = (qy < GH) & (qx < GW)
    rows = qy * GW + qx
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh

    q = tl.load(
        q_ptr + i_b * stride_qb + i_h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_q[:, None] & mask_d[None, :],
        other=0.0,
    )
    row_max = tl.full([TH * TW], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([TH * TW], dtype=tl.float32)
    acc = tl.zeros([TH * TW, BLOCK_DV], dtype=tl.float32)
    y_lo, y_hi = tl.maximum(ty * TH - R, 0), tl.minimum(ty * TH + TH - 1 + R, GH - 1)
    x_lo, x_hi = tl.maximum(tx * TW - R, 0), tl.minimum(tx * TW + TW - 1 + R, GW - 1)
    for ky0 in range(y_lo, y_hi + 1, TH):
        for kx0 in range(x_lo, x_hi + 1, TW):
            ky = ky0 + offs_t // TW
            kx = kx0 + offs_t % TW
            mask_k = (ky <= y_hi) & (kx <= x_hi)
            cols = ky * GW + kx
            k = tl.load(
                k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_k[:, None] & mask_d[None, :],
                other=0.0,
            )
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=mask_k[:, None] & mask_dv[None, :],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [TILE, TILE], base-2 logits
            allowed = mask_k[None, :] & _in_window(qy, qx, ky, kx, R, SHAPE)
            s = tl.where(allowed, s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            # A row may see no key of this tile (and of none before it): keep its exponents finite.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            alpha = tl.exp2(row_max - safe_max)
            p = tl.exp2(s - safe_max[:, None])
            row_sum = row_sum * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # [TILE, BLOCK_DV]
            row_max = new_max

    # Every query on the grid sees itself; only padding rows (never stored) can have row_sum = 0.
    row_sum = tl.where(row_sum > 0, row_sum, 1.0)
    o = acc / row_sum[:, None]
    tl.store(
        o_ptr + i_b * stride_ob + i_h * stride_oh + rows[:, None] * stride_on + offs_dv[None, :] * stride_od,
        o.to(o_ptr.dtype.element_ty),
        mask=mask_q[:, None] & mask_dv[None, :],
    )
    tl.store(lse_ptr + i_bh.to(tl.int64) * N + rows, row_max + tl.log2(row_sum), mask=mask_q)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
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
    GH,
    GW,
    R,
    D,
    DV,
    qk_scale,
    sm_scale,
    SHAPE: tl.constexpr,
    PRECISION: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dq = scale Σ_j p_ij (dp_ij - δ_i) k_j over the window box of one query tile."""
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    N = GH * GW
    ty, tx = i_tile // tl.cdiv(GW, TW), i_tile % tl.cdiv(GW, TW)
    offs_t = tl.arange(0, TH * TW)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    qy = ty * TH + offs_t // TW
    qx = tx * TW + offs_t % TW
    mask_q = (qy < GH) & (qx < GW)
    rows = qy * GW + qx
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh

    q = tl.load(
        q_ptr + i_b * stride_qb + i_h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_q[:, None] & mask_d[None, :],
        other=0.0,
    )
    do = tl.load(
        do_ptr + i_b * stride_dob + i_h * stride_doh + rows[:, None] * stride_don + offs_dv[None, :] * stride_dod,
        mask=mask_q[:, None] & mask_dv[None, :],
        other=0.0,
    )
    lse = tl.load(lse_ptr + i_bh.to(tl.int64) * N + rows, mask=mask_q, other=0.0)
    delta = tl.load(delta_ptr + i_bh.to(tl.int64) * N + rows, mask=mask_q, other=0.0)
    dq = tl.zeros([TH * TW, BLOCK_D], dtype=tl.float32)
    y_lo, y_hi = tl.maximum(ty * TH - R, 0), tl.minimum(ty * TH + TH - 1 + R, GH - 1)
    x_lo, x_hi = tl.maximum(tx * TW - R, 0), tl.minimum(tx * TW + TW - 1 + R, GW - 1)
    for ky0 in range(y_lo, y_hi + 1, TH):
        for kx0 in range(x_lo, x_hi + 1, TW):
            ky = ky0 + offs_t // TW
            kx = kx0 + offs_t % TW
            mask_k = (ky <= y_hi) & (kx <= x_hi)
            cols = ky * GW + kx
            k = tl.load(
                k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_k[:, None] & mask_d[None, :],
                other=0.0,
            )
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=mask_k[:, None] & mask_dv[None, :],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [TILE, TILE]
            allowed = mask_q[:, None] & mask_k[None, :] & _in_window(qy, qx, ky, kx, R, SHAPE)
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [TILE, TILE]
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # [TILE, BLOCK_D]
    tl.store(
        dq_ptr + i_b * stride_dqb + i_h * stride_dqh + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
        (dq * sm_scale).to(dq_ptr.dtype.element_ty),
        mask=mask_q[:, None] & mask_d[None, :],
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
    GH,
    GW,
    R,
    D,
    DV,
    qk_scale,
    sm_scale,
    SHAPE: tl.constexpr,
    PRECISION: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """dv = Σ_i p_ijᵀ do_i and dk = scale Σ_i ds_ijᵀ q_i over the queries whose windows reach this key tile."""
    i_tile, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    N = GH * GW
    ty, tx = i_tile // tl.cdiv(GW, TW), i_tile % tl.cdiv(GW, TW)
    offs_t = tl.arange(0, TH * TW)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    ky = ty * TH + offs_t // TW
    kx = tx * TW + offs_t % TW
    mask_k = (ky < GH) & (kx < GW)
    cols = ky * GW + kx
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    do_base = do_ptr + i_b * stride_dob + i_h * stride_doh

    k = tl.load(
        k_ptr + i_b * stride_kb + i_h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=mask_k[:, None] & mask_d[None, :],
        other=0.0,
    )
    v = tl.load(
        v_ptr + i_b * stride_vb + i_h * stride_vh + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        mask=mask_k[:, None] & mask_dv[None, :],
        other=0.0,
    )
    dk = tl.zeros([TH * TW, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([TH * TW, BLOCK_DV], dtype=tl.float32)
    y_lo, y_hi = tl.maximum(ty * TH - R, 0), tl.minimum(ty * TH + TH - 1 + R, GH - 1)
    x_lo, x_hi = tl.maximum(tx * TW - R, 0), tl.minimum(tx * TW + TW - 1 + R, GW - 1)
    for qy0 in range(y_lo, y_hi + 1, TH):
        for qx0 in range(x_lo, x_hi + 1, TW):
            qy = qy0 + offs_t // TW
            qx = qx0 + offs_t % TW
            mask_q = (qy <= y_hi) & (qx <= x_hi)
            rows = qy * GW + qx
            q = tl.load(
                q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_q[:, None] & mask_d[None, :],
                other=0.0,
            )
            do = tl.load(
                do_base + rows[:, None] * stride_don + offs_dv[None, :] * stride_dod,
                mask=mask_q[:, None] & mask_dv[None, :],
                other=0.0,
            )
            lse = tl.load(lse_ptr + i_bh.to(tl.int64) * N + rows, mask=mask_q, other=0.0)
            delta = tl.load(delta_ptr + i_bh.to(tl.int64) * N + rows, mask=mask_q, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [TILE, TILE], rows are queries
            allowed = mask_q[:, None] & mask_k[None, :] & _in_window(qy, qx, ky, kx, R, SHAPE)
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dv = tl.dot(tl.trans(p).to(do.dtype), do, dv, input_precision=PRECISION)  # [TILE, BLOCK_DV]
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [TILE, TILE]
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk, input_precision=PRECISION)  # [TILE, BLOCK_D]
    tl.store(
        dk_ptr + i_b * stride_dkb + i_h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        (dk * sm_scale).to(dk_ptr.dtype.element_ty),
        mask=mask_k[:, None] & mask_d[None, :],
    )
    tl.store(
        dv_ptr + i_b * stride_dvb + i_h * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
        dv.to(dv_ptr.dtype.element_ty),
        mask=mask_k[:, None] & mask_dv[None, :],
    )


def tile_shape(grid: tuple[int, int]) -> tuple[int, int]:
    """(TH, TW) of a 64-token tile: up to 8 columns wide, narrower on grids narrower than that."""
    tw = min(8, triton.next_power_of_2(grid[1]))
    return TILE_TOKENS // tw, tw


def _launch_config(q: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], shape: str) -> dict:
    """Tile shape, dot precision, warps and stages for these head dims, dtype and grid."""
    if max(q.shape[-1], v.shape[-1]) > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"tile_attention: the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}")
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    block_dv = max(16, triton.next_power_of_2(v.shape[-1]))
    th, tw = tile_shape(grid)
    return {
        "SHAPE": shape,
        # fp32 inputs get exact fp32 products; half inputs already carry less precision than tf32.
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "TH": th,
        "TW": tw,
        "BLOCK_D": block_d,
        "BLOCK_DV": block_dv,
        "num_warps": 8 if max(block_d, block_dv) > 64 else 4,
        "num_stages": 2,
    }


def _n_tiles(grid: tuple[int, int], config: dict) -> int:
    return triton.cdiv(grid[0], config["TH"]) * triton.cdiv(grid[1], config["TW"])


def tile_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window: int, shape: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [B, H, N, dv] and the base-2 row log-sum-exp [B*H, N] (fp32)."""
    check_launchable("tile_attention", INTERPRETED, q, k, v)
    B, H, N, D = q.shape
    DV = v.shape[-1]
    config = _launch_config(q, v, grid, shape)
    sm_scale = D**-0.5

    o = torch.empty(B, H, N, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
    _fwd_kernel[(_n_tiles(grid, config), B * H)](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, grid[0], grid[1], window, D, DV, sm_scale * LOG2E, **config,
    )  # fmt: skip
    return o, lse


def tile_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    grid: tuple[int, int],
    window: int,
    shape: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv given the forward's output and row log-sum-exp."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    config = _launch_config(q, v, grid, shape)
    sm_scale = D**-0.5
    delta = (do.float() * o.float()).sum(dim=-1)  # [B, H, N]
    launch = (_n_tiles(grid, config), B * H)

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    _bwd_dq_kernel[launch](
        q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, grid[0], grid[1], window, D, DV, sm_scale * LOG2E, sm_scale, **config,
    )  # fmt: skip
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    _bwd_dkv_kernel[launch](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, grid[0], grid[1], window, D, DV, sm_scale * LOG2E, sm_scale, **config,
    )  # fmt: skip
    return dq, dk, dv


class TileAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, grid, window, shape):
        o, lse = tile_attention_fwd(q, k, v, grid, window, shape)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.grid, ctx.window, ctx.shape = grid, window, shape
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = tile_attention_bwd(q, k, v, o, lse, do, ctx.grid, ctx.window, ctx.shape)
        return dq, dk, dv, None, None, None


def tile_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window: int, shape: str = "square"
) -> torch.Tensor:
    """2D local attention on [B, H, N, d] tensors with the Triton kernels."""
    # A radius of h + w already covers the grid in either shape; capping it keeps the int32 index math in range.
    return TileAttentionFunction.apply(q, k, v, tuple(grid), min(window, grid[0] + grid[1]), shape)
