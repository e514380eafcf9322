"""Quality measures for generated digits: Fréchet distance in a small classifier's features, class accuracy, PSNR.

The classifier is a small CNN the project trains itself (scripts/train_classifier.py) on the train split of the
scikit-learn digits and commits under `dit_graft/assets/digits-cnn/`. Its 32-dim penultimate embedding plays the
role Inception-v3's pool features play in FID: small enough that a few hundred images estimate the covariance well.
A Fréchet distance is only comparable between sets of the same size, so `fd_floor(n)` gives the real-vs-real value
(n train images vs n held-out images) to read generated sets of n images against.

Real-dataset FID needs Inception-v3 weights that this package never downloads: callers pass
`--inception-weights PATH` and check it with `require_inception_weights` before any work starts.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dit_graft.errors import InputError, IntegrityError

ASSETS_DIR = Path(__file__).parent / "assets"
CLASSIFIER_DIR = ASSETS_DIR / "digits-cnn"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FEATURE_DIM = 32
IMAGE_SIZE = 16


class DigitsClassifier(nn.Module):
    """A three-conv CNN for (N, 1, 16, 16) digits in [-1, 1]; a 32-dim embedding, then 10 logits."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.embed = nn.Linear(2 * width * (IMAGE_SIZE // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding, taken before its ReLU so no unit is constant zero (a full-rank covariance)."""
        h = F.relu(self.conv1(x))  # (N, w/2, 16, 16)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, w, 8, 8)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # (N, 2w, 4, 4)
        return self.embed(h.flatten(1))  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        return self.head(self.dropout(F.relu(self.features(x))))


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """Loads the committed digits classifier (or the one in `path`) in eval mode; bad files raise IntegrityError."""
    from safetensors.torch import load_file

    root = Path(path) if path is not None else CLASSIFIER_DIR
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise IntegrityError(f"classifier file missing: {p} (rebuild with scripts/train_classifier.py)")
    try:
        config = json.loads(config_path.read_text())
        model = DigitsClassifier(feature_dim=int(config["feature_dim"]), num_classes=int(config["num_classes"]))
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"classifier config unreadable: {config_path}: {type(e).__name__}: {e}") from None
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors raises its own error type for truncated or malformed headers
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IntegrityError(f"classifier weights unreadable: {weights_path}: {msg}") from None
    if not all(torch.isfinite(t).all() for t in state.values()):
        raise IntegrityError(f"classifier weights contain non-finite values: {weights_path}")
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def _default_classifier() -> DigitsClassifier:
    """The committed classifier, loaded once per process."""
    return load_classifier()


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """Rejects anything but a (N, 1, 16, 16) floating batch."""
    if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) tensor in [-1, 1], got {shape}")
    return images.float()


@torch.no_grad()
def classify(
    images: torch.Tensor, classifier: DigitsClassifier | None = None, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (features (N, feature_dim) float32, predicted labels (N,) int64) for images in [-1, 1]."""
    images = _check_images(images)
    model = classifier if classifier is not None else _default_classifier()
    was_training = model.training
    model.eval()
    feats, preds = [], []
    for chunk in images.split(batch):
        f = model.features(chunk)  # (B, feature_dim)
        feats.append(f)
        preds.append(model.head(F.relu(f)).argmax(dim=1))  # (B,)
    model.train(was_training)
    dim = model.head.in_features
    if not feats:
        return torch.empty(0, dim), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(preds)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: DigitsClassifier | None = None) -> float:
    """Fraction of images the classifier assigns to `labels`."""
    _, pred = classify(images, classifier)
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.shape[0] != pred.shape[0] or pred.shape[0] == 0:
        raise ValueError(f"need one label per image and at least one image, got {labels.shape[0]} for {len(pred)}")
    return (pred == labels.to(pred.device)).double().mean().item()


def _as_float64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A (N, D) float64 numpy copy."""
    a = x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {a.shape}")
    return a


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix; rounding-negative eigenvalues count as zero."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b), in float64."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    # tr((A B)^1/2) = tr((A^1/2 B A^1/2)^1/2): the inner matrix is symmetric PSD, so eigh is exact and stable
    # where sqrtm of the non-symmetric product A B can return complex noise on near-singular covariances.
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_cross
    return float(max(fd, 0.0))


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (unbiased covariances, float64)."""
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D)
    return frechet_distance_from_stats(a.mean(0), cov_a, b.mean(0), cov_b)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error over all elements."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.mean((a.double() - b.double()) ** 2).item()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB from the MSE over the whole batch; data_range 2.0 for images in [-1, 1]; inf when equal."""
    err = mse(a, b)
    return math.inf if err == 0 else 10.0 * math.log10(data_range**2 / err)


def real_subsets(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random train and n random held-out real images (seeded): the floor pair and the FD reference set.

    n must be in [2, 359] (the held-out split's size); larger n raises ValueError rather than reusing images.
    """
    from dit_graft.data.digits import load_digits_split

    train, heldout = load_digits_split("train", IMAGE_SIZE), load_digits_split("heldout", IMAGE_SIZE)
    if not 2 <= n <= len(heldout):
        raise ValueError(f"fd_floor needs 2 <= n <= {len(heldout)} (the held-out split's size), got {n}")
    gen = torch.Generator().manual_seed(seed)
    ia = torch.randperm(len(train), generator=gen)[:n]
    ib = torch.randperm(len(heldout), generator=gen)[:n]
    return train.images[ia], heldout.images[ib]


def fd_floor(n: int, seed: int = 0, classifier: DigitsClassifier | None = None) -> float:
    """FD between n random train and n random held-out real images: the floor for generated sets of n images."""
    train, heldout = real_subsets(n, seed)
    return frechet_distance(classify(train, classifier)[0], classify(heldout, classifier)[0])


def require_inception_weights(path: str | Path | None) -> Path:
    """Returns `path` if it names existing Inception-v3 weights for real-dataset FID; otherwise InputError at once."""
    if path is None:
        raise InputError(
            "real-dataset FID needs Inception-v3 weights: pass --inception-weights PATH (path given: None); "
            "nothing is downloaded"
        )
    p = Path(path)
    if not p.exists():
        raise InputError(f"--inception-weights path does not exist: {p}; nothing is downloaded")
    return p
