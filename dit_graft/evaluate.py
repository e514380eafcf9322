"""`dit-graft eval`: sample a model, measure quality on the digits, and fidelity to a teacher.

Samples are class-balanced (label i % 10) from seeded noise, so a student and its teacher are compared
image by image from the same initial noise and class. FD is computed in the digits classifier's
32-d feature space against n held-out real images; the floor is FD between n real train images and
the same n held-out images, so both numbers share the small-sample bias of n.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dit_graft.errors import InputError
from dit_graft.families import family_for
from dit_graft.families.base import conditions_to, take_rows
from dit_graft.metrics import IMAGE_SIZE, classify, frechet_distance, load_classifier, mse, psnr, real_subsets


@dataclass
class Samples:
    """Generated images in [-1, 1], their class labels and the sampling wall time."""

    images: torch.Tensor
    labels: torch.Tensor
    seconds: float


def sample(model: nn.Module, n: int, steps: int, cfg: float, seed: int = 0, batch: int = 100) -> Samples:
    """n class-balanced samples with the family's sampler, from noise seeded by `seed`."""
    family = family_for(model)
    cond = family.conditions(model, n)
    shape = family.latent_shape(model)
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    out, t0 = [], time.perf_counter()
    for i in range(0, n, batch):
        c = conditions_to(take_rows(cond, slice(i, i + batch)), device)
        out.append(family.sample(model, noise[i : i + batch].to(device), c, steps=steps, cfg=cfg).cpu())
    labels = cond.get("class_labels", torch.arange(n))  # text families have no class: the sample index
    return Samples(torch.cat(out), labels, time.perf_counter() - t0)


def to_digit_images(images: torch.Tensor) -> torch.Tensor:
    """Model samples → (N, 1, 16, 16) for the digits classifier; other image shapes are not digits."""
    if images.shape[1] != 1:
        raise InputError(
            f"eval: samples have {images.shape[1]} channels; the digits metrics need 1-channel images "
            "(real-dataset FID needs --inception-weights PATH)"
        )
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images


def quality(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """FD to held-out digits, its real-vs-real floor at the same count, and class accuracy."""
    classifier = load_classifier()
    images = to_digit_images(images)
    n = min(len(images), 359)
    train, heldout = real_subsets(n, seed)
    f_gen, pred = classify(images, classifier)
    f_train, _ = classify(train, classifier)
    f_held, _ = classify(heldout, classifier)
    fd = frechet_distance(f_gen[:n], f_held)
    floor = frechet_distance(f_train, f_held)
    return {"fd": fd, "fd_floor": floor, "fd_ratio": fd / floor, "accuracy": (pred == labels).float().mean().item()}


def evaluate(model: nn.Module, teacher: nn.Module | None, samples: int, steps: int, cfg: float, seed: int = 0):
    """All eval numbers for `model` (and its fidelity to `teacher`), plus the samples for the grid."""
    s = sample(model, samples, steps, cfg, seed)
    report: dict[str, Any] = {
        "samples": samples,
        "steps": steps,
        "cfg": cfg,
        "seed": seed,
        **quality(s.images, s.labels, seed),
    }
    report["seconds"] = s.seconds
    t = None
    if teacher is not None:
        t = sample(teacher, samples, steps, cfg, seed)
        tq = quality(t.images, t.labels, seed)
        report.update(
            {
                "teacher_fd": tq["fd"],
                "teacher_accuracy": tq["accuracy"],
                "psnr_to_teacher": psnr(s.images, t.images),
                "mse_to_teacher": mse(s.images, t.images),
                "teacher_seconds": t.seconds,
                "latency_ratio": s.seconds / t.seconds,
            }
        )
    else:
        report.update({"psnr_to_teacher": None, "mse_to_teacher": None, "latency_ratio": None})
    return report, s, t


def sample_grid(
    student: Samples, teacher: Samples | None, per_class: int = 8, classes: int = 10, pad: int = 1
) -> np.ndarray:
    """A uint8 grid: one row per class; teacher columns left of student columns when given."""

    def block(s: Samples) -> np.ndarray:
        h, w = s.images.shape[-2:]
        canvas = torch.full((classes * (h + pad), per_class * (w + pad)), -0.6)  # grey gutters between cells
        for c in range(classes):
            for j, img in enumerate(s.images[s.labels == c][:per_class]):
                canvas[c * (h + pad) : c * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = img[0]
        return ((canvas + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()

    parts = [block(teacher), np.full((block(student).shape[0], 4), 255, np.uint8)] if teacher is not None else []
    return np.concatenate([*parts, block(student)], axis=1)


def save_grid(grid: np.ndarray, path: Path, scale: int = 3) -> None:
    """Saves a uint8 grid as a PNG, upscaled with nearest neighbours so single pixels stay visible."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def write_report(report: dict[str, Any], grid: np.ndarray, out: Path) -> None:
    """Writes report.json, report.md and samples.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_grid(grid, out / "samples.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report.items())
    (out / "report.md").write_text(
        f"# dit-graft eval\n\n| metric | value |\n|---|---|\n{rows}\n\n![samples](samples.png)\n"
    )
