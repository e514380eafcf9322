"""The `sparse` operator: top-k block-sparse softmax attention through the public kernels."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dit_graft.operators import OPERATORS, Site
from dit_graft.operators.base import installed_operator
from dit_graft.operators.sparse import SparseCore, SparseOptions, kept_blocks
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from tests.conftest import grafted, tiny_dit, tiny_recipe

SPARSE = OPERATORS.get("sparse")


def _attention(heads: int, dim_head: int, seed: int = 0, dtype=torch.float32) -> Attention:
    torch.manual_seed(seed)
    return Attention(heads * dim_head, heads=heads, dim_head=dim_head, bias=True).to(dtype).eval()


def _run(attn: Attention, processor, x: torch.Tensor) -> torch.Tensor:
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 150),
    block=st.sampled_from([16, 32, 64, 128]),
    heads=st.integers(1, 3),
    as_count=st.booleans(),
    seed=st.integers(0, 3),
)
def test_keeping_every_block_is_softmax_attention(n, block, heads, as_count, seed):
    attn = _attention(heads, 8, seed)
    x = torch.randn(2, n, heads * 8, generator=torch.Generator().manual_seed(seed))
    keep = math.ceil(n / block) + seed if as_count else 1.0  # a count at or above the block count, or all
    expected = _run(attn, AttnProcessor2_0(), x)
    got = _run(attn, grafted(SparseCore(SparseOptions(block=block, keep=keep))), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _direct_sparse(attn: Attention, x: torch.Tensor, block: int, keep) -> torch.Tensor:
    """The documented rule written out: mean-pool q and k per block, keep the top blocks, masked softmax."""
    b, n, c = x.shape
    h = attn.heads
    q, k, v = (t.view(b, n, h, c // h).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    blocks = torch.arange(n) // block  # block of each token
    nb = int(blocks[-1]) + 1
    pool = torch.zeros(nb, n, dtype=x.dtype).index_put_((blocks, torch.arange(n)), torch.ones(n, dtype=x.dtype))
    pool = pool / pool.sum(1, keepdim=True)  # (nb, N): row J averages block J
    scores = (pool @ q) @ (pool @ k).transpose(-1, -2)  # (B, H, nb, nb)
    count = min(keep, nb) if isinstance(keep, int) else max(1, math.ceil(keep * nb))
    top = scores.topk(count, dim=-1).indices
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    visible = kept[:, :, blocks][:, :, :, blocks]  # (B, H, N, N)
    att = (q @ k.transpose(-1, -2) / math.sqrt(c // h)).masked_fill(~visible, float("-inf")).softmax(-1)
    return attn.to_out[0]((att @ v).transpose(1, 2).reshape(b, n, c))


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 140),
    block=st.sampled_from([16, 32]),
    keep=st.one_of(st.integers(1, 5), st.floats(0.01, 1.0)),
    seed=st.integers(0, 3),
)
def test_sparse_matches_the_documented_rule_on_odd_lengths(n, block, keep, seed):
    attn = _attention(2, 8, seed, torch.float64)
    x = torch.randn(2, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    got = _run(attn, grafted(SparseCore(SparseOptions(block=block, keep=keep))), x)
    with torch.no_grad():
        torch.testing.assert_close(got, _direct_sparse(attn, x, block, keep), rtol=1e-10, atol=1e-10)


def test_fewer_kept_blocks_change_the_output_and_gradients_reach_the_projections():
    attn = _attention(2, 8)
    x = torch.randn(1, 100, 16)
    attn.set_processor(grafted(SparseCore(SparseOptions(block=16, keep=2))))
    y = attn(x)
    assert not torch.allclose(y, _run(attn, AttnProcessor2_0(), x).detach(), atol=1e-3)
    y.square().sum().backward()
    for name in ("to_q", "to_k", "to_v"):
        assert getattr(attn, name).weight.grad.abs().sum() > 0, name


def test_computing_in_small_chunks_changes_nothing(monkeypatch):
    from dit_graft.kernels import _blockwise

    attn = _attention(3, 8)
    x = torch.randn(2, 70, 24)
    processor = grafted(SparseCore(SparseOptions(block=16, keep=0.5)))
    whole = _run(attn, processor, x)
    monkeypatch.setattr(_blockwise, "CHUNK_ELEMENTS", 1)  # one query block per chunk
    torch.testing.assert_close(_run(attn, processor, x), whole, rtol=1e-6, atol=1e-7)


def test_sparse_grafts_with_no_new_parameters_and_is_tagged(tmp_path):
    teacher = tiny_dit()
    data = tiny_recipe(tmp_path, tmp_path / "out")
    data["graft"] = [{"site": "attention", "layers": "all", "op": "sparse", "options": {"block": 16, "keep": 1}}]
    student = apply(teacher, plan(teacher, validate(data)))
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in teacher.parameters())
    op, options = installed_operator(student.transformer_blocks[1].attn1.processor)
    assert op.name == "sparse" and options == SparseOptions(block=16, keep=1)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"keep": 0}, "block count must be ≥ 1"),
        ({"keep": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"keep": 1.5}, r"fraction must be in \(0, 1\]"),
        ({"keep": True}, "not a bool"),
        ({"block": 48}, "16"),
        ({"window": 3}, "Extra inputs"),
    ],
)
def test_bad_sparse_options_are_rejected(options, match):
    with pytest.raises(ValidationError, match=match):
        SPARSE.parse_options(options)


def test_keep_one_is_one_block_and_keep_one_point_zero_is_all():
    assert SPARSE.parse_options({"keep": 1}).keep == 1 and kept_blocks(1, 8) == 1
    assert kept_blocks(SPARSE.parse_options({"keep": 1.0}).keep, 8) == 8
    assert kept_blocks(0.3, 8) == 3 and kept_blocks(0.001, 8) == 1 and kept_blocks(20, 8) == 8


def test_sparse_flops_count_the_kept_blocks():
    site = Site("a", "attention", 0, 1152, 16)
    softmax = OPERATORS.get("softmax")
    dense = softmax.flops(site, 4096, softmax.parse_options({}))
    scores = 2 * 64 * 64 * 1152  # pooled block scores, 64 blocks
    assert SPARSE.flops(site, 4096, SparseOptions(block=64, keep=1.0)) == dense + scores
    assert SPARSE.flops(site, 4096, SparseOptions(block=64, keep=8)) == dense // 8 + scores
    assert SPARSE.flops(site, 4096, SparseOptions(block=64, keep=0.25)) == dense // 4 + scores
