"""The `sla` operator's options for thu-ml's two released SLA variants, against independent transcriptions of
their formulas (read from github.com/thu-ml/SLA: first release 66d711e = branch SLA-1, main d973e55)."""

import math

import pytest
import torch
import torch.nn.functional as F
from dit_graft.kernels.block_sparse.naive import dense_block_mask
from dit_graft.kernels.testing import assert_close

from dit_graft.model.layout import TokenLayout
from dit_graft.operators.base import OPERATORS, Site, TokenGrid
from dit_graft.operators.sla import SlaCore, SlaOptions

SLA = OPERATORS.get("sla")


def _qkv(n, d=16, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def _critical_map(q, k, block, key_block, topk):
    """thu-ml's get_block_map: pooled q · pooled (k − mean k), top ⌈…⌉ per query block (ours: rounded up, ≥ 1)."""
    n = q.shape[2]
    nq, nk = math.ceil(n / block), math.ceil(n / key_block)
    kc = k - k.mean(dim=-2, keepdim=True)
    pq = torch.stack([q[:, :, i * block : (i + 1) * block].mean(2) for i in range(nq)], 2)
    pk = torch.stack([kc[:, :, j * key_block : (j + 1) * key_block].mean(2) for j in range(nk)], 2)
    count = max(1, math.ceil(topk * nk))
    top = (pq @ pk.transpose(-1, -2)).topk(count, dim=-1).indices
    return torch.zeros(*pq.shape[:3], nk, dtype=torch.bool).scatter_(-1, top, True)


def _release(q, k, v, critical, block, key_block, linear_all, proj, eps):
    """o_s + proj_l(o_l) as thu-ml computes it: softmax features; o_l over every key (main) or every
    non-critical block (SLA-1: all block states minus the critical ones)."""
    n = q.shape[2]
    mask = dense_block_mask(critical, n, block, key_block)
    o_s = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    cq, ck = F.softmax(q, dim=-1), F.softmax(k, dim=-1)
    weights = cq @ ck.transpose(-1, -2)  # [B, H, N, N]
    if not linear_all:
        weights = weights * (~mask)
    o_l = (weights @ v) / (weights.sum(-1, keepdim=True) + eps)
    return o_s + proj(o_l)


@pytest.mark.parametrize("linear_all", [False, True])
def test_options_reproduce_the_released_variants(linear_all):
    n, block, key_block, topk = 300, 128, 64, 0.3
    q, k, v = _qkv(n)
    options = SlaOptions(
        block=block,
        key_block=key_block,
        critical=topk,
        negligible=0,
        feature_map="softmax",
        linear_keys="all" if linear_all else "marginal",
        proj_bias=True,
        eps=1e-5,
    )
    core = SlaCore(16, options).double()
    with torch.no_grad():  # proj_l as after fine-tuning
        core.proj_l.weight.copy_(torch.randn(16, 16, dtype=torch.float64) / 4)
        core.proj_l.bias.copy_(torch.randn(16, dtype=torch.float64))
    got = core(q, k, v, TokenLayout(grid=(10, 30)))
    critical = _critical_map(q, k, block, key_block, topk)
    expected = _release(q, k, v, critical, block, key_block, linear_all, core.proj_l, 1e-5)
    assert_close("sla", expected, got, 1e-10)


def test_proj_l_starts_at_zero_with_its_bias():
    core = SlaCore(16, SlaOptions(proj_bias=True, negligible=0, linear_keys="all"))
    assert core.proj_l.bias is not None and torch.count_nonzero(core.proj_l.weight) == 0
    assert torch.count_nonzero(core.proj_l.bias) == 0
    assert SlaCore(16, SlaOptions()).proj_l.bias is None


def test_flops_follow_the_key_block_and_linear_keys():
    site = Site("a", "attention", 0, 64, 4, TokenGrid((32, 32)))
    marginal = SlaOptions(block=128, key_block=64, negligible=0)
    everything = SlaOptions(block=128, key_block=64, negligible=0, linear_keys="all")
    c, d, n_q, n_k = 64, 16, 8, 16
    assert SLA.flops(site, 1024, marginal) - SLA.flops(site, 1024, everything) == 2 * n_q * n_k * (d + 1) * c
    # one critical key block of 64 per query: 4 · N · 64 · C for the sparse part
    one = SlaOptions(block=128, key_block=64, critical=1, negligible=0, linear_keys="all")
    two = SlaOptions(block=128, key_block=64, critical=2, negligible=0, linear_keys="all")
    assert SLA.flops(site, 1024, two) - SLA.flops(site, 1024, one) == 4 * 1024 * 64 * c
