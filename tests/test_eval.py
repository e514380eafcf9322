"""`dit-graft eval` on tiny models of every family: report keys, null digits metrics, grids, FID wiring, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file

import dit_graft
import dit_graft.evaluate
from dit_graft.evaluate import Samples, sample, sample_grid
from tests.conftest import tiny_dit
from tests.test_cli import run_cli
from tests.test_families import tiny_flux, tiny_pixart
from tests.test_metrics import random_inception, save_inception

REPORT_KEYS = ("fd", "fd_floor", "accuracy", "psnr_to_teacher", "latency_ratio", "samples", "steps", "fid")


def _perturbed(model, scale: float = 0.02, seed: int = 1):
    """The model with small seeded noise on every weight: a stand-in student close to its teacher."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def tiny_vae() -> AutoencoderKL:
    """A 4-latent-channel AutoencoderKL that doubles the latent size."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved tiny models: a digits-shaped DiT, PixArt and FLUX teachers, perturbed students, a PixArt pipeline."""
    root = tmp_path_factory.mktemp("eval-models")
    paths = {}
    for name, make in (
        ("digits", lambda: tiny_dit(sample_size=16, num_embeds_ada_norm=10)),
        ("pixart", tiny_pixart),
        ("flux", tiny_flux),
    ):
        make().save_pretrained(root / name)
        _perturbed(make()).save_pretrained(root / f"{name}-student")
        paths[name], paths[f"{name}-student"] = root / name, root / f"{name}-student"
    pipe = root / "pixart-pipeline"
    _perturbed(tiny_pixart()).save_pretrained(pipe / "transformer")
    tiny_vae().save_pretrained(pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    paths["pixart-pipeline"] = pipe
    return paths


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return save_inception(tmp_path_factory.mktemp("inception") / "pt_inception.pth", random_inception())


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """Four held-out digits saved as PNG files (gray), a stand-in real-image folder."""
    from dit_graft.data.digits import load_digits_split

    root = tmp_path_factory.mktemp("real")
    for i, img in enumerate(load_digits_split("heldout").images[:4]):
        Image.fromarray(((img[0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(root / f"{i}.png")
    return root


def _eval(capsys, *args):
    code, stdout, stderr = run_cli(["eval", *args, "--json"], capsys)
    assert code == 0, stderr
    return json.loads(stdout)


def test_eval_cli_reports_quality_and_fidelity_on_a_digits_shaped_model(tmp_path, models, capsys):
    digits = models["digits"]
    report = _eval(capsys, digits, "--teacher", digits, "--samples", 20, "--steps", 2, "--out", tmp_path / "ev")
    for key in REPORT_KEYS:
        assert key in report
    assert report["samples"] == 20 and report["steps"] == 2 and report["digits_metrics"] is True
    assert report["psnr_to_teacher"] == float("inf") and report["mse_to_teacher"] == 0.0  # same model, same noise
    assert report["fd"] > 0 and report["fd_floor"] > 0 and 0 <= report["accuracy"] <= 1
    assert report["teacher_fd"] == report["fd"] and report["latency_ratio"] > 0
    assert report["fid"] is None and report["fidelity_space"] == "images"
    assert {p.name for p in (tmp_path / "ev").iterdir()} == {"samples.png", "report.md", "report.json"}
    grid = np.asarray(Image.open(tmp_path / "ev" / "samples.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert "| fd |" in (tmp_path / "ev" / "report.md").read_text()


@pytest.mark.parametrize("channels", [1, 3])
def test_non_digits_dits_get_null_digits_metrics(tmp_path, tiny_dit_dir, capsys, channels):
    path = tiny_dit_dir  # 8×8 samples of 4 classes: not digits-shaped
    if channels == 3:
        path = tmp_path / "rgb"
        tiny_dit(in_channels=3, out_channels=6).save_pretrained(path)
    report = _eval(capsys, path, "--teacher", path, "--samples", 8, "--steps", 1, "--out", tmp_path / "ev")
    assert report["digits_metrics"] is False
    assert all(report[k] is None for k in ("fd", "fd_floor", "fd_ratio", "accuracy", "teacher_fd", "fid"))
    assert report["psnr_to_teacher"] == float("inf") and report["sample_shape"] == [channels, 8, 8]
    assert any(n.startswith("fd, fd_floor, accuracy: not applicable") for n in report["notes"])
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| fd | n/a |" in md and "not applicable" in md


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_eval_text_families_against_a_teacher(tmp_path, models, capsys, family):
    extra = ["--resolution", 64] if family == "flux" else []  # FLUX's default is 1024 px
    report = _eval(
        capsys,
        models[f"{family}-student"],
        "--teacher",
        models[family],
        "--samples",
        3,
        "--steps",
        2,
        "--out",
        tmp_path / "ev",
        *extra,
    )
    assert report["family"] == family and report["sample_shape"] == [4, 8, 8]
    assert report["conditions"] == "synthetic captions (seeded)"
    assert 0 < report["psnr_to_teacher"] < float("inf") and report["mse_to_teacher"] > 0
    assert report["latency_ratio"] > 0 and report["seconds"] > 0 and report["teacher_seconds"] > 0
    assert report["fidelity_space"] == "latents" and report["grid"].startswith("NOT images")
    assert all(report[k] is None for k in ("fd", "fd_floor", "accuracy", "fid", "teacher_fid"))
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "NOT images: the first 3 latent channels" in md and "in latent space (no VAE)" in md


def test_text_family_student_and_teacher_share_noise_and_conditions(models):
    student = dit_graft.from_pretrained(models["flux-student"])
    teacher = dit_graft.from_pretrained(models["flux"])
    same = sample(teacher, 3, 2, 1.0, resolution=8)
    assert torch.equal(same.images, sample(teacher, 3, 2, 1.0, resolution=8).images)
    other = sample(student, 3, 2, 1.0, resolution=8)
    assert same.images.shape == other.images.shape == (3, 4, 8, 8)
    assert 0 < (same.images - other.images).abs().mean() < same.images.abs().mean()  # close, not equal


def test_eval_decodes_latents_with_a_pipeline_vae(tmp_path, models, capsys):
    pipe = models["pixart-pipeline"]
    report = _eval(capsys, pipe, "--teacher", models["pixart"], "--samples", 3, "--steps", 2, "--out", tmp_path / "ev")
    assert report["fidelity_space"] == "images" and report["grid"].endswith(str(pipe / "vae"))
    assert 0 < report["psnr_to_teacher"] < float("inf")
    # the VAE doubles the 8×8 latents: 16×16 cells, three rows (one per caption), teacher | gutter | student
    grid = np.asarray(Image.open(tmp_path / "ev" / "samples.png"))
    assert grid.shape == (3 * 3 * 17, 3 * (17 + 4 + 17), 3)
    # a transformer-only export decodes through --vae
    report = _eval(capsys, models["pixart"], "--vae", pipe, "--samples", 2, "--steps", 1)
    assert report["grid"].startswith("latents decoded") and report["psnr_to_teacher"] is None


def test_eval_reads_cached_caption_embeddings(tmp_path, models, capsys):
    gen = torch.Generator().manual_seed(0)
    captions = tmp_path / "captions.safetensors"
    save_file(
        {
            "prompt_embeds": torch.randn(2, 5, 24, generator=gen),
            "prompt_attention_mask": torch.ones(2, 5, dtype=torch.long),
            "pooled_prompt_embeds": torch.randn(2, 12, generator=gen),
        },
        str(captions),
    )
    report = _eval(capsys, models["pixart"], "--conditions", captions, "--samples", 4, "--steps", 1)
    assert report["conditions"] == str(captions)
    s = sample(dit_graft.from_pretrained(models["flux"]), 4, 1, 1.0, conditions=captions, resolution=8)
    assert s.labels.tolist() == [0, 1, 0, 1]  # caption i % 2
    code, _, stderr = run_cli(["eval", models["digits"], "--conditions", captions, "--samples", 2], capsys)
    assert code == 2 and "--conditions: the dit family is class-conditional" in stderr


def test_sampling_is_deterministic_per_seed(tiny_dit_dir):
    model = dit_graft.from_pretrained(tiny_dit_dir)
    a, b, c = sample(model, 10, 2, 1.5, seed=3), sample(model, 10, 2, 1.5, seed=3), sample(model, 10, 2, 1.5, seed=4)
    assert (a.images == b.images).all() and not (a.images == c.images).all()
    assert a.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]  # class-balanced over the 4 classes


def test_sample_grid_rows_follow_labels():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 1.0, -1.0)])
    grid = sample_grid(Samples(images, torch.tensor([0, 1, 0]), 0.0), None, pad=1)
    assert grid.shape == (2 * 3, 2 * 3, 3)  # two labels → two rows; label 0 has two samples → two columns
    assert grid[0, 0].tolist() == [0, 0, 0] and grid[3, 0].tolist() == [255, 255, 255]
    assert grid[3, 3].tolist() == [51, 51, 51]  # label 1 has one sample: a grey gutter cell beside it


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "{digits}"], "--teacher is a dit model and MODEL a pixart model"),
        (["--teacher", "{flux}"], "--teacher is a flux model"),
        (["--resolution", 60], "--resolution 60: not a positive multiple of the VAE factor 8"),
        (["--vae", "{digits}"], "--vae"),
    ],
)
def test_eval_refuses_what_it_cannot_compare(models, capsys, monkeypatch, args, message):
    monkeypatch.setattr(dit_graft.evaluate, "sample", _no_sampling)
    args = [str(a).format(**{k: str(v) for k, v in models.items()}) for a in args]
    code, _, stderr = run_cli(["eval", models["pixart"], "--samples", 2, *args], capsys)
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def _no_sampling(*args, **kwargs):
    raise AssertionError("sampled before refusing")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--real", "{real}"], "--real needs Inception-v3 weights for FID: pass --inception-weights PATH"),
        (["--inception-weights", "{weights}"], "pass --real DIR"),
        (["--real", "{real}", "--inception-weights", "{real}/missing.pth"], "does not exist"),
    ],
)
def test_fid_flags_fail_at_once(tmp_path, real_dir, inception_file, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(dit_graft.evaluate, "sample", _no_sampling)
    flags = [f.format(real=real_dir, weights=inception_file) for f in flags]
    # MODEL does not exist either: the FID flags are checked before anything is loaded
    code, stdout, stderr = run_cli(["eval", tmp_path / "no-model", *flags], capsys)
    assert code == 2 and message in stderr and stdout == ""
    assert len(stderr.strip().splitlines()) == 1


def test_fid_refuses_bad_weights_and_undecodable_latents_before_sampling(
    tmp_path, models, real_dir, inception_file, capsys, monkeypatch
):
    monkeypatch.setattr(dit_graft.evaluate, "sample", _no_sampling)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    code, _, stderr = run_cli(["eval", models["digits"], "--real", real_dir, "--inception-weights", bad], capsys)
    assert code == 3 and str(bad) in stderr
    code, _, stderr = run_cli(
        ["eval", models["pixart"], "--real", real_dir, "--inception-weights", inception_file], capsys
    )
    assert code == 2 and "FID needs images" in stderr and "--vae" in stderr


def test_fid_on_pixel_and_decoded_latent_samples(models, real_dir, inception_file, capsys):
    fid_flags = ["--real", real_dir, "--inception-weights", inception_file, "--samples", 3, "--steps", 1]
    digits = _eval(capsys, models["digits"], *fid_flags)  # gray samples → three channels
    assert digits["fid"] > 0 and digits["fid_real_images"] == 4 and digits["fd"] is not None
    assert any(n.startswith("fid: 3 samples against 4 real images") for n in digits["notes"])
    latents = _eval(capsys, models["pixart-pipeline"], *fid_flags)  # decoded by the pipeline's VAE
    assert latents["fid"] > 0 and latents["fd"] is None and latents["teacher_fid"] is None
