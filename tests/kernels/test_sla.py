"""Sparse-linear attention: the reference against SDPA, linear attention and float64; the Triton kernels against
float64, outputs and every gradient of both parts; the block maps."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from dit_graft.kernels import sla_attention, sla_block_index, topk_block_index
from dit_graft.kernels._dispatch import use_triton
from dit_graft.kernels.block_sparse.index import mean_pool_blocks
from dit_graft.kernels.linear_attention.naive import linear_attention_naive
from dit_graft.kernels.sla.blockwise import sla_attention_blockwise
from dit_graft.kernels.sla.naive import sla_attention_naive
from dit_graft.kernels.testing import assert_close

# (B, H, N, d, dv, block, feature_map): N not a multiple of block, N = 1, a block larger than a 64-token tile with
# a short last block, head dims that are not powers of two, d != dv, a 128 x 128 state (smaller tiles).
SHAPES = [
    (1, 2, 100, 40, 40, 32, "relu"),
    (2, 1, 63, 72, 72, 16, "elu1"),
    (1, 1, 150, 40, 24, 128, "relu"),
    (1, 2, 1, 16, 16, 16, "elu1"),
    (2, 2, 64, 96, 64, 64, "relu"),
    (1, 1, 70, 128, 128, 32, "elu1"),
]


def _eps(n: int) -> float:
    """With one key, the linear part's dq and dk are eps-sized differences of O(1) terms: a large eps keeps them
    above fp32 noise (as in test_linear_attention)."""
    return 0.5 if n == 1 else 1e-6


def _inputs(B, H, N, D, DV, seed=0):
    """Float64 q, k, v and one output gradient per part."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    do_sparse = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    do_linear = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    return q, k, v, (do_sparse, do_linear)


def _n_blocks(N, block):
    return math.ceil(N / block)


def _random_maps(B, H, N, block, seed=0):
    """Disjoint random (critical, marginal) maps with an all-negligible, an all-critical and an all-marginal row."""
    n = _n_blocks(N, block)
    draw = torch.rand(B, H, n, n, generator=torch.Generator().manual_seed(seed))
    critical, marginal = draw < 0.3, (draw >= 0.3) & (draw < 0.75)
    critical[0, 0, 0], marginal[0, 0, 0] = False, False
    critical[-1, -1, -1], marginal[-1, -1, -1] = True, False
    critical[-1, -1, 0], marginal[-1, -1, 0] = False, True
    return critical, marginal


def _run(fn, q, k, v, dos, dtype, device, *args, **kwargs):
    """fn's (o_sparse, o_linear) and (dq, dk, dv) of Σ o_sparse·do_sparse + o_linear·do_linear, inputs in dtype."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    outs = fn(*leaves, *(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    grads = torch.autograd.grad(outs, leaves, [do.to(device=device, dtype=dtype) for do in dos])
    return outs, grads


def _check(ref, got, tol):
    """Compares both outputs and dq, dk, dv (which are zero up to rounding where a part sees one key or none)."""
    (outs_ref, grads_ref), (outs, grads) = ref, got
    for name, o_ref, o in zip(("o_sparse", "o_linear"), outs_ref, outs, strict=True):
        assert o.dtype == grads[0].dtype
        assert_close(name, o_ref, o.cpu(), tol)
    for name, g_ref, g in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, g_ref, g.cpu(), tol, atol=1e-6)


def _sdpa_and_zeros(q, k, v, critical, marginal, block, feature_map, eps):
    """What SLA gives with every block critical: dense attention, and a linear part that sees no key."""
    return F.scaled_dot_product_attention(q, k, v), v * 0.0


def _zeros_and_linear(q, k, v, critical, marginal, block, feature_map, eps):
    """What SLA gives with every block marginal: no sparse part, linear attention over all keys."""
    return v * 0.0, linear_attention_naive(q, k, v, feature_map, eps)


def _full(B, H, N, block):
    n = _n_blocks(N, block)
    return torch.ones(B, H, n, n, dtype=torch.bool)


@pytest.mark.parametrize(("B", "H", "N", "D", "DV", "block", "feature_map"), SHAPES)
def test_naive_all_critical_is_softmax_attention(B, H, N, D, DV, block, feature_map):
    q, k, v, dos = _inputs(B, H, N, D, DV)
    maps = (_full(B, H, N, block), ~_full(B, H, N, block), block, feature_map, _eps(N))
    ref = _run(_sdpa_and_zeros, q, k, v, dos, torch.float64, "cpu", *maps)
    got = _run(sla_attention_naive, q, k, v, dos, torch.float64, "cpu", *maps)
    _check(ref, got, 1e-12)


@pytest.mark.parametrize(("B", "H", "N", "D", "DV", "block", "feature_map"), SHAPES)
def test_naive_all_marginal_is_linear_attention(B, H, N, D, DV, block, feature_map):
    q, k, v, dos = _inputs(B, H, N, D, DV)
    maps = (~_full(B, H, N, block), _full(B, H, N, block), block, feature_map, _eps(N))
    ref = _run(_zeros_and_linear, q, k, v, dos, torch.float64, "cpu", *maps)
    got = _run(sla_attention_naive, q, k, v, dos, torch.float64, "cpu", *maps)
    _check(ref, got, 1e-10)


@pytest.mark.parametrize(("B", "H", "N", "D", "DV", "block", "feature_map"), SHAPES)
def test_naive_fp32_matches_float64(B, H, N, D, DV, block, feature_map):
    q, k, v, dos = _inputs(B, H, N, D, DV)
    args = (*_random_maps(B, H, N, block), block, feature_map, _eps(N))
    ref = _run(sla_attention_naive, q, k, v, dos, torch.float64, "cpu", *args)
    got = _run(sla_attention_naive, q, k, v, dos, torch.float32, "cpu", *args)
    assert got[0][0].dtype == got[0][1].dtype == torch.float32
    _check(ref, got, 1e-5)


@pytest.mark.parametrize(("B", "H", "N", "D", "DV", "block", "feature_map"), SHAPES)
def test_triton_fp32_matches_float64(triton_backend, B, H, N, D, DV, block, feature_map):
    q, k, v, dos = _inputs(B, H, N, D, DV)
    args = (*_random_maps(B, H, N, block), block, feature_map, _eps(N))
    ref = _run(sla_attention_naive, q, k, v, dos, torch.float64, "cpu", *args)
    got = _run(sla_attention, q, k, v, dos, torch.float32, triton_backend, *args)
    _check(ref, got, 1e-4)


@pytest.mark.parametrize(("reference", "critical_full"), [(_sdpa_and_zeros, True), (_zeros_and_linear, False)])
def test_triton_full_maps_match_softmax_and_linear_attention(triton_backend, reference, critical_full):
    q, k, v, dos = _inputs(2, 1, 100, 40, 40, seed=1)
    full = _full(2, 1, 100, 32)
    maps = (full, ~full) if critical_full else (~full, full)
    ref = _run(reference, q, k, v, dos, torch.float64, "cpu", *maps, 32, "relu", 1e-6)
    got = _run(sla_attention, q, k, v, dos, torch.float32, triton_backend, *maps, 32, "relu", 1e-6)
    _check(ref, got, 1e-4)


def test_triton_empty_maps_give_zeros(triton_backend):
    q, k, v, dos = _inputs(1, 2, 50, 40, 40, seed=2)
    empty = ~_full(1, 2, 50, 32)
    outs, grads = _run(sla_attention, q, k, v, dos, torch.float32, triton_backend, empty, empty, 32)
    for t in (*outs, *grads):
        assert (t == 0).all()


def test_triton_linear_part_has_no_cancellation(triton_backend):
    # Keys and values of the non-marginal blocks are 1e3 larger, so their states are 1e6 larger: a linear part
    # formed as "all blocks minus the others" would lose ~1e6 x fp32 rounding, summing the marginal ones loses none.
    q, k, v, (_, do) = _inputs(1, 1, 128, 40, 40, seed=3)
    marginal = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    marginal[..., 1] = True
    scale = torch.full((1, 1, 128, 1), 1e3, dtype=torch.float64)
    scale[:, :, 32:64] = 1.0
    k, v = k * scale, v * scale
    args = (~_full(1, 1, 128, 32), marginal, 32)
    ref = _run(lambda *a: sla_attention_naive(*a)[1], q, k, v, [do], torch.float64, "cpu", *args)
    got = _run(lambda *a: sla_attention(*a)[1], q, k, v, [do], torch.float32, triton_backend, *args)
    assert_close("o_linear", ref[0], got[0].cpu(), 1e-4)
    for name, g_ref, g in zip(("dq", "dk", "dv"), ref[1], got[1], strict=True):
        assert_close(name, g_ref, g.cpu(), 1e-4, atol=1e-6)


def test_triton_fp16_matches_float64(triton_backend):
    q, k, v, dos = _inputs(2, 2, 63, 72, 40, seed=4)
    args = (*_random_maps(2, 2, 63, 16, seed=4), 16, "elu1")
    ref = _run(sla_attention_naive, q, k, v, dos, torch.float64, "cpu", *args)
    got = _run(sla_attention, q, k, v, dos, torch.float16, triton_backend, *args)
    assert got[0][0].dtype == got[0][1].dtype == torch.float16
    _check(ref, got, 5e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter has no bf16: GPU only")
def test_triton_bf16_matches_float64(triton_backend):
    # bf16 rounding of the inputs alone is ~3e-3 relative here.
    q, k, v, dos = _inputs(2, 2, 200, 72, 72, seed=4)
    args = (*_random_maps(2, 2, 200, 64, seed=4), 64, "relu")
    ref = _run(sla_attention_naive, q, k, v, dos, torch.float64, "cpu", *args)
    got = _run(sla_attention, q, k, v, dos, torch.bfloat16, triton_backend, *args)
    assert got[0][0].dtype == got[0][1].dtype == torch.bfloat16
    _check(ref, got, 2e-2)


def test_triton_takes_strided_inputs(triton_backend):
    q, k, v, dos = _inputs(2, 3, 40, 40, 40, seed=5)
    maps = _random_maps(2, 3, 40, 16, seed=5)
    ref = _run(sla_attention_naive, q, k, v, dos, torch.float64, "cpu", *maps, 16)
    leaves = [t.to(device=triton_backend, dtype=torch.float32).requires_grad_() for t in (q, k, v)]
    # Same values laid out as [B, N, H, d] projections: the kernels take strides, nothing is copied.
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in leaves]
    assert not strided[0].is_contiguous()
    outs = sla_attention(*strided, *(m.to(triton_backend) for m in maps), 16)
    grads = torch.autograd.grad(outs, leaves, [do.to(triton_backend).float() for do in dos])
    _check(ref, (outs, grads), 1e-4)


def test_triton_writes_every_output_element(triton_backend):
    assert torch.empty(2).isnan().all(), "the conftest should make torch.empty return NaN"
    q, k, v, dos = _inputs(1, 2, 65, 72, 40, seed=6)
    maps = _random_maps(1, 2, 65, 32, seed=6)
    outs, grads = _run(sla_attention, q, k, v, dos, torch.float32, triton_backend, *maps, 32, "elu1")
    for t in (*outs, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("block_c", [128, 1024])
def test_masked_block_sum_matches_a_matmul(triton_backend, monkeypatch, block_c):
    # 75 map columns are three chunks of 32; the middle one is empty in every row, so the kernel skips it. 70 rows
    # and 300 columns are partial tiles at the GPU's column width (128) and the interpreter's (1024).
    sla_triton = importlib.import_module("dit_graft.kernels.sla.triton")
    monkeypatch.setattr(sla_triton, "SUM_BLOCK_C", block_c)
    gen = torch.Generator().manual_seed(7)
    block_map = torch.rand(2, 70, 75, generator=gen) < 0.5
    block_map[:, :, 32:64] = False
    x = torch.randn(2, 75, 300, generator=gen, dtype=torch.float64)
    y = sla_triton.masked_block_sum(block_map.to(triton_backend), x.float().to(triton_backend))
    assert_close("y", block_map.double() @ x, y.cpu(), 1e-6)


def test_sla_block_index_splits_each_row():
    q, k, _, _ = _inputs(2, 3, 100, 16, 16, seed=8)
    critical, marginal = sla_block_index(q, k, 16, critical=2, negligible=0.3)
    assert critical.shape == marginal.shape == (2, 3, 7, 7) and critical.dtype == marginal.dtype == torch.bool
    assert torch.equal(critical, topk_block_index(q, k, 16, 2))
    assert not (critical & marginal).any()
    negligible = ~(critical | marginal)
    assert (critical.sum(-1) == 2).all() and (negligible.sum(-1) == 2).all() and (marginal.sum(-1) == 3).all()
    scores = mean_pool_blocks(q, 16) @ mean_pool_blocks(k, 16).transpose(-1, -2)  # [B, H, 7, 7]
    marginal_min = scores.masked_fill(~marginal, float("inf")).amin(dim=-1)
    negligible_max = scores.masked_fill(~negligible, float("-inf")).amax(dim=-1)
    assert (negligible_max <= marginal_min).all()


@pytest.mark.parametrize(
    ("critical", "negligible", "per_row"),
    [(0.05, 0.0, (1, 6, 0)), (0.3, 0.5, (3, 1, 3)), (0, 0.9, (0, 1, 6)), (1.0, 0.5, (7, 0, 0)), (5, 4, (5, 0, 2))],
)
def test_sla_block_index_counts(critical, negligible, per_row):
    q, k, _, _ = _inputs(1, 2, 100, 16, 16, seed=9)
    critical_map, marginal_map = sla_block_index(q, k, 16, critical, negligible)
    negligible_map = ~(critical_map | marginal_map)
    for block_map, count in zip((critical_map, marginal_map, negligible_map), per_row, strict=True):
        assert (block_map.sum(dim=-1) == count).all()


def test_sla_block_index_feeds_sla_attention():
    q, k, v, _ = _inputs(1, 2, 100, 16, 16, seed=10)
    o_sparse, o_linear = sla_attention(q, k, v, *sla_block_index(q, k, 32, 0.25, 0.25), 32)
    assert o_sparse.shape == o_linear.shape == v.shape


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"critical": 1.5}, r"critical as a fraction must be in \[0, 1\]"),
        ({"critical": -1}, "critical as a count must be at least 0"),
        ({"negligible": 1.0}, r"negligible as a fraction must be in \[0, 1\)"),
        ({"negligible": True}, "negligible must be an int count or a float fraction"),
        ({"block": 0}, "block must be a positive int"),
        ({"k": torch.randn(1, 1, 9, 4)}, "q and k must be"),
    ],
)
def test_sla_block_index_rejects_bad_arguments(kwargs, match):
    arguments = {"q": torch.randn(1, 1, 8, 4), "k": torch.randn(1, 1, 8, 4), "block": 4, "critical": 0.5}
    with pytest.raises(ValueError, match=match):
        sla_block_index(**{**arguments, **kwargs})


def _bad(**overrides):
    """Arguments for a small valid call (N = 40, block = 16) with some replaced."""
    arguments = {
        "q": torch.randn(1, 2, 40, 8),
        "k": torch.randn(1, 2, 40, 8),
        "v": torch.randn(1, 2, 40, 4),
        "block_index_critical": torch.ones(1, 2, 3, 3, dtype=torch.bool),
        "block_index_marginal": torch.zeros(1, 2, 3, 3, dtype=torch.bool),
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
        (_bad(block=48), r"block must be one of \(16, 32, 64, 128\)"),
        (_bad(block_index_critical=torch.ones(1, 2, 3, 3)), "block_index_critical must be a bool tensor"),
        (_bad(block_index_marginal=[[True]]), "block_index_marginal must be a bool tensor"),
        (_bad(block_index_marginal=torch.ones(1, 2, 3, 2, dtype=torch.bool)), r"marginal must be \[B, H, n_qblocks"),
        (_bad(block_index_critical=torch.ones(1, 2, 3, 3, dtype=torch.bool, device="meta")), "critical is on meta"),
        (_bad(feature_map="tanh"), "feature_map must be one of relu, elu1, softmax"),
        (_bad(eps=0.0), "eps must be positive"),
    ],
)
def test_input_checks(arguments, match):
    with pytest.raises(ValueError, match=match):
        sla_attention(**arguments)


def test_dispatch(monkeypatch):
    arguments = _bad()
    monkeypatch.delenv("DIT_GRAFT_KERNELS", raising=False)
    assert use_triton("sla_attention", arguments["q"]) is False
    # Off CUDA the bounded-memory path runs; DIT_GRAFT_KERNELS=naive forces the dense reference.
    got = sla_attention(**arguments)
    want = sla_attention_blockwise(*arguments.values())
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    monkeypatch.setenv("DIT_GRAFT_KERNELS", "naive")
    got = sla_attention(**arguments)
    want = sla_attention_naive(*arguments.values())
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_forced_triton_refuses_what_it_cannot_run(triton_backend):
    with pytest.raises(ValueError, match="takes float16, bfloat16 or float32"):
        sla_attention(**_bad(q=torch.randn(1, 2, 40, 8).double(), k=torch.randn(1, 2, 40, 8).double(),
                             v=torch.randn(1, 2, 40, 4).double()))  # fmt: skip
    big = torch.randn(1, 2, 40, 130, device=triton_backend)
    with pytest.raises(ValueError, match="head dims up to 128, got 130 and 130"):
        sla_attention(**_bad(q=big, k=big, v=big))


@pytest.mark.parametrize(("feature_map", "linear_keys"), [("softmax", "marginal"), ("softmax", "all"), ("elu1", "all")])
def test_triton_released_variants_match_float64(triton_backend, feature_map, linear_keys):
    """thu-ml's softmax features (entering the relu kernels as relu(softmax(x))) and a linear part over every key."""
    q, k, v, dos = _inputs(1, 2, 100, 40, 40, seed=3)
    critical, marginal = _random_maps(1, 2, 100, 32, seed=3)
    marginal = None if linear_keys == "all" else marginal
    ref = _run(sla_attention_naive, q, k, v, dos, torch.float64, "cpu", critical, marginal, 32, feature_map, 1e-5)
    got = _run(
        sla_attention,
        q,
        k,
        v,
        dos,
        torch.float32,
        triton_backend,
        critical,
        marginal,
        32,
        feature_map,
        1e-5,
        linear_keys=linear_keys,
    )
    _check(ref, got, 1e-4)
