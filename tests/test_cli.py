"""The CLI itself: convert end to end on a tiny model, dry-run, validate, inspect, and bad inputs."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dit_graft
from dit_graft.cli import main
from tests.conftest import op_of, tiny_recipe


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_end_to_end_on_a_tiny_model(tmp_path, tiny_dit_dir, write_recipe, capsys):
    out = tmp_path / "student"
    code, stdout, stderr = run_cli(["convert", write_recipe(tiny_recipe(tiny_dit_dir, out))], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "graft.json",
        "integrity.json",
        "loss.csv",
        "loss.json",
        "loss.png",
        "modeling_dit_graft.py",
        "verify.safetensors",
    ]
    graft = json.loads((out / "graft.json").read_text())
    assert graft["metrics"]["steps"] == 4
    assert graft["recipe"]["graft"][0]["options"]["dwconv"] == 3
    assert not (tmp_path / ".student.work").exists() and not (tmp_path / ".student.tmp").exists()
    student = dit_graft.from_pretrained(out)
    assert op_of(student.transformer_blocks[0].attn1.processor) == "linear"
    # converting again into the same export directory replaces it
    code, _, stderr = run_cli(
        ["convert", write_recipe(tiny_recipe(tiny_dit_dir, out)), "--set", "distill.steps=2"], capsys
    )
    assert code == 0, stderr
    assert json.loads((out / "graft.json").read_text())["metrics"]["steps"] == 2


def test_dry_run_prints_plan_and_costs_without_weights(tmp_path, tiny_dit_dir, write_recipe, capsys):
    recipe = write_recipe(tiny_recipe(tiny_dit_dir, tmp_path / "student"))
    code, stdout, _ = run_cli(["convert", recipe, "--dry-run"], capsys)
    assert code == 0
    assert "transformer_blocks.1.attn1" in stdout and "softmax → linear" in stdout
    assert "attention FLOPs" in stdout and "no weights loaded" in stdout
    assert not (tmp_path / "student").exists()


def test_validate_and_inspect(tmp_path, tiny_dit_dir, write_recipe, capsys):
    code, stdout, _ = run_cli(["validate", write_recipe(tiny_recipe(tiny_dit_dir, tmp_path / "x"))], capsys)
    assert code == 0 and "ok — 1 edit(s), 2 module(s)" in stdout
    code, stdout, _ = run_cli(["inspect", tiny_dit_dir, "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["layers"] == 2 and info["attention"][0]["operator"] == "softmax"
    assert info["params"] == sum(p.numel() for p in dit_graft.from_pretrained(tiny_dit_dir).parameters())


def test_operators_lists_every_registered_operator(capsys):
    code, stdout, _ = run_cli(["operators"], capsys)
    assert code == 0 and "linear" in stdout and "softmax" in stdout


def _evil_pickle(path: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    return path


def _truncated_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    w = dst / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:500])
    return dst


def _wrong_shape_copy(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = dst / "diffusion_pytorch_model.safetensors"
    state = load_file(w)
    state["transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(16, 15)
    save_file(state, w)
    return dst


BAD_INPUTS = {
    "unknown key": (lambda r, t: r["distill"].update(wat=1), [], 2, "distill.wat: unknown key"),
    "wrong type": (lambda r, t: r["distill"].update(batch_size="big"), [], 2, "distill.batch_size"),
    "layer out of range": (lambda r, t: r["graft"][0].update(layers=[0, 7]), [], 2, "layer 7 out of range"),
    "unknown operator": (lambda r, t: r["graft"][0].update(op="mamba9"), [], 2, "unknown operator 'mamba9'"),
    "selector matches nothing": (lambda r, t: r["graft"][0].update(layers="every:2:5"), [], 2, "matches no layer"),
    "missing checkpoint": (lambda r, t: r["model"].update(source=str(t / "nope")), [], 3, "no such file or directory"),
    "truncated safetensors": (
        lambda r, t: r["model"].update(source=str(_truncated_copy(Path(r["model"]["source"]), t / "trunc"))),
        [],
        3,
        "corrupt or truncated",
    ),
    "wrong shape": (
        lambda r, t: r["model"].update(source=str(_wrong_shape_copy(Path(r["model"]["source"]), t / "shape"))),
        [],
        3,
        "to_q.weight has shape (16, 15)",
    ),
    "pickle that runs code": (
        lambda r, t: r["model"].update(source=str(_evil_pickle(t / "evil.pt"))),
        [],
        3,
        "refused to unpickle",
    ),
    "output equals input": (lambda r, t: r["export"].update(out=r["model"]["source"]), [], 2, "teacher's own path"),
    "non-finite loss": (lambda r, t: None, ["--set", "distill.lr=1e30"], 4, "diverged"),
    "--set missing path": (lambda r, t: None, ["--set", "distill.optimizer=sgd"], 2, "no key distill.optimizer"),
    "bad heads option": (lambda r, t: r["graft"][0]["options"].update(heads=3), [], 2, "heads=3 does not divide"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_one_line_errors_exit_codes_and_no_output(case, tmp_path, tiny_dit_dir, write_recipe, capsys):
    mutate, extra, exit_code, message = BAD_INPUTS[case]
    out = tmp_path / "student"
    data = tiny_recipe(tiny_dit_dir, out)
    mutate(data, tmp_path)
    code, stdout, stderr = run_cli(["convert", write_recipe(data), *extra], capsys)
    assert code == exit_code, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr  # progress may precede it; the error is one line
    assert message in errors[0], errors[0]
    assert "Traceback" not in stderr and "pwned" not in stdout
    assert not out.exists() and not (tmp_path / ".student.tmp").exists()


def test_refuses_to_overwrite_a_directory_that_is_not_an_export(tmp_path, tiny_dit_dir, write_recipe, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    code, _, stderr = run_cli(["convert", write_recipe(tiny_recipe(tiny_dit_dir, out))], capsys)
    assert code == 2 and "refusing to overwrite" in stderr
    assert (out / "thesis.tex").read_text() == "keep me"


def test_console_script_runs(tmp_path, tiny_dit_dir, write_recipe):
    recipe = write_recipe(tiny_recipe(tiny_dit_dir, tmp_path / "s"))
    done = subprocess.run(
        [sys.executable, "-m", "dit_graft.cli", "validate", str(recipe)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "dit_graft.cli", "validate", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr


def test_recipes_lists_the_bundled_recipes(capsys):
    code, stdout, _ = run_cli(["recipes"], capsys)
    assert code == 0 and "digits-lit.yaml" in stdout
