"""The `sla` operator (sparse-linear attention via the public kernels); `local`'s route through tile_attention."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from dit_graft.kernels.tile.naive import window_mask
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import dit_graft
from dit_graft.export import export
from dit_graft.operators import OPERATORS, Site
from dit_graft.operators import local as local_module
from dit_graft.operators.base import installed_operator
from dit_graft.operators.local import (
    LocalCore,
    LocalOptions,
    grid_window_is_full,
    grid_window_mask,
    tile_window,
)
from dit_graft.operators.sla import SlaCore, SlaOptions, critical_blocks
from dit_graft.operators.sparse import SparseCore, SparseOptions
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from tests.conftest import TINY_DIT, grafted, tiny_dit, tiny_recipe
from tests.test_cli import run_cli

SLA = OPERATORS.get("sla")
# On a 16x16-pixel tiny DiT (an 8x8 grid, 64 tokens) with 16-token blocks: 1 critical, 1 negligible, 2 marginal.
GRAFT = {"block": 16, "critical": 1, "negligible": 1}


def _attention(heads: int, dim_head: int, seed: int = 0, dtype=torch.float32) -> Attention:
    torch.manual_seed(seed)
    return Attention(heads * dim_head, heads=heads, dim_head=dim_head, bias=True).to(dtype).eval()


def _run(attn: Attention, processor, x: torch.Tensor) -> torch.Tensor:
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x)


def _sla(dim_head: int, options: SlaOptions, proj_l_seed: int | None = None, dtype=torch.float32):
    """An sla processor; with a seed, proj_l is set to random weights (as after fine-tuning)."""
    processor = grafted(SlaCore(dim_head, options)).to(dtype)
    if proj_l_seed is not None:
        g = torch.Generator().manual_seed(proj_l_seed)
        with torch.no_grad():
            processor.core.proj_l.weight.copy_(
                torch.randn(dim_head, dim_head, generator=g, dtype=dtype) / dim_head**0.5
            )
    return processor


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 150),
    block=st.sampled_from([16, 32, 64, 128]),
    heads=st.integers(1, 3),
    as_count=st.booleans(),
    negligible=st.sampled_from([0, 2, 0.0, 0.5]),
    seed=st.integers(0, 3),
)
def test_every_block_critical_is_softmax_attention_whatever_proj_l(n, block, heads, as_count, negligible, seed):
    attn = _attention(heads, 8, seed)
    x = torch.randn(2, n, heads * 8, generator=torch.Generator().manual_seed(seed))
    critical = math.ceil(n / block) + seed if as_count else 1.0
    options = SlaOptions(block=block, critical=critical, negligible=negligible)
    expected = _run(attn, AttnProcessor2_0(), x)
    got = _run(attn, _sla(8, options, proj_l_seed=seed), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, block, critical, negligible", [(100, 16, 2, 1), (70, 32, 0.4, 0.0), (129, 64, 1, 0.5)])
def test_at_initialisation_sla_is_its_sparse_part(n, block, critical, negligible):
    attn = _attention(3, 8)
    x = torch.randn(2, n, 24)
    sparse = _run(attn, grafted(SparseCore(SparseOptions(block=block, keep=critical))), x)
    sla = _run(attn, _sla(8, SlaOptions(block=block, critical=critical, negligible=negligible)), x)
    assert torch.equal(sla, sparse)


def _direct_sla(attn: Attention, proj_l: torch.nn.Linear, x: torch.Tensor, options: SlaOptions) -> torch.Tensor:
    """The documented rule written out in float64: pooled scores, three-way split, softmax + proj_l(linear)."""
    b, n, c = x.shape
    h, block = attn.heads, options.block
    q, k, v = (t.view(b, n, h, c // h).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    blocks = torch.arange(n) // block  # block of each token
    nb = int(blocks[-1]) + 1
    pool = torch.zeros(nb, n, dtype=x.dtype).index_put_((blocks, torch.arange(n)), torch.ones(n, dtype=x.dtype))
    pool = pool / pool.sum(1, keepdim=True)  # (nb, N): row J averages block J
    scores = (pool @ q) @ (pool @ k).transpose(-1, -2)  # (B, H, nb, nb)
    n_crit = critical_blocks(options.critical, nb)
    neg = options.negligible
    n_neg = min(neg if isinstance(neg, int) else math.floor(neg * nb), nb - n_crit)
    order = scores.argsort(dim=-1, descending=True)  # best first
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb).expand_as(order))
    crit_blocks, marg_blocks = rank < n_crit, (rank >= n_crit) & (rank < nb - n_neg)
    crit = crit_blocks[:, :, blocks][:, :, :, blocks]  # (B, H, N, N)
    marg = marg_blocks[:, :, blocks][:, :, :, blocks]
    att = (q @ k.transpose(-1, -2) / math.sqrt(c // h)).masked_fill(~crit, float("-inf")).softmax(-1)
    phi = F.relu if options.feature_map == "relu" else (lambda t: F.elu(t) + 1)
    lin = (phi(q) @ phi(k).transpose(-1, -2)) * marg  # (B, H, N, N)
    o_linear = (lin @ v) / (lin.sum(-1, keepdim=True) + options.eps)
    o = att @ v + o_linear @ proj_l.weight.T
    return attn.to_out[0](o.transpose(1, 2).reshape(b, n, c))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 140),
    block=st.sampled_from([16, 32]),
    critical=st.one_of(st.integers(1, 4), st.floats(0.01, 1.0)),
    negligible=st.one_of(st.integers(0, 4), st.floats(0.0, 0.99)),
    feature_map=st.sampled_from(["relu", "elu1"]),
    seed=st.integers(0, 3),
)
def test_sla_matches_the_documented_rule_on_odd_lengths(n, block, critical, negligible, feature_map, seed):
    attn = _attention(2, 8, seed, torch.float64)
    options = SlaOptions(block=block, critical=critical, negligible=negligible, feature_map=feature_map)
    processor = _sla(8, options, proj_l_seed=seed, dtype=torch.float64)
    x = torch.randn(2, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    got = _run(attn, processor, x)
    with torch.no_grad():
        expected = _direct_sla(attn, processor.core.proj_l, x, options)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _graft(tmp_path, options=GRAFT):
    teacher = tiny_dit(sample_size=16)  # an 8x8 token grid
    data = tiny_recipe(tmp_path, tmp_path / "out")
    data["graft"] = [{"site": "attention", "layers": "all", "op": "sla", "options": options}]
    recipe = validate(data)
    graft_plan = plan(teacher, recipe)
    return teacher, apply(teacher, graft_plan), graft_plan, recipe


def _inputs(batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 1, size, size, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        class_labels=torch.randint(0, 4, (batch,), generator=g),
    )


def test_sla_adds_only_proj_l_and_every_weight_gets_a_gradient(tmp_path):
    teacher, student, _, _ = _graft(tmp_path)
    added = {n: p for n, p in student.named_parameters() if ".processor." in n}
    assert sorted(added) == [f"transformer_blocks.{i}.attn1.processor.core.proj_l.weight" for i in range(2)]
    assert all(p.shape == (8, 8) and not p.any() for p in added.values())
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in teacher.parameters()) + 2 * 64
    op, options = installed_operator(student.transformer_blocks[0].attn1.processor)
    assert op.name == "sla" and options == SlaOptions(**GRAFT)
    student.train()
    student(**_inputs()).sample.square().mean().backward()
    for name, p in added.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name in ("to_q", "to_k", "to_v"):
        assert getattr(student.transformer_blocks[1].attn1, name).weight.grad.abs().sum() > 0, name


def test_sla_export_reload_is_bitwise_exact(tmp_path):
    _, student, graft_plan, recipe = _graft(tmp_path)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".processor." in name:
                p.add_(0.1 * torch.randn_like(p))
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "export", {"steps": 0})
    reloaded = dit_graft.from_pretrained(out)
    x = _inputs()
    with torch.no_grad():
        y = student(**x).sample
        assert torch.equal(y, reloaded(**x).sample)
        student.transformer_blocks[0].attn1.processor.core.proj_l.weight.zero_()
        assert not torch.equal(y, student(**x).sample)  # the trained proj_l mattered


def test_cli_lists_sla(capsys):
    code, out, _ = run_cli(["operators"], capsys)
    assert code == 0 and "sla" in out


@pytest.mark.parametrize(
    "options, match",
    [
        ({"critical": 0}, "block count must be ≥ 1"),
        ({"critical": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"critical": 1.5}, r"fraction must be in \(0, 1\]"),
        ({"critical": True}, "not a bool"),
        ({"negligible": -1}, "block count must be ≥ 0"),
        ({"negligible": 1.0}, r"fraction must be in \[0, 1\)"),
        ({"negligible": False}, "not a bool"),
        ({"block": 48}, "16"),
        ({"feature_map": "tanh"}, "relu"),
        ({"key_block": 48}, "16"),
        ({"linear_keys": "some"}, "marginal"),
        ({"linear_keys": "all"}, "negligible: 0.1 has no effect with linear_keys: all"),
        ({"eps": 0}, "greater than 0"),
        ({"keep": 3}, "Extra inputs"),
    ],
)
def test_bad_sla_options_are_rejected(options, match):
    with pytest.raises(ValidationError, match=match):
        SLA.parse_options(options)


def test_sla_defaults_are_the_papers_split():
    options = SLA.parse_options({})
    assert (options.block, options.critical, options.negligible, options.feature_map) == (64, 0.05, 0.1, "relu")
    assert critical_blocks(0.05, 64) == 4 and critical_blocks(0.001, 8) == 1 and critical_blocks(20, 8) == 8


def test_sla_flops_are_the_sparse_part_plus_the_linear_part():
    site = Site("a", "attention", 0, 1152, 16)  # d = 72
    n, c, d, nb = 4096, 1152, 72, 64
    sparse = OPERATORS.get("sparse")
    for critical in (4, 0.25, 1.0):
        sparse_part = sparse.flops(site, n, sparse.parse_options({"block": 64, "keep": critical}))
        linear_part = 4 * n * d * c + 2 * n * c + 2 * nb * nb * (d + 1) * c  # states, state sums, read-out
        proj_l = 2 * n * d * c
        got = SLA.flops(site, n, SlaOptions(block=64, critical=critical))
        assert got == sparse_part + linear_part + proj_l
    softmax = OPERATORS.get("softmax")
    dense = softmax.flops(site, n, softmax.parse_options({}))
    assert SLA.flops(site, n, SlaOptions()) < dense / 10


def test_sla_plans_and_runs_on_the_meta_device(tmp_path):
    with torch.device("meta"):
        teacher = DiTTransformer2DModel(**{**TINY_DIT, "sample_size": 16})
    data = tiny_recipe(tmp_path, tmp_path / "out")
    data["graft"] = [{"site": "attention", "layers": "all", "op": "sla", "options": GRAFT}]
    student = apply(teacher, plan(teacher, validate(data)))
    with torch.no_grad():
        y = student(**{k: v.to("meta") for k, v in _inputs().items()}).sample
    assert y.device.type == "meta" and y.shape == (2, 2, 16, 16)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), radius=st.floats(0.3, 12), shape=st.sampled_from(["circle", "square"]))
def test_tile_window_gives_the_operators_mask_or_none(h, w, radius, shape):
    window = tile_window(h, w, radius, shape)
    mask = grid_window_mask(h, w, radius, shape, "cpu")
    if window is None:
        assert shape == "circle"
        assert not any(torch.equal(window_mask((h, w), r, shape), mask) for r in range(1, h + w + 1))
    else:
        assert torch.equal(window_mask((h, w), window, shape), mask)


def test_tile_window_maps_the_usual_radii():
    assert tile_window(64, 64, 8.0, "circle") == 8 and tile_window(64, 64, 1.5, "circle") == 2
    assert tile_window(64, 64, 2**0.5, "circle") == 2 and tile_window(64, 64, 2.5, "circle") is None
    assert tile_window(3, 2, 2.5, "circle") == 3  # Δ = (2, 2) does not exist on a 2-wide grid
    assert tile_window(64, 64, 2.9, "square") == 2 and tile_window(64, 64, 0.5, "square") == 0


def _triton_device() -> str:
    """The device the Triton kernels run on here, or a skip."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    from dit_graft.kernels._dispatch import triton_interpreting

    if not triton_interpreting():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")
    return "cpu"


@pytest.mark.parametrize(
    "window, shape, routed",
    [(1.5, "circle", True), (1, "square", True), (2.0, "square", True), (2.5, "circle", False), (9.0, "circle", False)],
)
def test_local_through_tile_attention_agrees_with_the_masked_path(monkeypatch, window, shape, routed):
    device = _triton_device()
    calls = []
    tile_attention = local_module.tile_attention

    def spy(q, k, v, grid, window, shape):
        calls.append((grid, window))
        return tile_attention(q, k, v, grid, window, shape)

    monkeypatch.setattr(local_module, "tile_attention", spy)
    grid = (3, 5)
    attn = _attention(2, 8).to(device)
    attn.set_processor(grafted(LocalCore(LocalOptions(window=window, shape=shape)), grid))
    x = torch.randn(2, 15, 16, device=device)
    outputs = {}
    for backend in ("naive", "triton"):
        monkeypatch.setenv("DIT_GRAFT_KERNELS", backend)
        leaf = x.clone().requires_grad_()
        y = attn(leaf)
        y.square().sum().backward()
        outputs[backend] = (y.detach(), leaf.grad)
    assert len(calls) == (1 if routed else 0)
    if routed:
        assert calls[0] == (grid, tile_window(*grid, window, shape))
    assert grid_window_is_full(*grid, window, shape) == (window == 9.0)
    for got, expected in zip(outputs["triton"], outputs["naive"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
