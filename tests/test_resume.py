"""Interrupted distillation: SIGKILL mid-run and mid-checkpoint, resume, same final weights."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_recipe


def _convert(recipe, out, *extra, kill=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIT_GRAFT_TEST_KILL", None)
    if kill:
        env["DIT_GRAFT_TEST_KILL"] = kill
    cmd = [sys.executable, "-m", "dit_graft.cli", "convert", str(recipe), "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, tiny_dit_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_dit_dir, tmp_path / "unused", steps=8, checkpoint_every=2)))
    reference = _convert(recipe, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "student"
    work = tmp_path / ".student.work"
    killed = _convert(recipe, out, kill="checkpoint:4")  # dies with checkpoint 4 half-written
    assert killed.returncode == -9
    assert not out.exists()
    ckpts = work / "checkpoints" / "end_to_end"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step-00000004", "step-00000002"]

    killed = _convert(recipe, out, "--resume", kill="step:7")  # resumes from 2, dies after step 7
    assert killed.returncode == -9 and not out.exists()
    assert sorted(p.name for p in ckpts.iterdir())[-1] == "step-00000006"

    resumed = _convert(recipe, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "ref" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    assert (tmp_path / "ref" / "loss.csv").read_text() == (out / "loss.csv").read_text()
    assert not work.exists()


def test_a_kill_in_stage_one_resumes_there_and_ends_with_the_uninterrupted_weights(tmp_path, tiny_dit_dir):
    recipe = tmp_path / "r.yaml"
    data = tiny_recipe(tiny_dit_dir, tmp_path / "unused", steps=2, checkpoint_every=2)
    data["distill"].update(stages=["activation", "end_to_end"], activation={"steps": 4, "batch_size": 4})
    recipe.write_text(yaml.safe_dump(data))
    reference = _convert(recipe, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "student"
    killed = _convert(recipe, out, kill="step:3")  # stage 1 dies after its step 3 (its checkpoint 2 is kept)
    assert killed.returncode == -9 and not out.exists()
    ckpts = tmp_path / ".student.work" / "checkpoints"
    assert sorted(p.name for p in (ckpts / "activation").iterdir()) == ["step-00000002"]
    assert not (ckpts / "end_to_end").exists()
    resumed = _convert(recipe, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "ref" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
