"""2D local (tile) attention: the window mask, the reference against SDPA and float64, the Triton kernels against
float64, outputs and every gradient."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from dit_graft.kernels import tile_attention
from dit_graft.kernels._dispatch import use_triton
from dit_graft.kernels.testing import assert_close
from dit_graft.kernels.tile import WINDOW_SHAPES
from dit_graft.kernels.tile.naive import tile_attention_naive, window_mask
from dit_graft.kernels.window.blockwise import window_attention_blockwise

# (B, H, grid, d, dv, window, shape): odd grids, one row, one column, a grid narrower than a tile (4 x 16 tiles),
# grids of several tiles whose windows cross tile edges, a window wider than the grid, head dims 40 and 72, d != dv.
CASES = [
    (2, 1, (3, 5), 40, 40, 1, "square"),
    (1, 2, (7, 9), 72, 72, 2, "circle"),
    (1, 1, (7, 9), 40, 72, 1, "square"),
    (1, 1, (1, 7), 40, 40, 2, "circle"),
    (1, 1, (9, 1), 40, 40, 1, "square"),
    (1, 2, (17, 3), 40, 24, 3, "circle"),
    (2, 1, (12, 10), 72, 40, 3, "square"),
    (1, 1, (19, 21), 40, 40, 5, "circle"),
    (1, 1, (5, 6), 16, 16, 9, "square"),
]


def _inputs(B, H, grid, D, DV, seed=0):
    """Float64 q, k, v and an output gradient over the grid's tokens."""
    N = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    do = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    return q, k, v, do


def _run(fn, q, k, v, do, dtype, device, *args):
    """fn's output and (dq, dk, dv) with q, k, v cast to dtype on device."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    o = fn(*leaves, *args)
    grads = torch.autograd.grad(o, leaves, do.to(device=device, dtype=dtype))
    return o, grads


def _check(ref, got, tol):
    """Compares output and dq, dk, dv."""
    (o_ref, grads_ref), (o, grads) = ref, got
    assert o.dtype == grads[0].dtype
    assert_close("o", o_ref, o.cpu(), tol)
    for name, g_ref, g in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, g_ref, g.cpu(), tol, atol=1e-6)


def _sdpa(q, k, v, grid, window, shape):
    """Dense attention, ignoring the window."""
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("shape", WINDOW_SHAPES)
@pytest.mark.parametrize("window", [1, 2, 3])
def test_window_mask_matches_its_definition(shape, window):
    h, w = 5, 7
    mask = window_mask((h, w), window, shape)
    for i in range(h * w):
        for j in range(h * w):
            dy, dx = j // w - i // w, j % w - i % w
            inside = max(abs(dy), abs(dx)) <= window if shape == "square" else dy * dy + dx * dx < window * window
            assert mask[i, j].item() == inside, (i, j)


def test_window_mask_sizes():
    centre = 7 * 15 + 7  # the middle of a 15 x 15 grid
    assert window_mask((15, 15), 2, "square")[centre].sum() == 25
    assert window_mask((15, 15), 1, "circle")[centre].sum() == 1
    assert window_mask((15, 15), 2, "circle")[centre].sum() == 9  # dy² + dx² < 4: the 3 x 3 square
    assert window_mask((15, 15), 3, "circle")[centre].sum() == 25  # dy² + dx² < 9: the 5 x 5 square
    assert window_mask((15, 15), 4, "circle")[centre].sum() == 45


@pytest.mark.parametrize(("shape", "window"), [("square", 8), ("circle", 16)])
def test_naive_whole_grid_window_matches_sdpa(shape, window):
    q, k, v, do = _inputs(2, 2, (7, 9), 40, 24)
    ref = _run(_sdpa, q, k, v, do, torch.float64, "cpu", (7, 9), window, shape)
    got = _run(tile_attention_naive, q, k, v, do, torch.float64, "cpu", (7, 9), window, shape)
    _check(ref, got, 1e-12)


@pytest.mark.parametrize(("B", "H", "grid", "D", "DV", "window", "shape"), CASES)
def test_naive_fp32_matches_float64(B, H, grid, D, DV, window, shape):
    q, k, v, do = _inputs(B, H, grid, D, DV)
    ref = _run(tile_attention_naive, q, k, v, do, torch.float64, "cpu", grid, window, shape)
    got = _run(tile_attention_naive, q, k, v, do, torch.float32, "cpu", grid, window, shape)
    assert got[0].dtype == torch.float32
    _check(ref, got, 1e-5)


@pytest.mark.parametrize(("B", "H", "grid", "D", "DV", "window", "shape"), CASES)
def test_triton_fp32_matches_float64(triton_backend, B, H, grid, D, DV, window, shape):
    q, k, v, do = _inputs(B, H, grid, D, DV)
    ref = _run(tile_attention_naive, q, k, v, do, torch.float64, "cpu", grid, window, shape)
    got = _run(tile_attention, q, k, v, do, torch.float32, triton_backend, grid, window, shape)
    _check(ref, got, 1e-4)


@pytest.mark.parametrize(("shape", "window"), [("square", 9), ("circle", 10**9)])
def test_triton_whole_grid_window_matches_sdpa(triton_backend, shape, window):
    q, k, v, do = _inputs(1, 2, (7, 9), 72, 40, seed=1)
    ref = _run(_sdpa, q, k, v, do, torch.float64, "cpu", (7, 9), window, shape)
    got = _run(tile_attention, q, k, v, do, torch.float32, triton_backend, (7, 9), window, shape)
    _check(ref, got, 1e-4)


def test_triton_window_zero_is_the_identity_on_v(triton_backend):
    q, k, v, do = _inputs(1, 1, (3, 5), 16, 16, seed=2)
    o, (dq, dk, dv) = _run(tile_attention, q, k, v, do, torch.float32, triton_backend, (3, 5), 0, "square")
    assert_close("o", v, o, 1e-6)
    assert_close("dv", do, dv, 1e-6)
    # p = 1 and dp = δ = do·v: dq and dk vanish up to rounding.
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5


def test_triton_fp16_matches_float64(triton_backend):
    q, k, v, do = _inputs(2, 1, (7, 9), 72, 40, seed=3)
    ref = _run(tile_attention_naive, q, k, v, do, torch.float64, "cpu", (7, 9), 2, "circle")
    got = _run(tile_attention, q, k, v, do, torch.float16, triton_backend, (7, 9), 2, "circle")
    assert got[0].dtype == torch.float16
    _check(ref, got, 5e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter has no bf16: GPU only")
def test_triton_bf16_matches_float64(triton_backend):
    # bf16 rounding of the inputs alone is ~3e-3 relative here.
    q, k, v, do = _inputs(2, 2, (24, 20), 72, 72, seed=3)
    ref = _run(tile_attention_naive, q, k, v, do, torch.float64, "cpu", (24, 20), 4, "circle")
    got = _run(tile_attention, q, k, v, do, torch.bfloat16, triton_backend, (24, 20), 4, "circle")
    assert got[0].dtype == torch.bfloat16
    _check(ref, got, 2e-2)


def test_triton_takes_strided_inputs(triton_backend):
    q, k, v, do = _inputs(2, 3, (5, 7), 40, 40, seed=4)
    ref = _run(tile_attention_naive, q, k, v, do, torch.float64, "cpu", (5, 7), 1, "square")
    leaves = [t.to(device=triton_backend, dtype=torch.float32).requires_grad_() for t in (q, k, v)]
    # Same values laid out as [B, N, H, d] projections: the kernels take strides, nothing is copied.
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (*leaves, do.to(triton_backend).float())]
    assert not strided[0].is_contiguous()
    o = tile_attention(*strided[:3], (5, 7), 1, "square")
    grads = torch.autograd.grad(o, leaves, strided[3])
    _check(ref, (o, grads), 1e-4)


def test_triton_writes_every_output_element(triton_backend):
    assert torch.empty(2).isnan().all(), "the conftest should make torch.empty return NaN"
    q, k, v, do = _inputs(1, 2, (9, 11), 72, 40, seed=5)
    o, grads = _run(tile_attention, q, k, v, do, torch.float32, triton_backend, (9, 11), 2, "circle")
    for t in (o, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize(("grid", "tile"), [((64, 64), (8, 8)), ((7, 9), (8, 8)), ((3, 5), (8, 8)), ((9, 3), (16, 4))])
def test_tile_shape(grid, tile):
    tile_triton = importlib.import_module("dit_graft.kernels.tile.triton")
    assert tile_triton.tile_shape(grid) == tile


def _bad(**overrides):
    """Arguments for a small valid call (a 5 x 8 grid) with some replaced."""
    arguments = {
        "q": torch.randn(1, 2, 40, 8),
        "k": torch.randn(1, 2, 40, 8),
        "v": torch.randn(1, 2, 40, 4),
        "grid": (5, 8),
        "window": 1,
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
        (_bad(grid=(5, 7)), r"grid \(5, 7\) holds 35 tokens, q has N=40"),
        (_bad(grid=(40,)), "grid must be"),
        (_bad(grid=(5.0, 8)), "grid must be"),
        (_bad(grid=(-5, -8)), "grid must be"),
        (_bad(grid=40), "grid must be"),
        (_bad(window=-1), "window must be an int ≥ 0 for a square"),
        (_bad(window=0, shape="circle"), "window must be an int ≥ 1 for a circle"),
        (_bad(window=1.5), "window must be an int"),
        (_bad(window=True), "window must be an int"),
        (_bad(shape="diamond"), "shape must be one of square, circle"),
    ],
)
def test_input_checks(arguments, match):
    with pytest.raises(ValueError, match=match):
        tile_attention(**arguments)


def test_dispatch(monkeypatch):
    arguments = _bad()
    monkeypatch.delenv("DIT_GRAFT_KERNELS", raising=False)
    assert use_triton("tile_attention", arguments["q"]) is False
    # Off CUDA the bounded-memory path runs; DIT_GRAFT_KERNELS=naive forces the dense reference.
    assert torch.equal(tile_attention(**arguments), window_attention_blockwise(*arguments.values()))
    monkeypatch.setenv("DIT_GRAFT_KERNELS", "naive")
    assert torch.equal(tile_attention(**arguments), tile_attention_naive(*arguments.values()))


def test_forced_triton_refuses_what_it_cannot_run(triton_backend):
    q = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="takes float16, bfloat16 or float32"):
        tile_attention(q, q, q, (2, 3), 1)
    big = torch.randn(1, 1, 6, 130, device=triton_backend)
    with pytest.raises(ValueError, match="head dims up to 128, got 130 and 130"):
        tile_attention(big, big, big, (2, 3), 1)
