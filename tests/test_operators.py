"""The grafting operators: local, swa, sparse, gated_conv, mlp_ratio, conv_mlp — references, inheritance, gradients,
export, FLOP formulas."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.attention_processor import Attention
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import dit_graft
from dit_graft.cost import model_cost
from dit_graft.errors import RecipeError
from dit_graft.export import export
from dit_graft.families import family_for
from dit_graft.families.base import count_flops
from dit_graft.families.dit import DIT, SelfAttentionAdapter
from dit_graft.operators import OPERATORS, Site, TokenGrid
from dit_graft.operators.base import band_pairs, build_replacement
from dit_graft.operators.local import LocalCore, LocalOptions, grid_window_mask, grid_window_pairs
from dit_graft.operators.swa import SwaCore, SwaOptions, band_mask
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from tests.conftest import TINY_DIT, grafted, tiny_dit, tiny_recipe
from tests.test_cli import run_cli

DIM = 16  # tiny DiT width: 2 heads x 8; FFN hidden 64 (ratio 4); 4x4 token grid

# (site, op, options): one spec per operator, plus the variants with their own init paths
SPECS = {
    "local-circle": ("attention", "local", {"window": 1.5}),
    "local-square": ("attention", "local", {"window": 1, "shape": "square"}),
    "swa": ("attention", "swa", {"window": 5}),
    "sparse": ("attention", "sparse", {"block": 16, "keep": 1}),
    "gated_conv": ("attention", "gated_conv", {"kernel": 3}),
    "mlp_ratio-narrow-magnitude": ("mlp", "mlp_ratio", {"ratio": 1.5}),
    "mlp_ratio-narrow-taylor": ("mlp", "mlp_ratio", {"ratio": 1.5, "importance": "taylor", "calibration_tokens": 64}),
    "mlp_ratio-wide": ("mlp", "mlp_ratio", {"ratio": 6}),
    "conv_mlp": ("mlp", "conv_mlp", {"kernel": 3}),
}


def _inputs(batch=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 1, size, size, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        class_labels=torch.randint(0, 4, (batch,), generator=g),
    )


def _recipe(tmp_path, site, op, options, layers="all"):
    data = tiny_recipe(tmp_path, tmp_path / "out")
    data["graft"] = [{"site": site, "layers": layers, "op": op, "options": options}]
    return validate(data)


def _graft(tmp_path, site, op, options, teacher=None):
    teacher = teacher or tiny_dit()
    graft_plan = plan(teacher, _recipe(tmp_path, site, op, options))
    return teacher, apply(teacher, graft_plan), graft_plan


def _new_parameters(student, site):
    """The parameters an operator added: the processors' (attention) or the whole replacement module's (MLP)."""
    marker = ".processor." if site == "attention" else ".ff."
    return {n: p for n, p in student.named_parameters() if marker in n}


def _module(model, site, layer=0):
    block = model.transformer_blocks[layer]
    return block.attn1 if site == "attention" else block.ff


def _attention(seed=0):
    torch.manual_seed(seed)
    return Attention(DIM, heads=2, dim_head=8, bias=True).double().eval()


def _masked_reference(attn, x, visible):
    """Softmax attention in float64 where `visible[i][j]` (nested Python bools) says key j is in query i's window."""
    b, n, _ = x.shape
    q, k, v = (t.view(b, n, 2, 8).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    scores = q @ k.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(~torch.tensor(visible), float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, DIM)
    return attn.to_out[0](o)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    radius=st.floats(0.3, 7.5),
    shape=st.sampled_from(["circle", "square"]),
)
def test_local_matches_a_direct_windowed_softmax(h, w, radius, shape):
    attn = _attention()
    attn.set_processor(grafted(LocalCore(LocalOptions(window=radius, shape=shape)), (h, w)))
    x = torch.randn(2, h * w, DIM, dtype=torch.float64)
    pos = [(n // w, n % w) for n in range(h * w)]  # row-major, as PatchEmbed flattens
    if shape == "circle":
        visible = [[(yi - yj) ** 2 + (xi - xj) ** 2 < radius**2 for yj, xj in pos] for yi, xi in pos]
    else:
        visible = [[max(abs(yi - yj), abs(xi - xj)) <= radius for yj, xj in pos] for yi, xi in pos]
    torch.testing.assert_close(attn(x), _masked_reference(attn, x, visible), rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 41), window=st.integers(1, 90))
def test_swa_matches_a_direct_band_softmax(n, window):
    attn = _attention()
    attn.set_processor(grafted(SwaCore(SwaOptions(window=window))))
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    visible = [[abs(i - j) <= window // 2 for j in range(n)] for i in range(n)]
    torch.testing.assert_close(attn(x), _masked_reference(attn, x, visible), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "op, options",
    [
        ("local", {"window": 4.25}),  # 3² + 3² = 18 < 4.25² on the 4x4 grid
        ("local", {"window": 3, "shape": "square"}),
        ("swa", {"window": 32}),  # w ≥ 2N, N = 16
        ("swa", {"window": 33}),
    ],
)
def test_a_window_covering_every_token_is_softmax_attention(tmp_path, op, options):
    teacher, student, _ = _graft(tmp_path, "attention", op, options)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(student(**x).sample, teacher(**x).sample)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_mlp_ratio_at_the_teachers_ratio_is_the_teachers_ffn(tmp_path, importance):
    teacher, student, _ = _graft(tmp_path, "mlp", "mlp_ratio", {"ratio": 4, "importance": importance})
    assert student.transformer_blocks[0].ff.net[0].proj.out_features == 4 * DIM
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(student(**x).sample, teacher(**x).sample)


def test_mlp_ratio_widening_starts_as_the_teacher(tmp_path):
    teacher, student, _ = _graft(tmp_path, "mlp", "mlp_ratio", {"ratio": 6})
    ff = student.transformer_blocks[0].ff
    assert ff.net[2].weight.shape == (DIM, 6 * DIM) and not ff.net[2].weight[:, 4 * DIM :].any()
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(student(**x).sample, teacher(**x).sample, rtol=1e-6, atol=1e-6)


def _taylor_scores(ff, tokens, seed):
    """The documented taylor score, computed through the teacher module's own autograd."""
    ff = copy.deepcopy(ff).float().requires_grad_(True)
    x = torch.randn(tokens, DIM, generator=torch.Generator().manual_seed(seed))
    (0.5 * ff(x).square().sum()).backward()
    fc1, fc2 = ff.net[0].proj, ff.net[2]
    return (
        (fc1.weight * fc1.weight.grad).abs().sum(1)
        + (fc1.bias * fc1.bias.grad).abs()
        + (fc2.weight * fc2.weight.grad).abs().sum(0)
    )


@settings(max_examples=6, deadline=None)
@given(ratio=st.floats(0.1, 3.9), importance=st.sampled_from(["magnitude", "taylor"]), seed=st.integers(0, 3))
def test_mlp_ratio_narrowing_keeps_the_most_important_units_in_order(ratio, importance, seed):
    teacher = tiny_dit(seed=seed)
    old = teacher.transformer_blocks[1].ff
    site = family_for(teacher).site_map(teacher)["transformer_blocks.1.ff"]
    op = OPERATORS.get("mlp_ratio")
    new = op.build(old, site, op.parse_options({"ratio": ratio, "importance": importance, "calibration_tokens": 32}))
    hidden = round(ratio * DIM)
    fc1, fc2 = old.net[0].proj, old.net[2]
    if importance == "magnitude":
        scores = fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0)
    else:
        scores = _taylor_scores(old, 32, 0)
    keep = scores.topk(hidden).indices.sort().values
    assert torch.equal(new.net[0].proj.weight, fc1.weight[keep])
    assert torch.equal(new.net[0].proj.bias, fc1.bias[keep])
    assert torch.equal(new.net[2].weight, fc2.weight[:, keep])
    assert torch.equal(new.net[2].bias, fc2.bias)


def test_conv_mlp_at_build_is_the_teachers_ffn(tmp_path):
    teacher, student, _ = _graft(tmp_path, "mlp", "conv_mlp", {"kernel": 5})
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(student(**x).sample, teacher(**x).sample, rtol=1e-6, atol=1e-7)
        student._dit_graft_grid.hw = (3, 5)
        tokens = torch.randn(2, 15, DIM)
        for t_block, s_block in zip(teacher.transformer_blocks, student.transformer_blocks, strict=True):
            torch.testing.assert_close(s_block.ff(tokens), t_block.ff(tokens), rtol=1e-6, atol=1e-7)


def test_gated_conv_at_build_is_q_times_box_mean_of_k_times_v(tmp_path):
    _, student, _ = _graft(tmp_path, "attention", "gated_conv", {"kernel": 3})
    attn = student.transformer_blocks[0].attn1
    student._dit_graft_grid.hw = (3, 5)
    x = torch.randn(2, 15, DIM)
    with torch.no_grad():
        q, k, v = (t.transpose(1, 2).reshape(2, DIM, 3, 5) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
        mixed = F.avg_pool2d(k * v, 3, stride=1, padding=1, count_include_pad=True)  # zero-padded 3x3 box mean
        expected = attn.to_out[0]((q * mixed).flatten(2).transpose(1, 2))
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("site, op, options", [SPECS["gated_conv"], SPECS["conv_mlp"]])
def test_convolutions_only_reach_their_receptive_field_on_an_odd_grid(tmp_path, site, op, options):
    _, student, _ = _graft(tmp_path, site, op, options)
    module = _module(student, site)
    with torch.no_grad():
        for p in _new_parameters(student, site).values():
            p.add_(0.1 * torch.randn_like(p))
        student._dit_graft_grid.hw = (3, 5)
        x = torch.randn(1, 15, DIM)
        bumped = x.clone()
        bumped[0, 7] += 1.0  # token (1, 2), the centre of the 3x5 grid
        changed = (module(bumped) - module(x)).abs().amax(-1)[0] > 0  # (N,)
    reach = 2 if op == "gated_conv" else 1  # featurizer + mixer, or the one conv (k = 3)
    expected = torch.tensor([max(abs(n // 5 - 1), abs(n % 5 - 2)) <= reach for n in range(15)])
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("spec", list(SPECS))
def test_every_operator_runs_on_an_odd_grid(tmp_path, spec):
    site, op, options = SPECS[spec]
    _, student, _ = _graft(tmp_path, site, op, options)
    student._dit_graft_grid.hw = (3, 5)
    x = torch.randn(2, 15, DIM, requires_grad=True)
    y = _module(student, site)(x)
    y.square().sum().backward()
    assert y.shape == (2, 15, DIM) and torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("spec", list(SPECS))
def test_every_new_parameter_gets_a_gradient(tmp_path, spec):
    site, op, options = SPECS[spec]
    _, student, _ = _graft(tmp_path, site, op, options)
    student.train()
    student(**_inputs()).sample.square().mean().backward()
    new = _new_parameters(student, site)
    assert new or op in ("local", "swa", "sparse")  # the masked and sparse softmax processors add no parameters
    for name, p in new.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spec", list(SPECS))
def test_export_reload_is_bitwise_exact(tmp_path, spec):
    site, op, options = SPECS[spec]
    teacher = tiny_dit()
    recipe = _recipe(tmp_path, site, op, options)
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    with torch.no_grad():
        for p in _new_parameters(student, site).values():
            p.add_(0.1 * torch.randn_like(p))
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "export", {"steps": 0})
    reloaded = dit_graft.from_pretrained(out)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(student(**x).sample, reloaded(**x).sample)
    key = "attn1" if site == "attention" else "ff"
    assert json.loads((out / "graft.json").read_text())["operators"] == {
        f"transformer_blocks.{i}.{key}": op for i in range(2)
    }


@pytest.mark.parametrize("spec", list(SPECS))
def test_every_operator_plans_and_runs_on_the_meta_device(tmp_path, spec):
    site, op, options = SPECS[spec]
    with torch.device("meta"):
        teacher = DiTTransformer2DModel(**TINY_DIT)
    student = apply(teacher, plan(teacher, _recipe(tmp_path, site, op, options)))
    total, _ = count_flops(student, family_for(student).example_inputs(student, 1, None, "meta"))
    assert total > 0


@pytest.mark.parametrize(
    "op, options, match",
    [
        ("local", {"window": 0}, "greater than 0"),
        ("local", {"window": 2, "shape": "diamond"}, "circle"),
        ("local", {"radius": 2}, "Extra inputs"),
        ("swa", {"window": 0}, "greater than or equal to 1"),
        ("gated_conv", {"kernel": 4}, "kernel must be odd"),
        ("conv_mlp", {"kernel": 1}, "greater than or equal to 3"),
        ("mlp_ratio", {"ratio": -1}, "greater than 0"),
        ("mlp_ratio", {"importance": "fisher"}, "magnitude"),
    ],
)
def test_bad_options_are_rejected(op, options, match):
    with pytest.raises(ValidationError, match=match):
        OPERATORS.get(op).parse_options(options)


def test_a_ratio_leaving_no_hidden_unit_fails_before_any_swap(tmp_path):
    teacher = tiny_dit()
    graft_plan = plan(teacher, _recipe(tmp_path, "mlp", "mlp_ratio", {"ratio": 0.01}))
    with pytest.raises(RecipeError, match="leaves no hidden unit"):
        apply(teacher, graft_plan, inplace=True)
    assert type(teacher.transformer_blocks[0].ff).__name__ == "FeedForward"


def test_cli_lists_the_operators(capsys):
    code, out, _ = run_cli(["operators"], capsys)
    assert code == 0
    for name in ("local", "swa", "sparse", "gated_conv", "mlp_ratio", "conv_mlp"):
        assert name in out
    assert "FLOPs ÷ softmax" in out


@pytest.mark.parametrize(
    "op, options",
    [
        ("softmax", {}),
        ("linear", {}),
        ("linear", {"norm": "output_norm", "heads": 1, "dwconv": 0}),
        ("linear", {"feature_map": "elu1", "heads": 2, "dwconv": 5}),
        ("gated_conv", {"kernel": 5}),
    ],
)
def test_flop_formula_matches_flop_counter_on_the_pytorch_path(op, options):
    """Measured total minus the q/k/v/out projections is the formula (on meta, where SDPA is counted as matmuls)."""
    operator = OPERATORS.get(op)
    opts = operator.parse_options(options)
    grid = TokenGrid((6, 8))
    site = Site("attn", "attention", 0, 32, 4, grid, adapter=SelfAttentionAdapter(grid))
    with torch.device("meta"):
        attn = Attention(32, heads=4, dim_head=8, bias=True)
        attn.set_processor(build_replacement(operator, DIT, site, attn, opts))
    total, _ = count_flops(attn, {"hidden_states": torch.zeros(1, 48, 32, device="meta")})
    projections = 4 * 2 * 48 * 32 * 32
    assert total - projections == operator.flops(site, 48, opts) > 0


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), radius=st.floats(0.3, 12), shape=st.sampled_from(["circle", "square"]))
def test_local_and_swa_formulas_count_the_masks_pairs(h, w, radius, shape):
    assert grid_window_pairs(h, w, radius, shape) == int(grid_window_mask(h, w, radius, shape, "cpu").sum())
    n, half = h * w, int(radius)
    assert band_pairs(n, half) == int(band_mask(n, half, "cpu").sum())


def test_local_swa_and_sparse_formulas_are_below_softmax_at_dit_xl_size():
    site = Site("attn", "attention", 0, 1152, 16, TokenGrid((32, 32)))
    dense = OPERATORS.get("softmax").flops(site, 1024, None)
    for op in ("local", "swa", "sparse"):
        operator = OPERATORS.get(op)
        assert operator.flops(site, 1024, operator.parse_options({})) < dense / 3, op


@pytest.mark.parametrize(
    "op, options", [("local", {"window": 2}), ("swa", {"window": 9}), ("sparse", {"block": 16, "keep": 1})]
)
def test_cost_reports_the_formula_and_the_saving_on_the_meta_device(tmp_path, op, options):
    with torch.device("meta"):
        teacher = DiTTransformer2DModel(**{**TINY_DIT, "sample_size": 16})  # an 8x8 grid: 64 tokens
    student = apply(teacher, plan(teacher, _recipe(tmp_path, "attention", op, options)))
    before, after = model_cost(teacher), model_cost(student)
    _, measured = count_flops(teacher, family_for(teacher).example_inputs(teacher, 1, None, "meta"))
    paths = [f"transformer_blocks.{i}.attn1" for i in range(2)]
    assert before["attention_formula"] == after["attention_formula"] == paths
    for path in paths:
        assert before["attention_flops"][path] == measured[path]  # softmax's formula is what meta measures
        assert after["attention_flops"][path] < before["attention_flops"][path]
    saved = sum(before["attention_flops"].values()) - sum(after["attention_flops"].values())
    assert before["flops"] - after["flops"] == saved


def test_cost_of_softmax_on_the_cpu_is_its_cost_on_the_meta_device():
    teacher = tiny_dit()
    with torch.device("meta"):
        on_meta = DiTTransformer2DModel(**TINY_DIT)
    assert model_cost(teacher)["attention_flops"] == model_cost(on_meta)["attention_flops"]


def test_dry_run_marks_formula_counts_and_shows_the_saving(tmp_path, tiny_dit_dir, write_recipe, capsys):
    data = tiny_recipe(tiny_dit_dir, tmp_path / "out")
    data["graft"] = [{"site": "attention", "layers": "all", "op": "swa", "options": {"window": 3}}]
    code, stdout, _ = run_cli(["convert", write_recipe(data), "--dry-run"], capsys)
    assert code == 0 and "softmax → swa" in stdout and "attention-core FLOP formula" in stdout
    row = next(line for line in stdout.splitlines() if "attention FLOPs*" in line)
    assert float(row.split()[-2]) < 1  # the student/teacher ratio
