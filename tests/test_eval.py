"""`dit-graft eval` on tiny models: report keys, sample grid, fidelity numbers, clear errors."""

from __future__ import annotations

import json

import pytest

import dit_graft
from dit_graft.evaluate import sample
from tests.test_cli import run_cli


def test_eval_cli_reports_quality_and_fidelity(tmp_path, tiny_dit_dir, capsys):
    args = [
        "eval",
        tiny_dit_dir,
        "--teacher",
        tiny_dit_dir,
        "--samples",
        20,
        "--steps",
        2,
        "--out",
        tmp_path / "ev",
        "--json",
    ]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    report = json.loads(stdout)
    for key in ("fd", "fd_floor", "accuracy", "psnr_to_teacher", "latency_ratio", "samples", "steps"):
        assert key in report
    assert report["samples"] == 20 and report["steps"] == 2
    assert report["psnr_to_teacher"] == float("inf") and report["mse_to_teacher"] == 0.0  # same model, same noise
    assert report["fd"] > 0 and 0 <= report["accuracy"] <= 1
    assert {p.name for p in (tmp_path / "ev").iterdir()} == {"samples.png", "report.md", "report.json"}


def test_sampling_is_deterministic_per_seed(tiny_dit_dir):
    model = dit_graft.from_pretrained(tiny_dit_dir)
    a, b, c = sample(model, 10, 2, 1.5, seed=3), sample(model, 10, 2, 1.5, seed=3), sample(model, 10, 2, 1.5, seed=4)
    assert (a.images == b.images).all() and not (a.images == c.images).all()
    assert a.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]  # class-balanced over the 4 classes


@pytest.mark.parametrize("weights", [None, "missing.pt"])
def test_non_digit_models_need_inception_weights(tmp_path, capsys, weights):
    from tests.conftest import tiny_dit

    path = tmp_path / "rgb"
    tiny_dit(in_channels=3, out_channels=6).save_pretrained(path)
    extra = ["--inception-weights", tmp_path / weights] if weights else []
    code, _, stderr = run_cli(["eval", path, "--samples", 10, "--steps", 1, *extra], capsys)
    assert code == 2 and "nothing is downloaded" in stderr
