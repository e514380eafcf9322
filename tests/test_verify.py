"""`dit-graft verify`: an export passes as written and fails, exit 3, on every kind of tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dit_graft.export import export
from dit_graft.loading import WEIGHTS_NAME
from dit_graft.plan import apply, plan
from dit_graft.recipe import validate
from dit_graft.verify import INTEGRITY_NAME, VERIFY_NAME, verify
from tests.conftest import tiny_dit
from tests.test_cli import run_cli
from tests.test_families import tiny_flux, tiny_pixart

DISTILL = {"steps": 1, "batch_size": 2, "pool_size": 2, "pool_steps": 2, "warmup": 1}


def _export(teacher, graft, out: Path, dtype: str = "float32") -> Path:
    recipe = validate({"model": {"source": "teacher-dir"}, "graft": graft, "distill": DISTILL})
    graft_plan = plan(teacher, recipe)
    return export(apply(teacher, graft_plan), graft_plan, recipe.model_dump(), out, dtype=dtype)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    graft = [
        {"site": "depth", "op": "prune_depth", "options": {"keep": 2}},
        {"site": "attention", "op": "linear", "options": {"dwconv": 3}},
        {"site": "mlp", "layers": [0], "op": "moe", "options": {"experts": 2, "top_k": 1}},
    ]
    return _export(tiny_dit(num_layers=3), graft, tmp_path_factory.mktemp("verify") / "student")


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(pristine, out)
    return out


def test_export_records_and_verify_passes(pristine, capsys):
    graft = json.loads((pristine / "graft.json").read_text())
    assert graft["verify"]["file"] == VERIFY_NAME and graft["verify"]["seed"] == 0
    files = json.loads((pristine / INTEGRITY_NAME).read_text())["files"]
    assert {"config.json", "graft.json", WEIGHTS_NAME, VERIFY_NAME, "README.md"} <= set(files)
    report = verify(pristine)
    assert report["problems"] == [] and report["forward_relative_error"] == 0.0
    code, out, _ = run_cli(["verify", pristine], capsys)
    assert code == 0 and "ok" in out and "teacher-dir" in out


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_other_families_and_dtypes_verify(family, tmp_path):
    if family == "pixart":
        out = _export(tiny_pixart(), [{"site": "attention", "op": "linear"}], tmp_path / "s", dtype="bfloat16")
    else:
        out = _export(tiny_flux(), [{"site": "mlp", "group": "double", "op": "prune_width"}], tmp_path / "s")
    report = verify(out)
    assert report["problems"] == [] and report["forward_relative_error"] == 0.0


def _fails(path: Path, capsys, needle: str) -> None:
    code, _, err = run_cli(["verify", path], capsys)
    assert code == 3, err
    assert needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 or all(line.startswith("- ") for line in err.strip().splitlines()[:-1])


def test_truncated_weights(copy, capsys):
    weights = copy / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    _fails(copy, capsys, "truncated")


def test_edited_tensor_same_size(copy, capsys):
    with safe_open(str(copy / WEIGHTS_NAME), framework="pt") as f:
        metadata = f.metadata()
    size = (copy / WEIGHTS_NAME).stat().st_size
    state = load_file(copy / WEIGHTS_NAME)
    key = next(k for k in state if k.endswith("to_q.weight"))
    state[key] = state[key].clone()
    state[key][0] += 0.5  # one row of one projection
    save_file(state, str(copy / WEIGHTS_NAME), metadata=metadata)
    assert (copy / WEIGHTS_NAME).stat().st_size == size
    report = verify(copy)
    assert any("contents changed" in p for p in report["problems"])
    assert any("forward" in p for p in report["problems"])  # the seeded forward sees the edit too
    _fails(copy, capsys, WEIGHTS_NAME)


def test_missing_file(copy, capsys):
    (copy / "README.md").unlink()
    _fails(copy, capsys, "README.md: missing")


def test_changed_config(copy, capsys):
    config = json.loads((copy / "config.json").read_text())
    config["num_attention_heads"], config["attention_head_dim"] = 1, 16  # same width: the weights still load
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    report = verify(copy)
    assert any(p.startswith("config.json: ") for p in report["problems"])
    assert any(p.startswith("forward: output differs") for p in report["problems"])
    _fails(copy, capsys, "config.json")


def test_forward_mismatch_alone(copy, capsys):
    """A recorded output that the export no longer reproduces (and a manifest that was re-hashed to match)."""
    from dit_graft.verify import _files, sha256

    tensors = load_file(copy / VERIFY_NAME)
    tensors["output"] = tensors["output"] * 1.01
    save_file(tensors, str(copy / VERIFY_NAME))
    manifest = json.loads((copy / INTEGRITY_NAME).read_text())
    manifest["files"] = {n: {"sha256": sha256(copy / n), "bytes": (copy / n).stat().st_size} for n in _files(copy)}
    (copy / INTEGRITY_NAME).write_text(json.dumps(manifest))
    report = verify(copy)
    assert len(report["problems"]) == 1 and "relative error" in report["problems"][0]
    _fails(copy, capsys, "forward")


def test_newer_graft_version_and_missing_manifest(copy, capsys):
    graft = json.loads((copy / "graft.json").read_text())
    graft["dit_graft_version"] = "99.0.0"
    (copy / "graft.json").write_text(json.dumps(graft))
    assert any("newer than the installed" in p for p in verify(copy)["problems"])
    (copy / INTEGRITY_NAME).unlink()
    _fails(copy, capsys, INTEGRITY_NAME)
    _fails(copy.parent / "nowhere", capsys, "no such export directory")


def test_added_files_are_listed_not_failed(copy):
    (copy / "notes.txt").write_text("mine")
    report = verify(copy)
    assert report["problems"] == [] and report["files_added"] == ["notes.txt"]
