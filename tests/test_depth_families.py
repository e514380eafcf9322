"""Depth edits on PixArt (`self`) and FLUX (`double`, `single`): plan, apply, export, reload, pairs, spans, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import dit_graft
from dit_graft.cli import _fmt
from dit_graft.depth_search import gated_block_output
from dit_graft.errors import RecipeError
from dit_graft.export import export
from dit_graft.families import family_for
from dit_graft.loading import build_from_config, read_config, resolve_source
from dit_graft.operators.parallel_blocks import ParallelBlocks
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from tests.conftest import op_of
from tests.test_cli import run_cli
from tests.test_families import TINY_PIXART, _nudge, tiny_flux

CASES = ("pixart", "flux-double", "flux-single")
GROUP = {"pixart": None, "flux-double": "double", "flux-single": "single"}  # pixart: the default group, self
STOCK = {
    "pixart": PixArtTransformer2DModel,
    "flux-double": FluxTransformer2DModel,
    "flux-single": FluxTransformer2DModel,
}
CALIBRATION = {"calibration_resolution": 64, "calibration_samples": 4}  # 8×8 latents


def _teacher(case: str, blocks: int = 4, silent: tuple[int, ...] = (), seed: int = 0):
    """A tiny model with `blocks` blocks in the case's group; the `silent` ones return their inputs exactly."""
    torch.manual_seed(seed)
    if case == "pixart":
        model = _nudge(PixArtTransformer2DModel(**{**TINY_PIXART, "num_layers": blocks}))
    elif case == "flux-double":
        model = tiny_flux(num_layers=blocks, num_single_layers=1)
    else:
        model = tiny_flux(num_layers=1, num_single_layers=blocks)
    for i in silent:
        _silence(_group(model, case).blocks(model)[i])
    return model


def _silence(block):
    """Zeroes every output projection of a block's residual updates (attention, cross-attention, FFNs)."""
    with torch.no_grad():
        for name in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2", "attn.to_out.0", "attn.to_add_out", "proj_out"):
            try:
                layer = block.get_submodule(name)
            except AttributeError:
                continue
            layer.weight.zero_()
            layer.bias.zero_()
        if hasattr(block, "ff_context"):
            block.ff_context.net[2].weight.zero_()
            block.ff_context.net[2].bias.zero_()
    return block


def _group(model, case):
    return family_for(model).depth_group(GROUP[case])


def _depth(case, op="prune_depth", **options):
    edit = {"site": "depth", "op": op, "options": options}
    if GROUP[case]:
        edit["group"] = GROUP[case]
    return edit


def _recipe(*graft, **distill):
    return validate({"model": {"source": "unused"}, "graft": list(graft), "distill": distill})


def _forward(model, seed=1):
    fam = family_for(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900]) if fam.name == "pixart" else torch.rand(2, generator=g)
    with torch.no_grad():
        return fam.forward(model.eval(), x, t, fam.conditions(model, 2))


def _block_call(model, case, index=0):
    """The (args, kwargs) block `index` of the case's group is called with in a forward of `model`."""
    calls = []
    block = _group(model, case).blocks(model)[index]
    handle = block.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        _forward(model)
    finally:
        handle.remove()
    return calls[0]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _double(x):
    """Every floating tensor in a (nested) call argument in float64."""
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    return x


METHODS = {  # on 4 blocks of which 1 and 2 do nothing: each method drops exactly those it may drop
    "importance": ({"method": "importance", "keep": 2}, [0, 3]),
    "contiguous": ({"method": "contiguous", "keep": 3}, [0, 1, 3]),  # the span [1, 2] collapses to block 1
    "learnable": ({"method": "learnable", "group_size": 2, "search_steps": 30}, [0, 3]),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_prune_depth_exports_a_stock_model_that_reloads_bitwise(case, method, tmp_path):
    options, kept = METHODS[method]
    teacher = _teacher(case, silent=(1, 2))
    group = _group(teacher, case)
    recipe = _recipe(_depth(case, **options, **CALIBRATION))
    graft_plan = plan(teacher, recipe)
    edit = graft_plan.edits[0]
    assert edit.kept == kept and edit.group == group.name and len(edit.scores) == 4
    assert [i for span in edit.spans for i in span] == [0, 1, 2, 3]
    student = apply(teacher, graft_plan).eval()
    assert group.num_blocks(student) == len(kept) and group.num_blocks(teacher) == 4
    for new, old in enumerate(kept):  # the kept blocks are the teacher's, renumbered
        t_state = group.blocks(teacher)[old].state_dict()
        assert all(torch.equal(v, t_state[k]) for k, v in group.blocks(student)[new].state_dict().items())
    assert torch.equal(_forward(student), _forward(teacher))  # only blocks that did nothing were dropped

    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "depth")
    config = json.loads((out / "config.json").read_text())
    assert config[group.config_key] == len(kept)
    other = {"num_layers", "num_single_layers"} - {group.config_key}
    assert all(config[k] == teacher.config[k] for k in other if k in config)  # the other group is untouched
    assert graft_plan.base_config == {group.config_key: 4}
    stock, info = STOCK[case].from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # every key renumbered: nothing missing, unexpected or mismatched
    expected = _forward(student)
    assert torch.equal(_forward(stock), expected)
    assert torch.equal(_forward(dit_graft.from_pretrained(out)), expected)


def test_flux_double_block_importance_counts_the_text_stream_too():
    from dit_graft.operators import OPERATORS
    from dit_graft.operators.prune_depth import block_importance

    teacher = _teacher("flux-double", silent=(2,))
    with torch.no_grad():  # block 1 leaves the image stream alone and changes only the text
        for layer in (teacher.transformer_blocks[1].attn.to_out[0], teacher.transformer_blocks[1].ff.net[2]):
            layer.weight.zero_()
            layer.bias.zero_()
    options = OPERATORS.get("prune_depth").parse_options({"keep": 2, **CALIBRATION})
    scores = block_importance(teacher, options, "double")
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and scores[1] > 1e-4
    assert min(scores[0], scores[3]) > 1e-4


@pytest.mark.parametrize("case", CASES)
def test_parallel_blocks_export_reloads_bitwise_through_the_plan(case, tmp_path):
    teacher = _teacher(case, blocks=5)
    group = _group(teacher, case)
    recipe = _recipe(_depth(case, "parallel_blocks"))
    graft_plan = plan(teacher, recipe)
    assert graft_plan.edits[0].spans == [[0, 1], [2, 3], [4]] and graft_plan.edits[0].group == group.name
    student = apply(teacher, graft_plan).eval()
    blocks = group.blocks(student)
    assert [type(b) is ParallelBlocks for b in blocks] == [True, True, False]
    assert blocks[0].streams == group.streams
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "par")
    assert json.loads((out / "config.json").read_text())[group.config_key] == 3
    assert any(
        k.startswith(f"{group.attr}.1.branches.1.") for k in load_file(out / "diffusion_pytorch_model.safetensors")
    )
    assert torch.equal(_forward(dit_graft.from_pretrained(out)), _forward(student))


@pytest.mark.parametrize("case", CASES)
def test_a_pair_of_a_block_and_a_block_that_does_nothing_is_the_first_block(case):
    teacher, other = _teacher(case, blocks=2), _teacher(case, blocks=2, seed=1)
    group = _group(teacher, case)
    first, idle = group.blocks(teacher)[0], _silence(group.blocks(other)[1])
    args, kwargs = _block_call(teacher, case)
    pair = ParallelBlocks([first, idle], group.streams)
    with torch.no_grad():
        got, expected = _as_tuple(pair(*args, **kwargs)), _as_tuple(first(*args, **kwargs))
    assert len(got) == len(expected) == len(group.streams.names)  # FLUX: (text, image)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("case", ["flux-double", "flux-single"])
def test_a_flux_pair_sums_the_residual_updates_of_both_streams(case):
    teacher = _teacher(case, blocks=2)
    group = _group(teacher, case)
    args, kwargs = _double(_block_call(teacher, case))
    b1, b2 = (b.double() for b in group.blocks(teacher))
    text, image = kwargs["encoder_hidden_states"], kwargs["hidden_states"]
    with torch.no_grad():
        (t1, i1), (t2, i2) = b1(*args, **kwargs), b2(*args, **kwargs)
        got_text, got_image = ParallelBlocks([b1, b2], group.streams)(*args, **kwargs)
    assert (t2 - text).abs().max() > 1e-4 and (i2 - image).abs().max() > 1e-4  # both streams change
    torch.testing.assert_close(got_text, text + (t1 - text) + (t2 - text), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_image, image + (i1 - image) + (i2 - image), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_a_block_skipped_by_the_learnable_search_returns_its_inputs_in_its_own_format(case):
    teacher = _teacher(case, blocks=2)
    group = _group(teacher, case)
    block = group.blocks(teacher)[1]
    args, kwargs = _block_call(teacher, case, index=1)
    with torch.no_grad():
        out = block(*args, **kwargs)
        skipped = gated_block_output(group.streams, block, args, kwargs, out, torch.tensor(0.0))
        kept = gated_block_output(group.streams, block, args, kwargs, out, torch.tensor(1.0))
    assert type(skipped) is type(out)
    inputs = group.streams.inputs(block, args, kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_as_tuple(skipped), inputs, strict=True))
    for a, b in zip(_as_tuple(kept), _as_tuple(out), strict=True):
        torch.testing.assert_close(a, b)


@settings(max_examples=12, deadline=None)
@given(
    case=st.sampled_from(CASES),
    edit=st.one_of(
        st.builds(lambda k: {"method": "importance", "keep": k, **CALIBRATION}, st.integers(1, 6)),
        st.builds(lambda k: {"method": "contiguous", "keep": k, **CALIBRATION}, st.integers(1, 6)),
        st.builds(
            lambda m: {
                "method": "learnable",
                "search_steps": 2,
                "group_size": m[0],
                "keep_per_group": m[1],
                **CALIBRATION,
            },
            st.sampled_from([(1, 1), (2, 1), (3, 2), (6, 3)]),
        ),
        st.builds(lambda p: {"pairs": p}, st.sampled_from(["all", [0], [1, 4], [0, 2, 4]])),
    ),
)
def test_spans_cover_every_old_block_of_the_group_once_in_order(case, edit):
    teacher = _teacher(case, blocks=6)
    group = _group(teacher, case)
    op = "parallel_blocks" if "pairs" in edit else "prune_depth"
    planned = plan(teacher, _recipe(_depth(case, op, **edit))).edits[0]
    assert [i for span in planned.spans for i in span] == list(range(6))
    assert all(span == list(range(span[0], span[-1] + 1)) for span in planned.spans)
    for new, span in enumerate(planned.spans):
        assert {planned.layer_map[i] for i in span} - {"dropped"} == {new}
    student = apply(teacher, plan(teacher, _recipe(_depth(case, op, **edit))))
    assert group.num_blocks(student) == len(planned.spans)
    others = [g for g in family_for(teacher).depth_groups if g != group]
    assert all(g.num_blocks(student) == g.num_blocks(teacher) for g in others)


def test_a_flux_depth_edit_leaves_the_other_groups_paths_and_moves_its_own(tmp_path):
    recipe = _recipe(
        {"site": "attention", "group": "double", "op": "linear"},
        {"site": "attention", "group": "single", "layers": [3], "op": "linear"},
        {"site": "depth", "group": "single", "op": "prune_depth", "options": {"keep": 2, **CALIBRATION}},
        {"site": "depth", "group": "double", "op": "parallel_blocks", "options": {"pairs": "all"}},
        {"site": "attention", "group": "single", "layers": [0], "op": "local", "options": {"window": 2}},
    )
    teacher = tiny_flux(num_layers=2, num_single_layers=4)
    for i in (1, 2):
        _silence(teacher.single_transformer_blocks[i])
    graft_plan = plan(teacher, recipe)
    assert graft_plan.edits[2].kept == [0, 3]
    assert graft_plan.operators_by_site() == {
        "transformer_blocks.0.branches.0.attn": "linear",
        "transformer_blocks.0.branches.1.attn": "linear",
        "single_transformer_blocks.1.attn": "linear",
        "single_transformer_blocks.0.attn": "local",
    }
    student = apply(teacher, graft_plan)
    for path, processor in (
        ("transformer_blocks.0.branches.1.attn", "linear"),
        ("single_transformer_blocks.1.attn", "linear"),
        ("single_transformer_blocks.0.attn", "local"),
    ):
        assert op_of(student.get_submodule(path).processor) == processor
    out = export(student, graft_plan, recipe.model_dump(), tmp_path / "mixed")
    assert torch.equal(_forward(dit_graft.from_pretrained(out)), _forward(student))


def test_a_pixart_depth_edit_moves_the_cross_attention_sites_of_its_blocks_too():
    from dit_graft.training.run import Target, targets

    teacher = _teacher("pixart", silent=(1, 2))
    cross = {"site": "attention", "group": "cross", "layers": [3], "op": "linear", "options": {"dwconv": 0}}
    graft_plan = plan(teacher, _recipe(cross, _depth("pixart", keep=2, **CALIBRATION)))
    assert graft_plan.edits[1].kept == [0, 3] and graft_plan.edits[1].group == "self"
    assert graft_plan.operators_by_site() == {"transformer_blocks.1.attn2": "linear"}
    student = apply(teacher, graft_plan)
    assert op_of(student.transformer_blocks[1].attn2.processor) == "linear"
    assert targets(teacher, student, graft_plan) == [
        Target("transformer_blocks.1.attn2", "transformer_blocks.3.attn2", "transformer_blocks.3.attn2"),
        Target("transformer_blocks.0", "transformer_blocks.0", "transformer_blocks.2"),
    ]


@pytest.mark.parametrize(
    "case, edit, message",
    [
        (
            "pixart",
            {"group": "cross"},
            r"graft\.0\.group: depth edits on the pixart family act on block group\(s\) self",
        ),
        (
            "flux-single",
            {"options": {"keep": 5}},
            r"graft\.0\.options\.keep: keep=5 exceeds the model's 4 blocks \(group single\)",
        ),
        (
            "flux-double",
            {"options": {"keep": 2, "calibration_resolution": 72}},
            r"calibration_resolution: .*must be even",
        ),
        ("pixart", {"options": {"keep": 2, "calibration_resolution": 60}}, r"calibration_resolution: 60 px .*factor 8"),
    ],
)
def test_bad_depth_edits_are_refused_naming_the_key(case, edit, message):
    raw = {**_depth(case, keep=2), **edit}
    with pytest.raises(RecipeError, match=message):
        plan(_teacher(case), _recipe(raw))


def test_convert_cli_on_flux_with_a_single_group_depth_edit_and_both_stages(tmp_path, write_recipe, capsys):
    teacher = tiny_flux(num_single_layers=3)
    teacher.save_pretrained(tmp_path / "teacher")
    data = {
        "model": {"source": str(tmp_path / "teacher")},
        "graft": [
            {
                "site": "depth",
                "group": "single",
                "op": "prune_depth",
                "options": {"method": "contiguous", "keep": 2, **CALIBRATION},
            }
        ],
        "distill": {
            "stages": ["activation", "end_to_end"],
            "activation": {"steps": 2, "batch_size": 2},
            "steps": 2,
            "batch_size": 2,
            "pool_size": 2,
            "pool_steps": 1,
            "warmup": 1,
            "resolution": 64,
            "losses": {"eps_mse": 1.0, "feature_mse": 1.0},
        },
    }
    out = tmp_path / "student"
    code, _, stderr = run_cli(["convert", write_recipe(data), "--out", out], capsys)
    assert code == 0, stderr
    graft = json.loads((out / "graft.json").read_text())
    spans = graft["plan"]["edits"][0]["spans"]
    merged = [(j, s) for j, s in enumerate(spans) if len(s) > 1]
    assert len(spans) == 2 and len(merged) == 1
    (j, span), name = merged[0], "single_transformer_blocks"
    assert set(graft["metrics"]["stage1_relative_error"]) == {f"{name}.{j} ← {name}.{span[0]}…{span[-1]}"}
    assert graft["metrics"]["steps"] == 2 and graft["metrics"]["params_student"] < graft["metrics"]["params_teacher"]
    stock = FluxTransformer2DModel.from_pretrained(out)
    assert stock.config.num_single_layers == 2 and stock.config.num_layers == 1
    assert torch.equal(_forward(stock), _forward(dit_graft.from_pretrained(out)))


def _block_params(model, attr):
    """Parameters of one block of `model.<attr>` (all blocks of a group are the same size)."""
    return sum(p.numel() for p in getattr(model, attr)[0].parameters())


def test_dry_run_on_the_full_size_configs_plans_depth_on_the_meta_device(tmp_path, write_recipe, capsys):
    for source, graft, dropped in (
        (
            "bundled:configs/pixart-sigma-1024",
            [{"site": "depth", "op": "prune_depth", "options": {"keep": 14}}],
            lambda m: 14 * _block_params(m, "transformer_blocks"),  # 28 → 14
        ),
        (
            "bundled:configs/flux-dev",
            [
                {"site": "depth", "group": "double", "op": "prune_depth", "options": {"keep": 10}},
                {"site": "depth", "group": "single", "op": "prune_depth", "options": {"method": "learnable"}},
            ],
            # 19 → 10 double blocks, 38 → 19 single blocks (learnable 1:2)
            lambda m: 9 * _block_params(m, "transformer_blocks") + 19 * _block_params(m, "single_transformer_blocks"),
        ),
    ):
        model = build_from_config(read_config(resolve_source(source)), meta=True)
        total = sum(p.numel() for p in model.parameters())
        data = {"model": {"source": source}, "graft": graft, "export": {"out": str(tmp_path / "never")}}
        code, stdout, stderr = run_cli(["convert", write_recipe(data), "--dry-run"], capsys)
        assert code == 0, stderr
        row = next(line for line in stdout.splitlines() if "parameters" in line)
        assert _fmt(total) in row and _fmt(total - dropped(model)) in row, row
        assert "no weights loaded" in stdout and not (tmp_path / "never").exists()
    assert "double blocks │ 19 → 10, dropped [10, 11" in stdout and "single blocks │ 38 → 19, dropped [1, 3" in stdout
