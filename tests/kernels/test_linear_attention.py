"""Linear attention: the naive reference and the Triton kernels against float64, outputs and every gradient."""

import importlib

import pytest
import torch
from dit_graft.kernels import linear_attention
from dit_graft.kernels._dispatch import use_triton
from dit_graft.kernels.linear_attention import FEATURE_MAPS
from dit_graft.kernels.linear_attention.naive import linear_attention_naive
from dit_graft.kernels.testing import assert_close

# (B, H, N, d, dv): odd N, N = 1, N over several blocks, head dims that are not powers of two, d != dv.
SHAPES = [
    (1, 2, 1, 40, 40),
    (2, 3, 7, 72, 72),
    (2, 1, 63, 40, 72),
    (1, 2, 100, 72, 40),
    (1, 1, 130, 96, 128),
]


def _eps(n: int) -> float:
    """With one key, dq and dk are eps-sized differences of O(1) terms; a large eps keeps them above fp32 noise."""
    return 0.5 if n == 1 else 1e-6


def _inputs(B, H, N, D, DV, seed=0):
    """Float64 q, k, v and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    do = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    return q, k, v, do


def _run(fn, q, k, v, do, dtype, device, **kwargs):
    """fn's output and (dq, dk, dv) with inputs cast to dtype on device."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    o = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(o, leaves, do.to(device=device, dtype=dtype))
    return o, grads


def _check(ref, got, tol):
    """Compares output and dq, dk, dv."""
    (o_ref, grads_ref), (o, grads) = ref, got
    assert o.dtype == grads[0].dtype
    assert_close("o", o_ref, o.cpu(), tol)
    for name, g_ref, g in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, g_ref, g.cpu(), tol)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize(("B", "H", "N", "D", "DV"), SHAPES)
def test_naive_fp32_matches_float64(B, H, N, D, DV, feature_map):
    q, k, v, do = _inputs(B, H, N, D, DV)
    eps = _eps(N)
    ref = _run(linear_attention_naive, q, k, v, do, torch.float64, "cpu", feature_map=feature_map, eps=eps)
    got = _run(linear_attention_naive, q, k, v, do, torch.float32, "cpu", feature_map=feature_map, eps=eps)
    assert got[0].dtype == torch.float32
    _check(ref, got, 1e-4)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize(("B", "H", "N", "D", "DV"), SHAPES)
def test_triton_fp32_matches_float64(triton_backend, B, H, N, D, DV, feature_map):
    q, k, v, do = _inputs(B, H, N, D, DV)
    eps = _eps(N)
    ref = _run(linear_attention_naive, q, k, v, do, torch.float64, "cpu", feature_map=feature_map, eps=eps)
    got = _run(linear_attention, q, k, v, do, torch.float32, triton_backend, feature_map=feature_map, eps=eps)
    _check(ref, got, 1e-4)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_triton_fp16_matches_float64(triton_backend, feature_map):
    q, k, v, do = _inputs(2, 2, 63, 72, 40, seed=1)
    ref = _run(linear_attention_naive, q, k, v, do, torch.float64, "cpu", feature_map=feature_map)
    got = _run(linear_attention, q, k, v, do, torch.float16, triton_backend, feature_map=feature_map)
    assert got[0].dtype == torch.float16
    _check(ref, got, 5e-3)


@pytest.mark.parametrize("target_programs", [1, 3, 256])
def test_triton_split_counts_agree(triton_backend, monkeypatch, target_programs):
    # N = 200 is 4 blocks: one split of 4 blocks, two splits of 2, four splits of 1. (The module is imported by
    # name because the package attribute dit_graft.kernels.linear_attention is the function, not the package.)
    la_triton = importlib.import_module("dit_graft.kernels.linear_attention.triton")
    monkeypatch.setattr(la_triton, "TARGET_PROGRAMS", target_programs)
    assert la_triton._splits(200, 64, 1) == {1: (1, 4), 3: (2, 2), 256: (4, 1)}[target_programs]
    q, k, v, do = _inputs(1, 1, 200, 40, 40, seed=2)
    ref = _run(linear_attention_naive, q, k, v, do, torch.float64, "cpu", feature_map="elu1")
    got = _run(linear_attention, q, k, v, do, torch.float32, triton_backend, feature_map="elu1")
    _check(ref, got, 1e-4)


def test_triton_takes_strided_inputs(triton_backend):
    q, k, v, do = _inputs(2, 3, 7, 40, 40, seed=3)
    ref = _run(linear_attention_naive, q, k, v, do, torch.float64, "cpu")
    leaves = [t.to(device=triton_backend, dtype=torch.float32).requires_grad_() for t in (q, k, v)]
    # Same values laid out as [B, N, H, d] projections: the kernels take strides, nothing is copied.
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (*leaves, do.to(triton_backend).float())]
    assert not strided[0].is_contiguous()
    o = linear_attention(*strided[:3])
    grads = torch.autograd.grad(o, leaves, strided[3])
    _check(ref, (o, grads), 1e-4)


def test_triton_writes_every_output_element(triton_backend):
    assert torch.empty(2).isnan().all(), "the conftest should make torch.empty return NaN"
    q, k, v, do = _inputs(1, 2, 65, 72, 40, seed=4)
    o, grads = _run(linear_attention, q, k, v, do, torch.float32, triton_backend, feature_map="elu1")
    for t in (o, *grads):
        assert torch.isfinite(t).all()


def _bad(**overrides):
    """q, k, v (small, float32) with some replaced."""
    tensors = {"q": torch.randn(1, 2, 5, 8), "k": torch.randn(1, 2, 5, 8), "v": torch.randn(1, 2, 5, 4)}
    tensors.update(overrides)
    return tensors


@pytest.mark.parametrize(
    ("tensors", "kwargs", "match"),
    [
        (_bad(q=torch.randn(2, 5, 8)), {}, "q must be 4-D"),
        (_bad(v=torch.randn(1, 2, 5)), {}, "v must be 4-D"),
        (_bad(k=torch.randn(1, 2, 6, 8)), {}, "q and k must have the same shape"),
        (_bad(k=torch.randn(1, 2, 5, 4)), {}, "q and k must have the same shape"),
        (_bad(v=torch.randn(1, 3, 5, 4)), {}, "v must share B, H, N"),
        (_bad(v=torch.randn(2, 2, 5, 4)), {}, "v must share B, H, N"),
        (_bad(v=torch.randn(1, 2, 5, 4, dtype=torch.float64)), {}, "dtypes differ"),
        (_bad(q=torch.ones(1, 2, 5, 8, dtype=torch.int64)), {}, "q must be floating point"),
        (_bad(q=torch.randn(1, 2, 0, 8), k=torch.randn(1, 2, 0, 8), v=torch.randn(1, 2, 0, 4)), {}, "not be empty"),
        (_bad(), {"feature_map": "softmax"}, "feature_map must be one of relu, elu1"),
        (_bad(), {"eps": 0.0}, "eps must be positive"),
    ],
)
def test_input_checks(tensors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_attention(**tensors, **kwargs)


def test_input_check_devices():
    tensors = _bad(v=torch.randn(1, 2, 5, 4, device="meta"))
    with pytest.raises(ValueError, match="devices differ"):
        linear_attention(**tensors)


def test_dispatch(monkeypatch):
    q = torch.randn(1, 1, 3, 8)
    monkeypatch.delenv("DIT_GRAFT_KERNELS", raising=False)
    assert use_triton("op", q) is False
    monkeypatch.setenv("DIT_GRAFT_KERNELS", "naive")
    assert use_triton("op", q) is False
    assert torch.equal(linear_attention(q, q, q), linear_attention_naive(q, q, q))
    monkeypatch.setenv("DIT_GRAFT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DIT_GRAFT_KERNELS='cuda' is not one of triton, blockwise, naive"):
        linear_attention(q, q, q)


def test_forced_triton_refuses_what_it_cannot_run(triton_backend, monkeypatch):
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="takes float16, bfloat16 or float32"):
        linear_attention(q.double(), q.double(), q.double())
    big = torch.randn(1, 1, 3, 130, device=triton_backend)
    with pytest.raises(ValueError, match="head dims up to 128, got 130 and 130"):
        linear_attention(big, big, big)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        linear_attention(q, q, q)
