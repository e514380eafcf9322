"""Recipe parsing: typed validation, file:line error messages, --set overrides, layer selectors."""

from __future__ import annotations

import pytest

from dit_graft.errors import RecipeError
from dit_graft.plan import select_layers
from dit_graft.recipe import load_recipe
from tests.conftest import tiny_recipe


def test_bundled_default_recipe_parses_and_fills_operator_defaults():
    recipe = load_recipe("recipes/digits-lit.yaml")
    assert recipe.model.source == "bundled:digits-dit"
    assert recipe.graft[0].options == {"feature_map": "relu", "norm": "divide", "heads": None, "dwconv": 3, "eps": 1e-6}


def test_set_overrides_nested_paths_and_list_indices(tmp_path, write_recipe):
    path = write_recipe(tiny_recipe(tmp_path, tmp_path / "out"))
    recipe = load_recipe(path, ["distill.steps=20", "graft.0.options.heads=1", "graft.0.options.feature_map=elu1"])
    assert recipe.distill.steps == 20
    assert recipe.graft[0].options["heads"] == 1
    assert recipe.graft[0].options["feature_map"] == "elu1"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["distill"].update(stepz=3), r"recipe.yaml:\d+: distill.stepz: unknown key"),
        (lambda r: r["distill"].update(steps="many"), r"recipe.yaml:\d+: distill.steps: .*integer"),
        (lambda r: r["graft"][0].update(op="quantum"), r"graft.0.op: unknown operator 'quantum'"),
        (lambda r: r["graft"][0]["options"].update(feature_map="tanh"), r"graft.0.options.feature_map: "),
        (lambda r: r["graft"][0]["options"].update(colour=1), r"graft.0.options.colour: unknown key"),
        (lambda r: r["graft"][0].update(site="mlp"), r"goes into attention sites, not mlp"),
        (lambda r: r.pop("model"), r"model: required key is missing"),
    ],
)
def test_bad_recipes_name_file_line_and_key(tmp_path, write_recipe, mutate, expected):
    data = tiny_recipe(tmp_path, tmp_path / "out")
    mutate(data)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(write_recipe(data))


def test_error_line_points_at_the_offending_key(tmp_path, write_recipe):
    data = tiny_recipe(tmp_path, tmp_path / "out")
    data["distill"]["bogus"] = 1
    path = write_recipe(data)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "bogus" in text)
    with pytest.raises(RecipeError, match=rf"recipe.yaml:{line}: distill.bogus"):
        load_recipe(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+: invalid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_set_on_a_missing_path_is_an_error(tmp_path, write_recipe):
    path = write_recipe(tiny_recipe(tmp_path, tmp_path / "out"))
    with pytest.raises(RecipeError, match=r"--set distill.nope=1: no key distill.nope"):
        load_recipe(path, ["distill.nope=1"])
    with pytest.raises(RecipeError, match=r"no key graft.3"):
        load_recipe(path, ["graft.3.op=linear"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["distill.steps"])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ("1-3", [1, 2, 3]),
        ("every:2", [0, 2, 4]),
        ("every:3:1", [1, 4]),
        ("0,2-3", [0, 2, 3]),
        (4, [4]),
        ([5, 1], [1, 5]),
    ],
)
def test_layer_selectors(spec, expected):
    assert select_layers(spec, 6, "layers") == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (6, "layer 6 out of range"),
        ("2-9", "out of range"),
        ("every:2:7", "matches no layer"),
        ([], "matches no layer"),
        ("3-1", "empty range"),
        ("odd", "cannot read layer selector"),
    ],
)
def test_bad_layer_selectors(spec, message):
    with pytest.raises(RecipeError, match=message):
        select_layers(spec, 6, "graft.0.layers")
