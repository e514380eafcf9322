"""Block-sparse attention: the reference against SDPA and float64, the Triton kernels against float64, top-k maps."""

import math

import pytest
import torch
import torch.nn.functional as F
from dit_graft.kernels import block_sparse_attention, topk_block_index
from dit_graft.kernels.block_sparse.index import kept_block_lists, mean_pool_blocks
from dit_graft.kernels.block_sparse.naive import block_sparse_attention_naive
from dit_graft.kernels.testing import assert_close

# (B, H, N, d, dv, block): N not a multiple of block, N = 1, blocks larger than a 64-token tile with a last block
# shorter than one tile, head dims that are not powers of two, d != dv.
SHAPES = [
    (1, 2, 100, 40, 40, 32),
    (2, 1, 63, 72, 72, 16),
    (1, 1, 150, 40, 24, 128),
    (1, 2, 1, 16, 16, 16),
    (2, 2, 64, 96, 64, 64),
]


def _inputs(B, H, N, D, DV, seed=0):
    """Float64 q, k, v and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    do = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    return q, k, v, do


def _random_map(B, H, N, block, seed=0):
    """A random block map with one empty and one full query-block row."""
    n_blocks = math.ceil(N / block)
    gen = torch.Generator().manual_seed(seed)
    block_index = torch.rand(B, H, n_blocks, n_blocks, generator=gen) < 0.5
    block_index[0, 0, 0] = False
    block_index[-1, -1, -1] = True
    return block_index


def _run(fn, q, k, v, do, dtype, device, *args):
    """fn's output and (dq, dk, dv) with q, k, v cast to dtype on device."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    o = fn(*leaves, *(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
    grads = torch.autograd.grad(o, leaves, do.to(device=device, dtype=dtype))
    return o, grads


def _check(ref, got, tol):
    """Compares output and dq, dk, dv (with one key per row, dq and dk are zero up to rounding)."""
    (o_ref, grads_ref), (o, grads) = ref, got
    assert o.dtype == grads[0].dtype
    assert_close("o", o_ref, o.cpu(), tol)
    for name, g_ref, g in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, g_ref, g.cpu(), tol, atol=1e-6)


def _sdpa(q, k, v, block_index, block):
    """Dense attention, ignoring the map."""
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize(("B", "H", "N", "D", "DV", "block"), SHAPES)
def test_naive_full_map_matches_sdpa(B, H, N, D, DV, block):
    q, k, v, do = _inputs(B, H, N, D, DV)
    full = torch.ones(B, H, math.ceil(N / block), math.ceil(N / block), dtype=torch.bool)
    ref = _run(_sdpa, q, k, v, do, torch.float64, "cpu", full, block)
    got = _run(block_sparse_attention_naive, q, k, v, do, torch.float64, "cpu", full, block)
    _check(ref, got, 1e-12)


@pytest.mark.parametrize(("B", "H", "N", "D", "DV", "block"), SHAPES)
def test_naive_fp32_matches_float64(B, H, N, D, DV, block):
    q, k, v, do = _inputs(B, H, N, D, DV)
    block_index = _random_map(B, H, N, block)
    ref = _run(block_sparse_attention_naive, q, k, v, do, torch.float64, "cpu", block_index, block)
    got = _run(block_sparse_attention_naive, q, k, v, do, torch.float32, "cpu", block_index, block)
    assert got[0].dtype == torch.float32
    _check(ref, got, 1e-5)


def test_naive_empty_rows_give_zeros():
    q, k, v, do = _inputs(1, 1, 40, 16, 16)
    block_index = torch.tensor([[[[False, False, False], [True, False, True], [False, False, False]]]])
    o, (dq, dk, dv) = _run(block_sparse_attention_naive, q, k, v, do, torch.float64, "cpu", block_index, 16)
    assert (o[..., :16, :] == 0).all() and (o[..., 32:, :] == 0).all() and (o[..., 16:32, :] != 0).all()
    assert (dq[..., :16, :] == 0).all() and (dk[..., 16:32, :] == 0).all()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize(("B", "H", "N", "D", "DV", "block"), SHAPES)
def test_triton_fp32_matches_float64(triton_backend, B, H, N, D, DV, block):
    q, k, v, do = _inputs(B, H, N, D, DV)
    block_index = _random_map(B, H, N, block)
    ref = _run(block_sparse_attention_naive, q, k, v, do, torch.float64, "cpu", block_index, block)
    got = _run(block_sparse_attention, q, k, v, do, torch.float32, triton_backend, block_index, block)
    _check(ref, got, 1e-4)


@pytest.mark.parametrize("block", [16, 128])
def test_triton_full_map_matches_sdpa(triton_backend, block):
    q, k, v, do = _inputs(1, 2, 100, 40, 40, seed=1)
    full = torch.ones(1, 2, math.ceil(100 / block), math.ceil(100 / block), dtype=torch.bool)
    ref = _run(_sdpa, q, k, v, do, torch.float64, "cpu", full, block)
    got = _run(block_sparse_attention, q, k, v, do, torch.float32, triton_backend, full, block)
    _check(ref, got, 1e-4)


def test_triton_empty_map_gives_zeros(triton_backend):
    q, k, v, do = _inputs(2, 1, 50, 40, 40, seed=2)
    empty = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    o, grads = _run(block_sparse_attention, q, k, v, do, torch.float32, triton_backend, empty, 32)
    for t in (o, *grads):
        assert (t == 0).all()


def test_triton_fp16_matches_float64(triton_backend):
    q, k, v, do = _inputs(2, 2, 63, 72, 40, seed=3)
    block_index = _random_map(2, 2, 63, 16, seed=3)
    ref = _run(block_sparse_attention_naive, q, k, v, do, torch.float64, "cpu", block_index, 16)
    got = _run(block_sparse_attention, q, k, v, do, torch.float16, triton_backend, block_index, 16)
    assert got[0].dtype == torch.float16
    _check(ref, got, 5e-3)


def test_triton_takes_strided_inputs(triton_backend):
    q, k, v, do = _inputs(2, 3, 40, 40, 40, seed=4)
    block_index = _random_map(2, 3, 40, 16, seed=4)
    ref = _run(block_sparse_attention_naive, q, k, v, do, torch.float64, "cpu", block_index, 16)
    leaves = [t.to(device=triton_backend, dtype=torch.float32).requires_grad_() for t in (q, k, v)]
    # Same values laid out as [B, N, H, d] projections: the kernels take strides, nothing is copied.
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (*leaves, do.to(triton_backend).float())]
    assert not strided[0].is_contiguous()
    o = block_sparse_attention(*strided[:3], block_index.to(triton_backend), 16)
    grads = torch.autograd.grad(o, leaves, strided[3])
    _check(ref, (o, grads), 1e-4)


def test_triton_writes_every_output_element(triton_backend):
    assert torch.empty(2).isnan().all(), "the conftest should make torch.empty return NaN"
    q, k, v, do = _inputs(1, 2, 65, 72, 40, seed=5)
    block_index = _random_map(1, 2, 65, 32, seed=5)
    o, grads = _run(block_sparse_attention, q, k, v, do, torch.float32, triton_backend, block_index, 32)
    for t in (o, *grads):
        assert torch.isfinite(t).all()


def test_kept_block_lists():
    block_map = torch.tensor([[[[False, True, False, True], [False, False, False, False], [True, True, True, True]]]])
    index, count = kept_block_lists(block_map)
    assert count.tolist() == [[2, 0, 4]]
    assert index[0, 0, :2].tolist() == [1, 3] and index[0, 2].tolist() == [0, 1, 2, 3]
    assert index.dtype == count.dtype == torch.int32


def test_mean_pool_blocks_averages_the_short_last_block():
    x = torch.arange(5, dtype=torch.float32).view(1, 1, 5, 1)
    assert mean_pool_blocks(x, 2).flatten().tolist() == [0.5, 2.5, 4.0]


def test_topk_block_index_keeps_the_best_scoring_blocks():
    q, k, _, _ = _inputs(2, 3, 100, 16, 16, seed=6)
    block_index = topk_block_index(q, k, 16, 3)
    assert block_index.shape == (2, 3, 7, 7) and block_index.dtype == torch.bool
    assert (block_index.sum(dim=-1) == 3).all()
    starts = range(0, 100, 16)
    q_means = torch.stack([q[:, :, s : s + 16].mean(dim=2) for s in starts], dim=2)  # [B, H, 7, d]
    k_means = torch.stack([k[:, :, s : s + 16].mean(dim=2) for s in starts], dim=2)
    scores = q_means @ k_means.transpose(-1, -2)  # [B, H, 7, 7]
    kept_min = scores.masked_fill(~block_index, float("inf")).amin(dim=-1)
    dropped_max = scores.masked_fill(block_index, float("-inf")).amax(dim=-1)
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize(("keep", "per_row"), [(1.0, 7), (0.01, 1), (0.3, 3), (2, 2), (100, 7)])
def test_topk_block_index_keep(keep, per_row):
    q, k, _, _ = _inputs(1, 2, 100, 16, 16, seed=7)
    assert (topk_block_index(q, k, 16, keep).sum(dim=-1) == per_row).all()


def test_topk_block_index_feeds_block_sparse_attention():
    q, k, v, _ = _inputs(1, 2, 100, 16, 16, seed=8)
    block_index = topk_block_index(q, k, 32, 0.5)
    assert block_sparse_attention(q, k, v, block_index, 32).shape == v.shape


@pytest.mark.parametrize(
    ("keep", "match"),
    [(0, "at least 1"), (0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), (True, "int count or a float"), ("1", "int")],
)
def test_topk_block_index_rejects_bad_keep(keep, match):
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match=match):
        topk_block_index(q, q, 4, keep)


def _bad(**overrides):
    """Arguments for a small valid call (N = 40, block = 16) with some replaced."""
    arguments = {
        "q": torch.randn(1, 2, 40, 8),
        "k": torch.randn(1, 2, 40, 8),
        "v": torch.randn(1, 2, 40, 4),
        "block_index": torch.ones(1, 2, 3, 3, dtype=torch.bool),
        "block": 16,
    }
    arguments.update(overrides)
    return arguments


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        (_bad(q=torch.randn(2, 40, 8)), "q must be 4-D"),
        (_bad(k=torch.randn(1, 2, 41, 8)), "q and k must have the same shape"),
        (_bad(v=torch.randn(1, 1, 40, 4)), "v must share B, H, N"),
        (_bad(v=torch.randn(1, 2, 40, 4, dtype=torch.float64)), "dtypes differ"),
        (_bad(block_index=torch.ones(1, 2, 3, 3, dtype=torch.bool, device="meta")), "block_index is on meta"),
        (_bad(block=48), r"block must be one of \(16, 32, 64, 128\)"),
        (_bad(block_index=torch.ones(1, 2, 3, 3)), "block_index must be a bool tensor"),
        (_bad(block_index=torch.ones(1, 2, 3, 2, dtype=torch.bool)), r"= \(1, 2, 3, 3\) for N=40, block=16"),
        (_bad(block_index=torch.ones(1, 2, 9, dtype=torch.bool)), r"block_index must be \[B, H, n_qblocks"),
        (_bad(block_index=[[True]]), "block_index must be a bool tensor"),
    ],
)
def test_input_checks(arguments, match):
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(**arguments)
