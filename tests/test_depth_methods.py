"""Depth edits: prune_depth's learnable (TinyFusion) and contiguous (PPCL) methods, parallel_blocks, spans."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dit_graft
from dit_graft.errors import RecipeError
from dit_graft.export import export
from dit_graft.operators.depth import spans_from_kept
from dit_graft.operators.parallel_blocks import ParallelBlocks
from dit_graft.plan import GraftPlan, apply, depth_spans, plan
from dit_graft.recipe import validate
from tests.conftest import op_of, tiny_dit, tiny_recipe
from tests.conftest import tiny_dit_inputs as _inputs
from tests.test_cli import run_cli

LEARN_FAST = {"method": "learnable", "search_steps": 30, "calibration_samples": 4}


def _recipe(*graft):
    data = tiny_recipe(".", "out")
    data["graft"] = list(graft)
    return validate(data)


def _depth(op="prune_depth", **options):
    return {"site": "depth", "op": op, "options": options}


def _silence(model, *blocks):
    """Zeroes the attention and FFN output projections of `blocks`: each then returns its input exactly."""
    with torch.no_grad():
        for i in blocks:
            b = model.transformer_blocks[i]
            for layer in (b.attn1.to_out[0], b.ff.net[2]):
                layer.weight.zero_()
                layer.bias.zero_()
    return model


def _reload_equal(student, graft_plan, recipe, out):
    export(student.eval(), graft_plan, recipe.model_dump(), out)
    with torch.no_grad():
        return torch.equal(dit_graft.from_pretrained(out)(**_inputs()).sample, student(**_inputs()).sample)


@settings(max_examples=8, deadline=None)
@given(first=st.integers(0, 3), second=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_parallel_pair_with_a_silent_second_block_is_the_first_block(first, second, seed):
    b1 = tiny_dit(num_layers=4).transformer_blocks[first]
    b2 = _silence(tiny_dit(num_layers=4, seed=1), second).transformer_blocks[second]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 16, generator=g)
    kwargs = dict(timestep=torch.randint(0, 1000, (2,), generator=g), class_labels=torch.tensor([0, 3]))
    with torch.no_grad():
        assert torch.equal(ParallelBlocks([b1, b2])(x, **kwargs), b1(x, **kwargs))


def test_parallel_pair_sums_the_residual_updates_of_both_blocks():
    teacher = tiny_dit(num_layers=2).double()
    b1, b2 = teacher.transformer_blocks
    x = torch.randn(3, 16, 16, dtype=torch.float64)
    kwargs = dict(timestep=torch.tensor([1, 500, 999]), class_labels=torch.tensor([0, 1, 4]))
    with torch.no_grad():
        expected = x + (b1(x, **kwargs) - x) + (b2(x, **kwargs) - x)
        torch.testing.assert_close(ParallelBlocks([b1, b2])(x, **kwargs), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "layers, pairs, spans",
    [
        (5, "all", [[0, 1], [2, 3], [4]]),
        (4, [1], [[0], [1, 2], [3]]),
        (6, [4, 0], [[0, 1], [2], [3], [4, 5]]),
    ],
)
def test_parallel_blocks_plan_spans_layer_map_and_student(layers, pairs, spans):
    teacher = tiny_dit(num_layers=layers)
    edit = plan(teacher, _recipe(_depth("parallel_blocks", pairs=pairs))).edits[0]
    assert edit.spans == spans and edit.kept is None and edit.scores is None
    assert edit.layer_map == {old: new for new, span in enumerate(spans) for old in span}
    student = apply(teacher, plan(teacher, _recipe(_depth("parallel_blocks", pairs=pairs))))
    assert student.config.num_layers == len(spans) and teacher.config.num_layers == layers
    for block, span in zip(student.transformer_blocks, spans, strict=True):
        if len(span) == 1:
            assert not isinstance(block, ParallelBlocks)
        else:
            assert isinstance(block, ParallelBlocks) and len(block.branches) == 2
            for branch, old in zip(block.branches, span, strict=True):
                assert branch is not teacher.transformer_blocks[old]
                assert torch.equal(branch.ff.net[2].weight, teacher.transformer_blocks[old].ff.net[2].weight)


def test_parallel_blocks_export_reloads_bitwise_through_the_plan(tmp_path):
    teacher = tiny_dit(num_layers=5)
    recipe = _recipe(_depth("parallel_blocks"))
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    assert _reload_equal(student, graft_plan, recipe, tmp_path / "par")
    assert json.loads((tmp_path / "par" / "config.json").read_text())["num_layers"] == 3
    graft = json.loads((tmp_path / "par" / "graft.json").read_text())
    assert graft["plan"]["edits"][0]["spans"] == [[0, 1], [2, 3], [4]]
    assert graft["plan"]["base_config"] == {"num_layers": 5}


def test_an_operator_grafted_before_parallel_blocks_moves_into_its_branch():
    teacher = tiny_dit(num_layers=4)
    recipe = _recipe(
        {"site": "attention", "layers": [3], "op": "linear", "options": {}},
        _depth("parallel_blocks", pairs=[2]),
        {"site": "mlp", "layers": [0], "op": "mlp_ratio", "options": {"ratio": 2}},
    )
    graft_plan = plan(teacher, recipe)
    assert graft_plan.operators_by_site() == {
        "transformer_blocks.2.branches.1.attn1": "linear",
        "transformer_blocks.0.ff": "mlp_ratio",
    }
    student = apply(teacher, graft_plan)
    assert op_of(student.get_submodule("transformer_blocks.2.branches.1.attn1.processor")) == "linear"


@pytest.mark.parametrize(
    "options",
    [{"pairs": [0, 1]}, {"pairs": [3]}, {"pairs": []}, {"pairs": [-1]}, {"pairs": "some"}, {"pair": "all"}],
)
def test_parallel_blocks_refuses_bad_pairs_naming_the_key(options):
    with pytest.raises(RecipeError, match=r"graft\.0\.options\.pair"):
        plan(tiny_dit(num_layers=4), _recipe(_depth("parallel_blocks", **options)))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "importance", "keep": 2, "group_size": 4}, r"graft\.0\.options\.group_size: .*learnable only"),
        ({"method": "contiguous", "keep": 2, "tau": 1.0}, r"graft\.0\.options\.tau: .*learnable only"),
        ({"method": "contiguous"}, r"graft\.0\.options\.keep: .*needs keep"),
        ({"method": "learnable", "keep_per_group": 3}, r"graft\.0\.options\.keep_per_group: .*exceeds group_size=2"),
        ({"method": "learnable", "group_size": 3}, r"graft\.0\.options\.group_size: .*does not divide .* 4 blocks"),
        ({"method": "learnable", "keep": 3}, r"graft\.0\.options\.keep: keep=3, .* = 2"),
        ({"method": "learnable", "lr": 0}, r"graft\.0\.options\.lr: "),
        ({"method": "learnable", "group_size": 4, "keep_per_group": 1, "keep": 1, "seed": -1}, r"options\.seed"),
        ({"method": "magic", "keep": 2}, r"graft\.0\.options\.method"),
        ({"method": "contiguous", "keep": 5}, r"graft\.0\.options\.keep: keep=5 exceeds the model's 4 blocks"),
    ],
)
def test_prune_depth_refuses_bad_method_options_naming_the_key(options, message):
    with pytest.raises(RecipeError, match=message):
        plan(tiny_dit(num_layers=4), _recipe(_depth(**options)))


def test_prune_depth_options_survive_a_resolved_recipe_round_trip():
    recipe = _recipe(_depth(method="importance", keep=2))
    assert validate(recipe.model_dump()).graft[0].options == recipe.graft[0].options
    learnable = _recipe(_depth(**LEARN_FAST))
    assert learnable.graft[0].options["group_size"] == 2 and learnable.graft[0].options["keep"] is None


def test_learnable_search_is_deterministic_and_leaves_the_global_rng_alone():
    teacher = tiny_dit(num_layers=4)
    recipe = _recipe(_depth(**LEARN_FAST, group_size=4, keep_per_group=2, seed=3))
    state = torch.get_rng_state()
    first = plan(teacher, recipe).edits[0]
    assert torch.equal(torch.get_rng_state(), state)
    second = plan(teacher, recipe).edits[0]
    assert first.kept == second.kept and first.scores == second.scores
    assert len(first.kept) == 2 and first.kept[0] == 0  # 2 of 4, block 0 pinned
    assert sum(first.scores) == pytest.approx(2.0) and first.scores[0] == pytest.approx(1.0)
    assert first.spans == spans_from_kept(first.kept, 4)


@pytest.mark.parametrize(
    "layers, silent, group_size, keep_per_group, kept",
    [(4, (1, 3), 2, 1, [0, 2]), (6, (2, 4), 3, 2, [0, 1, 3, 5]), (4, (2,), 2, 1, [0, 3])],
)
def test_learnable_search_drops_exactly_the_blocks_that_do_nothing(layers, silent, group_size, keep_per_group, kept):
    teacher = _silence(tiny_dit(num_layers=layers), *silent)
    options = {**LEARN_FAST, "group_size": group_size, "keep_per_group": keep_per_group}
    edit = plan(teacher, _recipe(_depth(**options))).edits[0]
    assert edit.kept == kept
    assert all(edit.scores[i] < 0.5 for i in silent)


@settings(max_examples=6, deadline=None)
@given(start=st.integers(1, 3), length=st.integers(2, 3))
def test_contiguous_collapses_a_span_of_blocks_that_do_nothing(start, length):
    silent = range(start, min(start + length, 6))
    teacher = _silence(tiny_dit(num_layers=6), *silent)
    edit = plan(teacher, _recipe(_depth(method="contiguous", keep=6 - len(silent) + 1))).edits[0]
    assert list(silent) in edit.spans
    assert edit.kept == [i for i in range(6) if i not in silent or i == start]
    assert all(edit.scores[i] == pytest.approx(0.0, abs=1e-6) for i in silent)


@settings(max_examples=12, deadline=None)
@given(
    edit=st.one_of(
        st.builds(lambda k: _depth(method="importance", keep=k), st.integers(1, 6)),
        st.builds(lambda k: _depth(method="contiguous", keep=k), st.integers(1, 6)),
        st.builds(
            lambda m: _depth(**{**LEARN_FAST, "search_steps": 2}, group_size=m[0], keep_per_group=m[1]),
            st.sampled_from([(1, 1), (2, 1), (3, 1), (3, 2), (6, 3)]),
        ),
        st.builds(
            lambda p: _depth("parallel_blocks", pairs=p),
            st.one_of(st.just("all"), st.lists(st.integers(0, 4), min_size=1, max_size=3, unique=True)),
        ),
    )
)
def test_spans_cover_every_old_block_once_in_order(edit):
    if isinstance(edit["options"].get("pairs"), list):
        starts = sorted(edit["options"]["pairs"])
        if any(b - a < 2 for a, b in zip(starts, starts[1:], strict=False)):
            return  # overlapping pairs: refused when the recipe is read (tested above)
    teacher = tiny_dit(num_layers=6)
    planned = plan(teacher, _recipe(edit)).edits[0]
    assert [i for span in planned.spans for i in span] == list(range(6))
    assert all(span == list(range(span[0], span[-1] + 1)) for span in planned.spans)
    for new, span in enumerate(planned.spans):  # each new block carries weights of its own span only
        assert {planned.layer_map[i] for i in span} - {"dropped"} == {new}
    if planned.kept is not None:
        old_style = planned.model_copy(update={"spans": None})  # a plan written before spans were recorded
        assert planned.spans == spans_from_kept(planned.kept, 6) == depth_spans(old_style)
    assert len(apply(teacher, plan(teacher, _recipe(edit))).transformer_blocks) == len(planned.spans)


@pytest.mark.parametrize(
    "depth",
    [
        _depth(method="importance", keep=3, calibration_samples=2),
        _depth(method="contiguous", keep=3, calibration_samples=2),
        _depth(**{**LEARN_FAST, "search_steps": 5}, group_size=4, keep_per_group=3, lora_rank=2),
        _depth("parallel_blocks", pairs=[1]),
    ],
    ids=["importance", "contiguous", "learnable", "parallel"],
)
def test_depth_edit_then_linear_attention_on_the_new_layers_exports_and_reloads_exactly(depth, tmp_path):
    teacher = tiny_dit(num_layers=4)
    recipe = _recipe(depth, {"site": "attention", "layers": [1, 2], "op": "linear", "options": {"dwconv": 3}})
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    assert len(student.transformer_blocks) == 3
    for path, op in graft_plan.operators_by_site().items():
        assert op == "linear" and path.endswith("attn1")
        assert op_of(student.get_submodule(path).processor) == "linear"
    with torch.no_grad():  # the zero-initialised conv makes linear attention differ from softmax but stay finite
        assert torch.isfinite(student(**_inputs()).sample).all()
    assert _reload_equal(student, graft_plan, recipe, tmp_path / "mixed")


def test_a_plan_written_before_spans_existed_still_loads(tmp_path):
    teacher = tiny_dit(num_layers=4)
    recipe = _recipe(_depth(method="importance", keep=2, calibration_samples=2))
    graft_plan = plan(teacher, recipe)
    student = apply(teacher, graft_plan).eval()
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "old")
    graft = json.loads((out / "graft.json").read_text())
    del graft["plan"]["edits"][0]["spans"]
    (out / "graft.json").write_text(json.dumps(graft))
    old_edit = GraftPlan.model_validate(graft["plan"]).edits[0]
    assert old_edit.spans is None and depth_spans(old_edit) == graft_plan.edits[0].spans
    with torch.no_grad():
        assert torch.equal(dit_graft.from_pretrained(out)(**_inputs()).sample, student(**_inputs()).sample)


def test_a_tampered_depth_plan_is_refused_before_anything_changes():
    teacher = tiny_dit(num_layers=4)
    graft_plan = plan(teacher, _recipe(_depth("parallel_blocks")))
    graft_plan.edits[0].layer_map[1] = "dropped"
    with pytest.raises(RecipeError, match="graft.0: parallel_blocks on 4 blocks: parallel_blocks drops no block"):
        apply(teacher, graft_plan, inplace=True)
    graft_plan = plan(teacher, _recipe(_depth("parallel_blocks")))
    graft_plan.edits[0].spans = [[0, 1], [3, 2]]
    with pytest.raises(RecipeError, match="do not cover blocks 0-3 once each"):
        apply(teacher, graft_plan, inplace=True)
    assert len(teacher.transformer_blocks) == 4 and not any(isinstance(b, ParallelBlocks) for b in teacher.modules())


def test_dry_run_and_operator_list_show_the_new_depth_edits(tmp_path, tiny_dit_dir, write_recipe, capsys):
    data = tiny_recipe(tiny_dit_dir, tmp_path / "out")
    data["graft"] = [_depth(method="learnable")]
    code, stdout, _ = run_cli(["convert", write_recipe(data), "--dry-run"], capsys)
    assert code == 0, stdout
    assert "2 → 1, dropped [1] (unscored: no weights)" in stdout
    data["graft"] = [_depth("parallel_blocks")]
    code, stdout, _ = run_cli(["convert", write_recipe(data), "--dry-run"], capsys)
    assert code == 0 and "2 → 1, in parallel [[0, 1]]" in stdout, stdout
    code, stdout, _ = run_cli(["operators"], capsys)
    assert code == 0 and "parallel_blocks" in stdout and "pairs='all'" in stdout
    assert "method='importance'" in stdout and "keep_per_group=1" in stdout
