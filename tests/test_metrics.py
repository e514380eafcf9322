"""Fréchet distance, the committed digits classifier, PSNR/MSE and the Inception-weights check."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

from dit_graft.data.digits import load_digits_split
from dit_graft.errors import InputError, IntegrityError
from dit_graft.metrics import (
    CLASSIFIER_DIR,
    CONFIG_NAME,
    FEATURE_DIM,
    WEIGHTS_NAME,
    class_accuracy,
    classify,
    fd_floor,
    frechet_distance,
    frechet_distance_from_stats,
    load_classifier,
    mse,
    psnr,
    require_inception_weights,
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
