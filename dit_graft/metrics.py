"""Quality measures for generated digits: Fréchet distance in a small classifier's features, class accuracy, PSNR.

The classifier is a small CNN the project trains itself (scripts/train_classifier.py) on the train split of the
scikit-learn digits and commits under `dit_graft/assets/digits-cnn/`. Its 32-dim penultimate embedding plays the
role Inception-v3's pool features play in FID: small enough that a few hundred images estimate the covariance well.
A Fréchet distance is only comparable between sets of the same size, so `fd_floor(n)` gives the real-vs-real value
(n train images vs n held-out images) to read generated sets of n images against.

Real-dataset FID uses the FID Inception-v3 (the TF "2015-12-05" graph ported to PyTorch, as pytorch-fid,
torch-fidelity and torchmetrics use it): `FIDInceptionV3` has that network's module names, so the common state-dict
file `pt_inception-2015-12-05-6726825d.pth` loads as it is (read with `torch.load(weights_only=True)`, never
unpickled), as does a .safetensors of the same keys. Images go in as uint8 RGB, are resized to 299×299 the way
TensorFlow 1.x resizes (bilinear, no half-pixel offset) and scaled by (x − 128) / 128, and the 2048-d pool features
feed the same float64 Fréchet distance. Nothing is downloaded: callers pass `--inception-weights PATH`, checked by
`require_fid_inputs` before any work starts. The network is defined here, not imported, because every package that
ships it (torch-fidelity, hence torchmetrics' FID; pytorch-fid; clean-fid) imports torchvision, and torch-fidelity
unpickles its weights file (`weights_only=False`).
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
    n_a, n_b, dim = a.shape[0], b.shape[0], a.shape[1]
    if min(n_a, n_b) > dim:
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D)
        return frechet_distance_from_stats(a.mean(0), cov_a, b.mean(0), cov_b)
    # Fewer samples than dimensions (Inception's 2048): the covariances are Xaᵀ Xa / (na − 1) and Xbᵀ Xb / (nb − 1)
    # of the centred features, and the nonzero eigenvalues of (A^½ B A^½) are the squared singular values of
    # Xa Xbᵀ / √((na − 1)(nb − 1)), so tr((A B)^½) is that (na, nb) matrix's nuclear norm: exact, O(na·nb·D).
    xa, xb = a - a.mean(0), b - b.mean(0)  # (na, D), (nb, D)
    scale = math.sqrt((n_a - 1) * (n_b - 1))
    tr_cross = np.linalg.svd(xa @ xb.T / scale, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    fd = diff @ diff + (xa * xa).sum() / (n_a - 1) + (xb * xb).sum() / (n_b - 1) - 2.0 * tr_cross
    return float(max(fd, 0.0))


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


def require_fid_inputs(real: str | Path | None, weights: str | Path | None) -> tuple[list[Path], Path] | None:
    """Checks `--real DIR` and `--inception-weights PATH` together, before any work: None when neither is given.

    Returns the real image files and the weights path; one without the other, a missing path or a folder without
    images raises InputError at once.
    """
    if real is None and weights is None:
        return None
    if real is None:
        raise InputError("--inception-weights is for real-dataset FID: pass --real DIR (a folder of real images) too")
    if weights is None:
        raise InputError(
            "--real needs Inception-v3 weights for FID: pass --inception-weights PATH "
            "(e.g. pt_inception-2015-12-05-6726825d.pth); nothing is downloaded"
        )
    weights = require_inception_weights(weights)
    if not weights.is_file():
        raise InputError(f"--inception-weights {weights}: not a file; nothing is downloaded")
    return real_image_files(real), weights


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048


def real_image_files(folder: str | Path) -> list[Path]:
    """The .png/.jpg/.jpeg files under `folder` (recursively, sorted); InputError if there are fewer than 2."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--real {root}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise InputError(f"--real {root}: FID needs at least 2 real images (.png/.jpg), found {len(files)}")
    return files


def read_rgb(path: Path) -> torch.Tensor:
    """One image file → (3, H, W) uint8 RGB; unreadable files raise InputError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable image ({msg})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W)


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, 1 or 3, H, W) images in [-1, 1] → (N, 3, H, W) uint8, quantised as a PNG of them would be."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    q = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return q.expand(-1, 3, -1, -1) if q.shape[1] == 1 else q


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) floats to size×size as TensorFlow 1.x's resize_bilinear(align_corners=False).

    TF 1.x samples source position i · (in / out) (no half-pixel offset), the resize the FID Inception was fed.
    """

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        frac = (src - lo).to(x.dtype).to(x.device)
        return lo.to(x.device), (lo + 1).clamp(max=n_in - 1).to(x.device), frac

    h0, h1, fh = axis(x.shape[-2])
    x = x[..., h0, :] * (1 - fh)[:, None] + x[..., h1, :] * fh[:, None]  # (N, C, size, W)
    w0, w1, fw = axis(x.shape[-1])
    return x[..., w0] * (1 - fw) + x[..., w1] * fw  # (N, C, size, size)


class _Conv(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3) → ReLU, the Inception unit."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF averages over real pixels only


class _InceptionA(nn.Module):
    """1×1, 5×5 and double-3×3 branches beside an average-pool branch (35×35 grid)."""

    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class _InceptionB(nn.Module):
    """Grid reduction 35 → 17: strided 3×3 and double-3×3 branches beside a max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionC(nn.Module):
    """Factorised 7×7 branches (1×7 and 7×1) beside an average-pool branch (17×17 grid)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = (
            _Conv(cin, c7, 1),
            _Conv(c7, c7, **row),
            _Conv(c7, 192, **col),
        )
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _Conv(c7, c7, **col), _Conv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _Conv(c7, c7, **col), _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(d))
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    """Grid reduction 17 → 8: strided 3×3 and 7×7-then-3×3 branches beside a max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):
    """Expanded 3×3 branches split into 1×3 and 3×1 halves (8×8 grid); the last block pools by max, as TF's graph."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3: uint8 RGB images of any size → (N, 2048) pool features (float32).

    Module names follow the common FID weights file (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`,
    ..., `fc.weight` of 1008 classes); `fc` is kept for the file's sake and not used by FID.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _InceptionA(192, 32), _InceptionA(256, 64), _InceptionA(288, 64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = _InceptionE(1280, max_pool=False), _InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(INCEPTION_FEATURES, 1008)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
        return self.embed(resize_like_tf1(images.to(self.fc.weight.device, self.fc.weight.dtype), INCEPTION_SIZE))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) pixel values in [0, 255] (already resized) → (N, 2048) pool features."""
        x = (x.to(self.fc.weight.device, self.fc.weight.dtype) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3)).float()  # (N, 2048)


def load_inception(path: str | Path) -> FIDInceptionV3:
    """The FID Inception from a local state-dict file (.pth/.pt via weights_only, or .safetensors), every key checked.

    A file that is not a flat dict of tensors, that lacks a key, has an extra one or a wrong shape, or holds
    non-finite values raises IntegrityError naming the file (and the key). BatchNorm's `num_batches_tracked`
    counters are optional.
    """
    from dit_graft.loading import load_state_dict_checked, read_safetensors

    path = Path(path)
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; weights_only refuses code
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise IntegrityError(f"{path}: not a weights-only PyTorch state dict ({msg})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise IntegrityError(f"{path}: expected a flat state dict of tensors (the FID Inception-v3 weights)")
    model = FIDInceptionV3()
    expected = model.state_dict()
    for key in [k for k in expected if k.endswith("num_batches_tracked") and k not in state]:
        state[key] = expected[key]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    load_state_dict_checked(model, state, str(path))
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise IntegrityError(f"{path}: Inception weights contain non-finite values")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def inception_features(images, inception: FIDInceptionV3, batch: int = 16) -> torch.Tensor:
    """(N, 2048) Inception features of uint8 RGB images: a (N, 3, H, W) tensor, or (3, H, W) tensors or image files.

    A sequence is read and resized a batch at a time, so its images may differ in size.
    """
    feats = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        if torch.is_tensor(chunk):
            feats.append(inception(chunk).cpu())
            continue
        chunk = [read_rgb(im) if isinstance(im, Path) else im for im in chunk]
        resized = [resize_like_tf1(im[None].float(), INCEPTION_SIZE) for im in chunk]  # (1, 3, 299, 299) each
        feats.append(inception.embed(torch.cat(resized)).cpu())
    return torch.cat(feats) if feats else torch.empty(0, INCEPTION_FEATURES)
