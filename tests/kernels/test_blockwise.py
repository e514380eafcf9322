"""Bounded-memory PyTorch paths (kernels/*/blockwise.py): against the dense float64 references, outputs and every
gradient; their dispatch; properties (full windows are softmax); and that no call ever holds N x N scores."""

import math

import pytest
import torch
import torch.nn.functional as F
from dit_graft.kernels import _blockwise as blockwise_core
from dit_graft.kernels import (
    block_sparse_attention,
    frame_tile_attention,
    sla_attention,
    sla_block_index,
    tile_attention,
    window_attention,
)
from dit_graft.kernels.block_sparse import blockwise as block_sparse_blockwise
from dit_graft.kernels.block_sparse.blockwise import block_sparse_attention_blockwise
from dit_graft.kernels.block_sparse.naive import block_sparse_attention_naive
from dit_graft.kernels.frame_tile import blockwise as frame_tile_blockwise
from dit_graft.kernels.frame_tile import frame_pattern, frame_tile_pairs
from dit_graft.kernels.frame_tile.blockwise import frame_tile_attention_blockwise
from dit_graft.kernels.frame_tile.naive import frame_tile_attention_naive, frame_tile_mask
from dit_graft.kernels.sla.blockwise import sla_attention_blockwise
from dit_graft.kernels.sla.naive import sla_attention_naive
from dit_graft.kernels.testing import assert_close
from dit_graft.kernels.tile.naive import window_mask
from dit_graft.kernels.window import blockwise as window_blockwise
from dit_graft.kernels.window.blockwise import reach, window_attention_blockwise
from dit_graft.kernels.window.naive import grid_window_mask, window_attention_naive
from hypothesis import given, settings
from hypothesis import strategies as st


def _inputs(B, H, N, D, DV, seed=0, outputs=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64)
    dos = [torch.randn(B, H, N, DV, generator=gen, dtype=torch.float64) for _ in range(outputs)]
    return q, k, v, dos


def _run(fn, q, k, v, dos, dtype, *args):
    """fn's outputs (a tuple) and dq, dk, dv of Σ output·do, with inputs cast to dtype."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    outs = fn(*leaves, *args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, leaves, [do.to(dtype) for do in dos])
    return outs, grads


def _check(ref, got, tol):
    (outs_ref, grads_ref), (outs, grads) = ref, got
    for i, (o_ref, o) in enumerate(zip(outs_ref, outs, strict=True)):
        assert_close(f"output {i}", o_ref, o, tol)
    for name, g_ref, g in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, g_ref, g, tol, atol=1e-9)


# --- block-sparse ---------------------------------------------------------------------------------------------

# (B, H, N, d, dv, block, key_block): odd N, head dim 72, a short last block, separate query and key blocks, N = 1.
BLOCK_SHAPES = [
    (1, 2, 100, 72, 72, 32, 32),
    (2, 1, 63, 40, 24, 16, 32),
    (1, 1, 150, 72, 72, 128, 64),
    (1, 2, 1, 16, 16, 16, 16),
    (2, 2, 129, 72, 40, 64, 16),
]


def _map(B, H, N, block, key_block, seed=0, p=0.4):
    """A random block map with one empty row and one full row."""
    nq, nk = math.ceil(N / block), math.ceil(N / key_block)
    m = torch.rand(B, H, nq, nk, generator=torch.Generator().manual_seed(seed)) < p
    m[0, 0, 0] = False
    m[-1, -1, -1] = True
    return m


@pytest.mark.parametrize(("B", "H", "N", "D", "DV", "block", "key_block"), BLOCK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_sparse_blockwise_matches_float64_reference(B, H, N, D, DV, block, key_block, dtype):
    q, k, v, dos = _inputs(B, H, N, D, DV)
    m = _map(B, H, N, block, key_block)
    ref = _run(block_sparse_attention_naive, q, k, v, dos, torch.float64, m, block, key_block)
    got = _run(block_sparse_attention_blockwise, q, k, v, dos, dtype, m, block, key_block)
    _check(ref, got, 1e-12 if dtype == torch.float64 else 1e-5)


def test_block_sparse_blockwise_full_map_is_softmax_and_empty_map_is_zero():
    q, k, v, dos = _inputs(1, 2, 90, 72, 72)
    full = torch.ones(1, 2, 3, 6, dtype=torch.bool)
    ref = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, dos, torch.float64)
    _check(ref, _run(block_sparse_attention_blockwise, q, k, v, dos, torch.float64, full, 32, 16), 1e-12)
    o = block_sparse_attention_blockwise(q, k, v, ~full, 32, 16)
    assert torch.equal(o, torch.zeros_like(o))


# --- window (swa band, local 2-D, local 3-D) --------------------------------------------------------------------

# (grid, radius, shape, temporal_radius): 1-D bands, odd 2-D grids, float radii, 3-D with and without time radius.
WINDOWS = [
    ((100,), 5, "square", None),
    ((37,), 3.5, "circle", None),
    ((130,), 200, "square", None),
    ((7, 9), 2, "circle", None),
    ((7, 9), 2.5, "circle", None),
    ((3, 5), 1, "square", None),
    ((19, 21), 3, "square", None),
    ((1, 7), 1, "square", None),
    ((9, 1), 1, "circle", None),
    ((5, 6, 4), 2**0.5, "circle", None),
    ((4, 3, 5), 2, "square", None),
    ((3, 5, 7), 1.5, "circle", 1),
    ((5, 4, 4), 1, "square", 0),
    ((5, 1, 1), 1.9999999999999996, "square", None),  # 2.0 in fp32: the window compares in float64
]


@pytest.mark.parametrize(("grid", "radius", "shape", "temporal_radius"), WINDOWS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_window_blockwise_matches_float64_reference(grid, radius, shape, temporal_radius, dtype):
    q, k, v, dos = _inputs(1, 2, math.prod(grid), 72, 40)
    args = (tuple(grid), radius, shape, temporal_radius)
    ref = _run(window_attention_naive, q, k, v, dos, torch.float64, *args)
    got = _run(window_attention_blockwise, q, k, v, dos, dtype, *args)
    _check(ref, got, 1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize(
    ("grid", "window", "shape"), [((7, 9), 2, "circle"), ((3, 5), 0, "square"), ((6, 6), 3, "square")]
)
def test_window_reference_mask_equals_tile_mask_on_2d(grid, window, shape):
    assert torch.equal(grid_window_mask(grid, window, shape), window_mask(grid, window, shape))


def test_window_mask_definition_3d_with_temporal_radius():
    mask = grid_window_mask((3, 4, 5), 1.5, "circle", temporal_radius=1)
    coords = torch.cartesian_prod(torch.arange(3), torch.arange(4), torch.arange(5))
    for i in (0, 17, 59):
        for j in range(60):
            dt, dy, dx = (coords[j] - coords[i]).tolist()
            assert bool(mask[i, j]) == (abs(dt) <= 1 and dy * dy + dx * dx < 2.25)


@pytest.mark.parametrize(
    ("radius", "shape", "expected"),
    [
        (2, "square", 2),
        (2.9, "square", 2),
        (2, "circle", 1),
        (2.5, "circle", 2),
        (2**0.5, "circle", 1),
        (0.5, "circle", 0),
    ],
)
def test_reach(radius, shape, expected):
    assert reach(radius, shape) == expected


@settings(max_examples=25, deadline=None)
@given(
    grid=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    shape=st.sampled_from(["square", "circle"]),
    temporal=st.booleans(),
)
def test_window_covering_the_grid_is_softmax(grid, shape, temporal):
    """Property: a window reaching every token of the grid is plain softmax attention."""
    n = math.prod(grid)
    radius = float(sum(g * g for g in grid)) ** 0.5 + 1  # beyond the grid's diagonal
    temporal_radius = grid[0] if temporal and len(grid) == 3 else None
    q, k, v, _ = _inputs(1, 1, n, 8, 8, seed=n)
    got = window_attention_blockwise(q, k, v, grid, radius, shape, temporal_radius)
    assert_close("window", F.scaled_dot_product_attention(q, k, v), got, 1e-12)


@settings(max_examples=25, deadline=None)
@given(
    grid=st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple),
    radius=st.floats(0.5, 4.0),
    shape=st.sampled_from(["square", "circle"]),
)
def test_window_blockwise_matches_reference_property(grid, radius, shape):
    n = math.prod(grid)
    q, k, v, _ = _inputs(1, 1, n, 8, 8, seed=n)
    ref = window_attention_naive(q, k, v, grid, radius, shape)
    assert_close("window", ref, window_attention_blockwise(q, k, v, grid, radius, shape), 1e-12)


# --- SLA ----------------------------------------------------------------------------------------------------------

SLA_CASES = [
    (1, 2, 100, 72, 72, 32, 32, "relu", "marginal"),
    (2, 1, 150, 72, 40, 128, 64, "softmax", "marginal"),
    (1, 2, 63, 40, 40, 16, 32, "elu1", "all"),
    (1, 1, 200, 72, 72, 64, 16, "softmax", "all"),
    (1, 1, 1, 16, 16, 16, 16, "softmax", "marginal"),
]


@pytest.mark.parametrize(("B", "H", "N", "D", "DV", "block", "key_block", "feature_map", "linear_keys"), SLA_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sla_blockwise_matches_float64_reference(B, H, N, D, DV, block, key_block, feature_map, linear_keys, dtype):
    q, k, v, dos = _inputs(B, H, N, D, DV, outputs=2)
    critical, marginal = sla_block_index(q, k, block, 0.3, 0.2, key_block=key_block)
    marginal = None if linear_keys == "all" else marginal
    eps = 0.5 if N == 1 else 1e-6
    args = (critical, marginal, block, feature_map, eps, key_block)
    ref = _run(sla_attention_naive, q, k, v, dos, torch.float64, *args)
    got = _run(sla_attention_blockwise, q, k, v, dos, dtype, *args)
    _check(ref, got, 1e-12 if dtype == torch.float64 else 1e-5)


def test_sla_public_function_takes_the_released_variants():
    """key_block, softmax features and linear_keys="all" through the public function (blockwise on CPU)."""
    q, k, v, _ = _inputs(1, 2, 300, 72, 72)
    critical, marginal = sla_block_index(q, k, 128, 0.2, key_block=64)
    assert critical.shape == (1, 2, 3, 5)
    o_s, o_l = sla_attention(q, k, v, critical, None, 128, "softmax", 1e-5, key_block=64, linear_keys="all")
    ref_s, ref_l = sla_attention_naive(q, k, v, critical, None, 128, "softmax", 1e-5, 64)
    assert_close("o_sparse", ref_s, o_s, 1e-12)
    assert_close("o_linear", ref_l, o_l, 1e-12)
    # The first release's linear part: every non-critical block.
    o_s1, o_l1 = sla_attention(q, k, v, critical, ~critical, 128, "softmax", key_block=64)
    assert_close(
        "o_linear", sla_attention_naive(q, k, v, critical, ~critical, 128, "softmax", 1e-6, 64)[1], o_l1, 1e-12
    )


def test_sla_key_block_input_checks():
    q = torch.randn(1, 1, 100, 8)
    c = torch.zeros(1, 1, 1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="key_block must be one of"):
        sla_attention(q, q, q, c, c, 128, key_block=48)
    with pytest.raises(ValueError, match=r"\(1, 1, 1, 4\) for N=100, block=128, key_block=32"):
        sla_attention(q, q, q, c, c, 128, key_block=32)
    with pytest.raises(ValueError, match="linear_keys must be one of marginal, all"):
        sla_attention(q, q, q, c, c, 128, key_block=64, linear_keys="some")
    with pytest.raises(ValueError, match="feature_map must be one of relu, elu1, softmax"):
        sla_attention(q, q, q, c, c, 128, "tanh", key_block=64)


# --- frame tile ---------------------------------------------------------------------------------------------------

FRAME_CASES = [
    ((5, 3, 4), 1, 1),
    ((7, 2, 3), 3, 2),
    ((4, 3, 3), 2, 0),
    ((3, 2, 2), 1, 5),
    ((1, 5, 5), 1, 0),
    ((6, 1, 1), 4, 1),
    ((9, 3, 3), 2, 1),
]


@pytest.mark.parametrize(("grid", "group", "global_frames"), FRAME_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frame_tile_blockwise_matches_float64_reference(grid, group, global_frames, dtype):
    q, k, v, dos = _inputs(1, 2, math.prod(grid), 72, 40)
    ref = _run(frame_tile_attention_naive, q, k, v, dos, torch.float64, grid, group, global_frames)
    got = _run(frame_tile_attention_blockwise, q, k, v, dos, dtype, grid, group, global_frames)
    _check(ref, got, 1e-12 if dtype == torch.float64 else 1e-5)


def test_frame_pattern_definition():
    """Efficient-vDiT's mask 1:7 on 8 frames: frame 0 global (full row and column), the rest only themselves."""
    pattern = frame_pattern(8, 1, 1)
    expected = torch.eye(8, dtype=torch.bool)
    expected[0, :] = expected[:, 0] = True
    assert torch.equal(pattern, expected)
    # 2 global frames, groups of 3 over frames 2..8: {2,3,4}, {5,6,7}, {8}.
    pattern = frame_pattern(9, 3, 2)
    assert pattern[3, 4] and pattern[5, 7] and not pattern[4, 5] and not pattern[7, 8] and pattern[8, 1]
    assert frame_tile_pairs(9, 4, 3, 2) == int(frame_tile_mask((9, 2, 2), 3, 2).sum())


@settings(max_examples=20, deadline=None)
@given(
    frames=st.integers(1, 6),
    h=st.integers(1, 3),
    w=st.integers(1, 3),
    group=st.integers(1, 7),
    global_frames=st.integers(0, 7),
)
def test_frame_tile_covering_every_frame_is_softmax(frames, h, w, group, global_frames):
    """Property: one group holding every non-global frame, or every frame global, is softmax attention."""
    if not (group >= frames - global_frames or global_frames >= frames):
        group = frames
    q, k, v, _ = _inputs(1, 1, frames * h * w, 8, 8, seed=frames * 31 + h * 7 + w)
    got = frame_tile_attention_blockwise(q, k, v, (frames, h, w), group, global_frames)
    assert_close("frame_tile", F.scaled_dot_product_attention(q, k, v), got, 1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": (2, 3)}, "grid must be"),
        ({"grid": (2, 3, 5)}, r"grid \(2, 3, 5\) holds 30 tokens, q has N=24"),
        ({"group": 0}, "group must be an int ≥ 1"),
        ({"global_frames": -1}, "global_frames must be an int ≥ 0"),
        ({"global_frames": True}, "global_frames must be an int ≥ 0"),
    ],
)
def test_frame_tile_input_checks(kwargs, match):
    q = torch.randn(1, 1, 24, 8)
    arguments = {"grid": (2, 3, 4), "group": 1, "global_frames": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        frame_tile_attention(q, q, q, **arguments)


# --- dispatch and input checks of the public functions ----------------------------------------------------------


def test_cpu_dispatch_takes_blockwise_and_naive_when_forced(monkeypatch):
    q, k, v, _ = _inputs(1, 2, 63, 16, 16)
    m = _map(1, 2, 63, 16, 16)
    monkeypatch.delenv("DIT_GRAFT_KERNELS", raising=False)
    assert torch.equal(block_sparse_attention(q, k, v, m, 16), block_sparse_attention_blockwise(q, k, v, m, 16))
    assert torch.equal(
        tile_attention(q, k, v, (7, 9), 2, "circle"), window_attention_blockwise(q, k, v, (7, 9), 2, "circle")
    )
    assert torch.equal(window_attention(q, k, v, (63,), 4), window_attention_blockwise(q, k, v, (63,), 4))
    monkeypatch.setenv("DIT_GRAFT_KERNELS", "naive")
    assert torch.equal(block_sparse_attention(q, k, v, m, 16), block_sparse_attention_naive(q, k, v, m, 16))
    assert torch.equal(window_attention(q, k, v, (63,), 4), window_attention_naive(q, k, v, (63,), 4))
    assert torch.equal(frame_tile_attention(q, k, v, (7, 3, 3)), frame_tile_attention_naive(q, k, v, (7, 3, 3)))


def test_forced_triton_refuses_separate_block_sizes_and_3d_windows(triton_backend):
    q = torch.randn(1, 1, 64, 16, device=triton_backend)
    m = torch.ones(1, 1, 1, 2, dtype=torch.bool, device=triton_backend)
    with pytest.raises(ValueError, match="one block size for queries and keys, got block=64, key_block=32"):
        block_sparse_attention(q, q, q, m, 64, key_block=32)
    with pytest.raises(ValueError, match="one block size for queries and keys"):
        sla_attention(q, q, q, m, m, 64, key_block=32)
    with pytest.raises(ValueError, match="2-D grids with an integer window only"):
        window_attention(q, q, q, (4, 4, 4), 1, "square")
    with pytest.raises(ValueError, match="2-D grids with an integer window only"):
        window_attention(q, q, q, (8, 8), 1.5, "circle")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": (2, 2, 2, 2)}, "grid must be 1 to 3 positive ints"),
        ({"grid": (4, 5)}, r"grid \(4, 5\) holds 20 tokens, q has N=16"),
        ({"radius": -1}, "radius must be ≥ 0 for a square"),
        ({"radius": 0, "shape": "circle"}, "radius must be > 0 for a circle"),
        ({"radius": float("inf")}, "radius must be a finite number"),
        ({"shape": "diamond"}, "shape must be one of square, circle"),
        ({"temporal_radius": 1}, r"temporal_radius needs a 3-D grid \(frames, h, w\), got \(4, 4\)"),
        ({"grid": (1, 4, 4), "temporal_radius": -1}, "temporal_radius must be an int ≥ 0"),
    ],
)
def test_window_input_checks(kwargs, match):
    q = torch.randn(1, 1, 16, 8)
    arguments = {"grid": (4, 4), "radius": 1, "shape": "square", **kwargs}
    with pytest.raises(ValueError, match=match):
        window_attention(q, q, q, **arguments)


# --- memory: no call holds N x N scores ----------------------------------------------------------------------------


@pytest.fixture
def score_sizes(monkeypatch):
    """Records the number of scores of every `attend` call of the blockwise paths, with a small chunk budget."""
    sizes = []
    real = blockwise_core.attend

    def recording(q, k, v, mask, scale):
        sizes.append(q.shape[:-1].numel() * k.shape[-2])
        return real(q, k, v, mask, scale)

    for module in (block_sparse_blockwise, window_blockwise, frame_tile_blockwise):
        monkeypatch.setattr(module, "attend", recording)
    monkeypatch.setattr(blockwise_core, "CHUNK_ELEMENTS", 2**16)
    return sizes


def test_blockwise_paths_never_hold_n_by_n_scores(score_sizes):
    """At N = 4096, every path computes in chunks far below N² scores, and in total a small multiple of its kept
    pairs."""
    N = 4096
    q = torch.randn(1, 1, N, 16, requires_grad=True)
    m = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    m[..., :2] = True  # 2 of 64 key blocks
    calls = [
        (lambda: block_sparse_attention_blockwise(q, q, q, m, 64), N * 128),
        (lambda: window_attention_blockwise(q, q, q, (N,), 64, "square"), N * 129),
        (lambda: window_attention_blockwise(q, q, q, (64, 64), 4, "circle"), N * 49),
        (lambda: window_attention_blockwise(q, q, q, (16, 16, 16), 2, "square", 1), N * 75),
        (lambda: frame_tile_attention_blockwise(q, q, q, (16, 16, 16), 1, 1), None),
    ]
    for fn, kept in calls:
        score_sizes.clear()
        fn().sum().backward()
        # One chunk holds at most the budget, or one query group when a group alone exceeds it: far below N².
        assert max(score_sizes) <= max(2**16, N * N // 64), max(score_sizes)
        # Forward once, backward recomputes each chunk once (checkpointing): twice the scores.
        total = sum(score_sizes) / 2
        if kept is not None:  # window tiles trade extra scores for fewer gathers (window/blockwise.py, tile_sizes)
            assert total <= 16 * kept, (total, kept)
        assert total < N * N / 4


# --- text prefix (CLEAR's rule: text rows and columns dense) ------------------------------------------------------


def _clear_reference(q, k, v, image_mask, text):
    """Dense attention with the image-pair mask under CLEAR's rule, built independently of the kernels."""
    length = q.shape[2]
    mask = torch.ones(*image_mask.shape[:-2], length, length, dtype=torch.bool)
    mask[..., text:, text:] = image_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_text_prefix_window_block_sparse_frame_tile(dtype):
    T = 7
    q, k, v, dos = _inputs(1, 2, T + 60, 72, 40, seed=5)
    # window on a 6 x 10 grid
    ref = _run(
        lambda q, k, v: _clear_reference(q, k, v, grid_window_mask((6, 10), 2, "circle"), T),
        q,
        k,
        v,
        dos,
        torch.float64,
    )
    got = _run(lambda q, k, v: window_attention(q, k, v, (6, 10), 2, "circle", text=T), q, k, v, dos, dtype)
    _check(ref, got, 1e-12 if dtype == torch.float64 else 1e-5)
    # block-sparse over the 60 image tokens, blocks of 16 (a short last block), one empty row
    m = _map(1, 2, 60, 16, 16, seed=5)
    from dit_graft.kernels.block_sparse.naive import dense_block_mask

    dense = dense_block_mask(m, 60, 16)  # [1, 2, 60, 60]
    ref = _run(lambda q, k, v: _clear_reference(q, k, v, dense, T), q, k, v, dos, torch.float64)
    got = _run(lambda q, k, v: block_sparse_attention(q, k, v, m, 16, text=T), q, k, v, dos, dtype)
    _check(ref, got, 1e-12 if dtype == torch.float64 else 1e-5)
    # frame tile on (5, 3, 4), groups of 2, one global frame
    ref = _run(
        lambda q, k, v: _clear_reference(q, k, v, frame_tile_mask((5, 3, 4), 2, 1), T), q, k, v, dos, torch.float64
    )
    got = _run(lambda q, k, v: frame_tile_attention(q, k, v, (5, 3, 4), 2, 1, text=T), q, k, v, dos, dtype)
    _check(ref, got, 1e-12 if dtype == torch.float64 else 1e-5)


def test_text_prefix_sla_blockwise_matches_reference():
    T = 5
    q, k, v, dos = _inputs(1, 2, T + 100, 40, 40, seed=6, outputs=2)
    critical, marginal = sla_block_index(q[:, :, T:], k[:, :, T:], 32, 0.3, 0.2)
    args = (critical, marginal, 32, "softmax", 1e-6, 32, T)
    ref = _run(sla_attention_naive, q, k, v, dos, torch.float64, *args)
    got = _run(sla_attention_blockwise, q, k, v, dos, torch.float64, *args)
    _check(ref, got, 1e-12)
    assert torch.equal(got[0][1][:, :, :T], torch.zeros_like(got[0][1][:, :, :T]))
    # the sparse part is CLEAR's rule on the critical blocks
    from dit_graft.kernels.block_sparse.naive import dense_block_mask

    expected = _clear_reference(q, k, v, dense_block_mask(critical, 100, 32), T)
    assert_close("o_sparse", expected, got[0][0], 1e-12)


def test_text_prefix_input_checks():
    q = torch.randn(1, 1, 20, 8)
    with pytest.raises(ValueError, match=r"grid \(4, 4\) holds 16 tokens, q has N=20 after 3 text tokens"):
        window_attention(q, q, q, (4, 4), 1, text=3)
    with pytest.raises(ValueError, match=r"text must be an int in \[0, N=20\)"):
        window_attention(q, q, q, (4, 5), 1, text=-1)
    m = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="for N=16 after 4 text tokens"):
        block_sparse_attention(q, q, q, torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, text=4)
    assert block_sparse_attention(q, q, q, m, 16, text=4).shape == q.shape
