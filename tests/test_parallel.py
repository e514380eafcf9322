"""Several processes (torchrun + gloo on the CPU): one export, the same student as one process, resume after a kill.

Every conversion here is the digits recipe with a tiny budget: 4 steps of a global batch of 8 from a pool of
16 teacher samples. Two processes each train on half of every global batch; with fp32 the student must equal
the one-process student up to float rounding (relative difference of every weight tensor ≤ 1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits-lit.yaml"
TINY = [
    "distill.steps=4",
    "distill.batch_size=8",
    "distill.pool_size=16",
    "distill.pool_steps=2",
    "distill.checkpoint_every=2",
]


def run(out: Path, *sets: str, procs: int = 1, kill: str | None = None, resume: bool = False):
    """`dit-graft convert` on the digits recipe, in `procs` processes (torchrun, gloo) or one plain process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIT_GRAFT_TEST_KILL", None)
    if kill:
        env["DIT_GRAFT_TEST_KILL"] = kill
    launcher = [sys.executable, "-m", "dit_graft.cli"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        launcher += ["-m", "dit_graft.cli"]
    args = ["convert", str(RECIPE), "--out", str(out), *(a for s in [*TINY, *sets] for a in ("--set", s))]
    return subprocess.run(
        [*launcher, *args, *(["--resume"] if resume else [])],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=out.parent,
    )


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "diffusion_pytorch_model.safetensors")


def assert_same_student(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k].double() - wb[k].double()).norm() / wb[k].double().norm().clamp_min(1e-30)
        assert diff <= tol, (k, float(diff))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "student"
    done = run(out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_export_once_the_student_of_one_process(tmp_path, one_process, parallel):
    out = tmp_path / "student"
    done = run(out, f"distill.parallel={parallel}", procs=2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("exported") == 1  # the main process alone writes and reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no work dir, no temporary export
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "diffusion_pytorch_model.safetensors", "graft.json", "loss.csv"} <= set(names)
    assert not [n for n in names if n.startswith(".")]
    assert_same_student(out, one_process)
    assert (out / "loss.csv").read_text().splitlines()[0] == (one_process / "loss.csv").read_text().splitlines()[0]


def test_a_killed_rank_then_resume_with_another_process_count(tmp_path, one_process):
    out = tmp_path / "student"
    killed = run(out, procs=2, kill="step:3@1")  # rank 1 dies after step 3: checkpoint 2 is the latest
    assert killed.returncode != 0 and not out.exists()
    ckpts = tmp_path / ".student.work" / "checkpoints" / "end_to_end"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]
    resumed = run(out, resume=True)  # one process takes over the whole global batch
    assert resumed.returncode == 0, resumed.stderr
    assert_same_student(out, one_process)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_a_global_batch_the_processes_do_not_divide_is_a_one_line_error(tmp_path):
    done = run(tmp_path / "student", "distill.batch_size=3", procs=2)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert lines == ["error: distill.batch_size: the global batch 3 is not divisible by the 2 processes"]
    assert "dit_graft/" not in done.stderr  # no traceback from the ranks (torchrun prints its own summary)
    assert done.stderr.count("exitcode  : 2") == 2  # every rank ends with the input-error code
    assert not (tmp_path / "student").exists() and not (tmp_path / ".student.work").exists()
