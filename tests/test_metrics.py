"""Fréchet distance, the committed digits classifier, PSNR/MSE, the FID Inception and its input checks."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file
from torch import nn

from dit_graft.data.digits import load_digits_split
from dit_graft.errors import InputError, IntegrityError
from dit_graft.metrics import (
    CLASSIFIER_DIR,
    CONFIG_NAME,
    FEATURE_DIM,
    INCEPTION_FEATURES,
    WEIGHTS_NAME,
    FIDInceptionV3,
    class_accuracy,
    classify,
    fd_floor,
    frechet_distance,
    frechet_distance_from_stats,
    inception_features,
    load_classifier,
    load_inception,
    mse,
    psnr,
    real_image_files,
    require_fid_inputs,
    require_inception_weights,
    resize_like_tf1,
    to_uint8_rgb,
)


@pytest.fixture(scope="module")
def heldout():
    return load_digits_split("heldout")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    """A random well-conditioned SPD matrix."""
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_of_a_set_with_itself_is_zero(heldout, classifier):
    feats, _ = classify(heldout.images, classifier)
    assert feats.shape == (len(heldout), FEATURE_DIM)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_fd_grows_with_perturbation(heldout, classifier):
    images = heldout.images[:200]
    clean, _ = classify(images, classifier)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    fds = [
        frechet_distance(clean, classify((images + s * noise).clamp(-1, 1), classifier)[0])
        for s in (0.0, 0.2, 0.5, 1.0)
    ]
    assert fds[0] == pytest.approx(0.0, abs=1e-8)
    assert all(b > a for a, b in zip(fds[:-1], fds[1:], strict=True)), fds


def test_fd_from_stats_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    d = 6
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    cov_a, cov_b = _random_cov(rng, d), _random_cov(rng, d)
    cross = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * cross)
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(
        frechet_distance_from_stats(mu_b, cov_b, mu_a, cov_a), rel=1e-9
    )


def test_fd_handles_singular_covariances():
    rng = np.random.default_rng(1)
    low_rank = rng.standard_normal((500, 2)) @ rng.standard_normal((2, 8))  # rank-2 features in 8 dims
    fd = frechet_distance(low_rank, low_rank + 1e-3 * rng.standard_normal((500, 8)))
    assert math.isfinite(fd) and 0.0 <= fd < 1e-3


def test_fd_of_gaussian_samples_is_near_analytic():
    rng = np.random.default_rng(2)
    d, n = 8, 20000
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # a shared rotation: FD is invariant, covariances not diagonal
    var_a, var_b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    analytic = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    a = (rng.standard_normal((n, d)) * np.sqrt(var_a) + mu_a) @ q.T
    b = (rng.standard_normal((n, d)) * np.sqrt(var_b) + mu_b) @ q.T
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(analytic, rel=0.03)


def test_fd_rejects_mismatched_features():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_committed_classifier_heldout_accuracy(heldout, classifier):
    config = json.loads((CLASSIFIER_DIR / CONFIG_NAME).read_text())
    assert config["feature_dim"] == FEATURE_DIM
    acc = class_accuracy(heldout.images, heldout.labels, classifier)
    assert acc >= 0.95
    assert acc == pytest.approx(config["heldout_accuracy"], abs=0.006)  # within 2 of 359 images of the record


def test_classify_default_classifier_and_shape_check(heldout):
    _, pred = classify(heldout.images[:10])
    assert pred.shape == (10,) and pred.dtype == torch.int64
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        classify(torch.zeros(2, 16, 16))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_weights", "missing_config", "bad_config"])
def test_damaged_classifier_raises_integrity_error(tmp_path, damage):
    root = tmp_path / "digits-cnn"
    shutil.copytree(CLASSIFIER_DIR, root)
    weights, config = root / WEIGHTS_NAME, root / CONFIG_NAME
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00not a safetensors file")
    elif damage == "missing_weights":
        weights.unlink()
    elif damage == "missing_config":
        config.unlink()
    else:
        config.write_text("{ not json")
    with pytest.raises(IntegrityError) as info:
        load_classifier(root)
    message = str(info.value)
    assert "\n" not in message
    assert str(root) in message


def test_fd_floor_is_deterministic_and_bounded():
    assert fd_floor(100, seed=3) == fd_floor(100, seed=3)
    with pytest.raises(ValueError, match="359"):
        fd_floor(360)


def test_mse_and_psnr():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full_like(a, 0.1)
    assert mse(a, b) == pytest.approx(0.01)
    assert psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        mse(a, b[:1])


def test_require_inception_weights(tmp_path):
    with pytest.raises(InputError, match="None") as info:
        require_inception_weights(None)
    assert "--inception-weights" in str(info.value) and "nothing is downloaded" in str(info.value)
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(InputError) as info:
        require_inception_weights(missing)
    assert str(missing) in str(info.value) and "nothing is downloaded" in str(info.value)
    missing.write_bytes(b"x")
    assert require_inception_weights(str(missing)) == missing


def test_fd_with_fewer_samples_than_dimensions_matches_the_covariance_formula():
    rng = np.random.default_rng(3)
    for n_a, n_b, d in ((6, 9, 40), (30, 12, 30), (5, 7, 300)):
        a = rng.standard_normal((n_a, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
        b = rng.standard_normal((n_b, d)) + 0.3
        expected = frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7, abs=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def random_inception(seed: int = 0) -> FIDInceptionV3:
    """A randomly initialised FID Inception whose BatchNorm statistics are fitted to random images.

    Default BatchNorm statistics (mean 0, variance 1) let activations shrink layer after layer to ~1e-8 features;
    fitted ones keep every layer at unit scale, so distances between feature sets mean something.
    """
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one batch sets the statistics exactly
            m.reset_running_stats()
    model.train()
    model(torch.randint(0, 256, (4, 3, 24, 24), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8))
    return model.eval()


def save_inception(path, model: FIDInceptionV3):
    """Writes the state dict as the common FID weights file holds it (no BatchNorm counters) for `load_inception`."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return save_inception(tmp_path_factory.mktemp("inception") / "pt_inception.pth", random_inception())


@pytest.fixture(scope="module")
def inception(inception_file):
    return load_inception(inception_file)


def _smooth_images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """n blurry random RGB images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_perturbation(inception):
    images = _smooth_images(4, seed=0)
    clean = inception_features(to_uint8_rgb(images), inception)
    assert clean.shape == (4, INCEPTION_FEATURES) and clean.dtype == torch.float32
    assert clean.std(0).mean() > 0.1  # fitted BatchNorm statistics: features vary between images
    assert frechet_distance(clean, clean) == pytest.approx(0, abs=1e-6)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    fids = [
        frechet_distance(clean, inception_features(to_uint8_rgb(images + s * noise), inception)) for s in (0.1, 0.5)
    ]
    assert 0 < fids[0] < fids[1], fids


def test_inception_loads_the_same_from_pth_and_safetensors(tmp_path, inception):
    images = to_uint8_rgb(_smooth_images(2, seed=2, size=20))
    other = load_inception(save_inception(tmp_path / "inception.safetensors", inception))
    assert torch.equal(inception_features(images, inception), inception_features(images, other))


def test_inception_features_of_files_resize_each_image(tmp_path, inception):
    from PIL import Image

    images = to_uint8_rgb(_smooth_images(2, seed=3, size=24))
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(tmp_path / "wide.jpg")
    files = real_image_files(tmp_path)
    assert [f.name for f in files] == ["0.png", "1.png", "wide.jpg"]
    from_files = inception_features(files, inception, batch=2)
    assert from_files.shape == (3, INCEPTION_FEATURES)
    assert torch.allclose(from_files[:2], inception_features(images, inception), atol=1e-4)


def test_resize_like_tf1_samples_without_half_pixel_offset():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    up = resize_like_tf1(x, 8)  # source positions 0, .5, 1, ..., 3.5 (the last clamps to 3)
    assert up[0, 0, 0].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]
    assert torch.equal(resize_like_tf1(x, 4), x)


def test_to_uint8_rgb_quantises_and_repeats_gray():
    gray = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    rgb = to_uint8_rgb(gray)
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 3, 2, 2)
    assert rgb[0, 0].flatten().tolist() == [0, 128, 255, 255] and torch.equal(rgb[0, 0], rgb[0, 2])
    with pytest.raises(ValueError, match="1 or 3"):
        to_uint8_rgb(torch.zeros(1, 4, 2, 2))


class _NotATensor:
    """Anything a pickle could carry besides tensors."""


@pytest.mark.parametrize("damage", ["pickled_object", "missing_key", "wrong_shape", "garbage", "non_finite"])
def test_damaged_inception_weights_raise_integrity_error(tmp_path, inception, damage):
    state = {k: v for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "inception.pth"
    if damage == "pickled_object":
        torch.save({"fc.weight": _NotATensor()}, path)  # weights_only refuses to build the object
        match = "weights-only"
    elif damage == "missing_key":
        del state["Mixed_6b.branch7x7_2.conv.weight"]
        torch.save(state, path)
        match = "missing key Mixed_6b.branch7x7_2.conv.weight"
    elif damage == "wrong_shape":
        state["fc.weight"] = torch.zeros(1000, INCEPTION_FEATURES)
        torch.save(state, path)
        match = r"fc.weight has shape \(1000, 2048\)"
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint")
        match = "weights-only"
    else:
        state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
        torch.save(state, path)
        match = "non-finite"
    with pytest.raises(IntegrityError, match=match) as info:
        load_inception(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_require_fid_inputs_needs_both_flags(tmp_path, inception_file):
    from PIL import Image

    assert require_fid_inputs(None, None) is None
    with pytest.raises(InputError, match="pass --inception-weights PATH"):
        require_fid_inputs(tmp_path, None)
    with pytest.raises(InputError, match="pass --real DIR"):
        require_fid_inputs(None, inception_file)
    with pytest.raises(InputError, match="at least 2 real images"):
        require_fid_inputs(tmp_path, inception_file)
    with pytest.raises(InputError, match="no such directory"):
        require_fid_inputs(tmp_path / "nope", inception_file)
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    files, weights = require_fid_inputs(tmp_path, inception_file)
    assert [f.name for f in files] == ["0.png", "1.png"] and weights == inception_file
