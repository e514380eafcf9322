"""`prune_width`: width pruning of the MLPs by unit importance — identity at keep 1.0, the kept units, costs, export."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from pydantic import ValidationError

import dit_graft
from dit_graft.cost import model_cost
from dit_graft.errors import RecipeError
from dit_graft.export import export
from dit_graft.families import family_for
from dit_graft.operators import OPERATORS
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from tests.conftest import TINY_DIT, tiny_dit, tiny_recipe
from tests.conftest import tiny_dit_inputs as _inputs
from tests.test_cli import run_cli
from tests.test_families import tiny_flux

DIM, HIDDEN = 16, 64  # tiny DiT: width 16, FFN hidden 64, 2 blocks, 4x4 token grid
PRUNE = OPERATORS.get("prune_width")


def _recipe(options, layers="all"):
    graft = [{"site": "mlp", "layers": layers, "op": "prune_width", "options": options}]
    return validate({"model": {"source": "unused"}, "graft": graft, "distill": {"steps": 0}})


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_keeping_every_unit_is_the_teacher_bitwise(importance):
    options = {"keep": 1.0, "importance": importance, "calibration_tokens": 16}
    teacher = tiny_dit()
    student = apply(teacher, plan(teacher, _recipe(options)))
    assert type(student.transformer_blocks[0].ff).__name__ == "FeedForward"
    with torch.no_grad():
        assert torch.equal(student(**_inputs()).sample, teacher(**_inputs()).sample)
    flux = tiny_flux()  # FLUX's image-stream FFN (tanh GELU) too
    pruned = apply(flux, plan(flux, _recipe(options)))
    x = torch.randn(2, 5, flux.transformer_blocks[0].ff.net[0].proj.in_features)
    with torch.no_grad():
        assert torch.equal(pruned.transformer_blocks[0].ff(x), flux.transformer_blocks[0].ff(x))


def _scores(ff, importance, tokens, seed):
    """The documented scores, computed independently: norms, or the FFN module's own autograd of ½‖FFN(x)‖²."""
    fc1, fc2 = ff.net[0].proj, ff.net[2]
    if importance == "magnitude":
        return fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0)
    params = [fc1.weight, fc1.bias, fc2.weight]
    x = torch.randn(tokens, DIM, generator=torch.Generator().manual_seed(seed))
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        g1, gb, g2 = torch.autograd.grad(0.5 * ff(x).square().sum(), params)
    w1, b1, w2 = (p.detach() for p in params)
    return (w1 * g1).abs().sum(1) + (b1 * gb).abs() + (w2 * g2).abs().sum(0)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize("keep, kept", [(0.25, 16), (0.5, 32), (0.9, 58)])
def test_the_kept_units_are_the_most_important_in_their_order(importance, keep, kept):
    teacher = tiny_dit(seed=3)
    old = teacher.transformer_blocks[1].ff
    site = family_for(teacher).site_map(teacher)["transformer_blocks.1.ff"]
    options = PRUNE.parse_options({"keep": keep, "importance": importance, "calibration_tokens": 48, "seed": 2})
    new = PRUNE.build(old, site, options)
    scores = _scores(old, importance, 48, 2)
    fc1, fc2 = old.net[0].proj, old.net[2]
    rows = [(fc1.weight == r).all(1).nonzero().item() for r in new.net[0].proj.weight]  # the teacher units kept
    assert len(rows) == kept and rows == sorted(rows)
    dropped = sorted(set(range(HIDDEN)) - set(rows))
    assert scores[rows].min() > scores[dropped].max()  # no dropped unit scores above a kept one
    assert torch.equal(new.net[0].proj.bias, fc1.bias[rows])
    assert torch.equal(new.net[2].weight, fc2.weight[:, rows]) and torch.equal(new.net[2].bias, fc2.bias)


def test_magnitude_and_taylor_rank_differently():
    """The criterion is an actual choice: on this teacher the two keep different unit sets."""
    teacher = tiny_dit(seed=3)
    old = teacher.transformer_blocks[1].ff
    site = family_for(teacher).site_map(teacher)["transformer_blocks.1.ff"]
    built = [
        PRUNE.build(old, site, PRUNE.parse_options({"keep": 0.25, "importance": i})) for i in ("magnitude", "taylor")
    ]
    assert not torch.equal(built[0].net[0].proj.weight, built[1].net[0].proj.weight)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"keep": 0.0}, "greater than 0"),
        ({"keep": 1.5}, "less than or equal to 1"),
        ({"keep": 1}, "fraction of the teacher's hidden units"),  # an int is not a unit count
        ({"keep": 32}, "fraction of the teacher's hidden units"),
        ({"keep": True}, "fraction of the teacher's hidden units"),
        ({"keep": 0.5, "importance": "fisher"}, "magnitude"),
        ({"keep": 0.5, "ratio": 2}, "Extra inputs"),
    ],
)
def test_bad_options_are_rejected(options, match):
    with pytest.raises(ValidationError, match=match):
        PRUNE.parse_options(options)


def test_a_keep_leaving_no_unit_fails_before_any_swap():
    teacher = tiny_dit()
    with pytest.raises(RecipeError, match=r"keep=0.001 leaves no hidden unit of the teacher's 64"):
        apply(teacher, plan(teacher, _recipe({"keep": 0.001})), inplace=True)
    assert teacher.transformer_blocks[0].ff.net[0].proj.out_features == HIDDEN


def test_dry_run_costs_drop_by_the_pruned_units(tmp_path, tiny_dit_dir, write_recipe, capsys):
    with torch.device("meta"):
        teacher = DiTTransformer2DModel(**TINY_DIT)
    student = apply(teacher, plan(teacher, _recipe({"keep": 0.25}, layers=[1])))
    before, after = model_cost(teacher), model_cost(student)
    pruned, tokens = HIDDEN - 16, 16  # one FFN loses 48 units; 4x4 tokens per image
    assert before["params"] - after["params"] == pruned * (DIM + 1 + DIM)  # fc1 row + bias, fc2 column
    assert before["flops"] - after["flops"] == 2 * tokens * pruned * (DIM + DIM)  # fc1 and fc2 matmuls
    assert after["attention_flops"] == before["attention_flops"]
    data = tiny_recipe(tiny_dit_dir, tmp_path / "out")
    data["graft"] = [{"site": "mlp", "layers": [1], "op": "prune_width", "options": {"keep": 0.25}}]
    code, stdout, stderr = run_cli(["convert", write_recipe(data), "--dry-run"], capsys)
    assert code == 0, stderr
    assert "transformer_blocks.1.ff" in stdout and "→ prune_width" in stdout
    row = next(line for line in stdout.splitlines() if "parameters" in line)
    ratio = after["params"] / before["params"]
    assert float(row.split()[-2]) == pytest.approx(ratio, abs=5e-4) and ratio < 1


def test_export_and_reload_are_exact(tmp_path):
    teacher = tiny_dit(seed=1)
    recipe = _recipe({"keep": 0.5, "importance": "taylor", "calibration_tokens": 32})
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "export", {"steps": 0})
    reloaded = dit_graft.from_pretrained(out)
    assert reloaded.transformer_blocks[0].ff.net[0].proj.out_features == HIDDEN // 2
    with torch.no_grad():
        assert torch.equal(student(**_inputs()).sample, reloaded(**_inputs()).sample)
    graft = json.loads((out / "graft.json").read_text())
    assert graft["operators"] == {f"transformer_blocks.{i}.ff": "prune_width" for i in range(2)}


def test_the_cli_lists_prune_width(capsys):
    code, stdout, _ = run_cli(["operators"], capsys)
    assert code == 0 and "prune_width" in stdout and "keep=0.5" in stdout
