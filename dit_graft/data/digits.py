"""The handwritten digits inside scikit-learn, as a small image-generation dataset.

`load_digits` ships 1797 8x8 grey images with 17 grey levels. We upsample them bilinearly to
`size` x `size`, scale to [-1, 1] and keep a stratified held-out split out of every training run
(teacher, classifier, distillation), so held-out metrics are never computed on seen images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    """Images in [-1, 1] shaped (N, 1, size, size) and int64 labels, for one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def _heldout_mask(labels: np.ndarray) -> np.ndarray:
    """Stratified, seeded held-out mask: the same 20% of each class on every machine."""
    rng = np.random.default_rng(SPLIT_SEED)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        mask[idx[: round(len(idx) * HELDOUT_FRACTION)]] = True
    return mask


def load_digits_split(split: str = "train", size: int = 16) -> DigitsSplit:
    """Returns the `train` or `heldout` split of the scikit-learn digits at `size` x `size`."""
    from sklearn.datasets import load_digits

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    mask = _heldout_mask(labels)
    keep = mask if split == "heldout" else ~mask
    x = torch.from_numpy(bunch.images[keep].astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    return DigitsSplit(images=x.contiguous(), labels=torch.from_numpy(labels[keep]))
