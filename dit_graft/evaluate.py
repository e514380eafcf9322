"""`dit-graft eval`: sample a model of any family, measure its fidelity to a teacher and its quality where one applies.

Every family: samples come from seeded noise and evenly spread conditions (DiT: class i % classes; PixArt, FLUX:
caption i % K of `--conditions FILE` or the seeded synthetic set), so a student and its teacher are compared sample
by sample from the same noise and condition (MSE, PSNR) and timed side by side in one run (latency ratio).

The digits metrics apply only to digits-shaped models (`is_digits_model`: pixel-space 1×16×16 samples of a
10-class model). FD is computed in the digits classifier's 32-d feature space against n held-out real images; the
floor is FD between n real train images and the same n held-out images, so both share the small-sample bias of n.
For any other model they are None, never a number.

Real-dataset FID (`FIDReference`) needs the samples as RGB images: pixel-space samples as they are (gray to three
channels), latents decoded by a VAE; latents without a VAE are refused before any sampling.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dit_graft.errors import InputError, IntegrityError
from dit_graft.families import family_for
from dit_graft.metrics import (
    IMAGE_SIZE,
    classify,
    frechet_distance,
    inception_features,
    load_classifier,
    load_inception,
    mse,
    psnr,
    real_subsets,
    to_uint8_rgb,
)
from dit_graft.model.conditions import Conditions, conditions_to, take_rows

DIGITS_CLASSES = 10


@dataclass
class Samples:
    """A model's samples (pixels in [-1, 1], or latents), their labels and the sampling wall time.

    `labels` are class labels, or caption indices for text families; `view` is what the grid shows (images in
    [-1, 1], 1 or 3 channels), set by `evaluate`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    seconds: float
    view: torch.Tensor | None = None


def eval_conditions(model: nn.Module, n: int, source: str | Path | None = None) -> tuple[Conditions, torch.Tensor]:
    """n evenly spread conditions from the family and their labels (class, or caption index i % K)."""
    family = family_for(model)
    try:
        cond = family.conditions(model, n, None if source is None else str(source))
    except ValueError as e:  # the class-conditional DiT family takes no embeddings file
        raise InputError(f"--conditions: {str(e).removeprefix('distill.conditions: ')}") from None
    if "class_labels" in cond:
        return cond, cond["class_labels"]
    embeds = cond["prompt_embeds"]  # rows cycle through the K captions: row K is the first to repeat row 0
    captions = next((i for i in range(1, n) if torch.equal(embeds[i], embeds[0])), n)
    return cond, torch.arange(n) % captions


def latent_size(model: nn.Module, pixels: int | None) -> int | None:
    """`--resolution` in image pixels → the model's sample size (None: the model's own)."""
    if pixels is None:
        return None
    family = family_for(model)
    scale = family.vae_scale(model)
    if pixels <= 0 or pixels % scale:
        raise InputError(f"--resolution {pixels}: not a positive multiple of the VAE factor {scale}")
    size, patch = pixels // scale, getattr(model.config, "patch_size", None) or 1
    if size % patch:
        raise InputError(f"--resolution {pixels}: {size} latent pixels are not a multiple of the patch size {patch}")
    try:
        family.latent_shape(model, size)
    except ValueError as e:
        raise InputError(f"--resolution {pixels}: {e}") from None
    return size


def sample(
    model: nn.Module,
    n: int,
    steps: int,
    cfg: float,
    seed: int = 0,
    batch: int = 100,
    conditions: str | Path | None = None,
    resolution: int | None = None,
) -> Samples:
    """n samples with the family's sampler from noise seeded by `seed`; `resolution` is the latent size.

    One untimed single-step batch runs first so that the time excludes one-off costs (allocation, kernel builds).
    """
    family = family_for(model)
    cond, labels = eval_conditions(model, n, conditions)
    null = family.null_conditions(model, None if conditions is None else str(conditions))
    shape = family.latent_shape(model, resolution)
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    param = next(model.parameters())

    def run(rows: slice, steps: int) -> torch.Tensor:
        c = conditions_to(take_rows(cond, rows), param.device)
        x = noise[rows].to(param.device, param.dtype)
        return family.sample(model, x, c, steps=steps, cfg=cfg, null=null).float().cpu()

    run(slice(0, min(batch, n)), 1)
    t0 = time.perf_counter()
    out = [run(slice(i, i + batch), steps) for i in range(0, n, batch)]
    return Samples(torch.cat(out), labels, time.perf_counter() - t0)


def is_digits_model(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether the digits classifier can judge the samples: pixel-space (1, 16, 16) images of a 10-class model."""
    family = family_for(model)
    return (
        family.num_classes(model) == DIGITS_CLASSES
        and family.vae_scale(model) == 1
        and tuple(shape) == (1, IMAGE_SIZE, IMAGE_SIZE)
    )


def quality(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """FD to held-out digits, its real-vs-real floor at the same count, and class accuracy; (N, 1, 16, 16) images."""
    classifier = load_classifier()
    n = min(len(images), 359)
    train, heldout = real_subsets(n, seed)
    f_gen, pred = classify(images, classifier)
    f_train, _ = classify(train, classifier)
    f_held, _ = classify(heldout, classifier)
    fd = frechet_distance(f_gen[:n], f_held)
    floor = frechet_distance(f_train, f_held)
    return {"fd": fd, "fd_floor": floor, "fd_ratio": fd / floor, "accuracy": (pred == labels).float().mean().item()}


def vae_dir(path: Path) -> Path | None:
    """The VAE directory of a pipeline directory (its vae/) or a VAE model directory; None if it has none."""
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    config = path / "config.json"
    if config.is_file() and '"Autoencoder' in config.read_text():
        return path
    return None


def load_vae(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """A diffusers VAE (AutoencoderKL and kin) from a local directory, read from safetensors only."""
    from dit_graft.loading import model_class, read_config

    directory = vae_dir(path)
    if directory is None:
        raise InputError(f"--vae {path}: neither a diffusers VAE directory nor a pipeline directory with vae/")
    cls = model_class(read_config(directory)["_class_name"])
    try:
        vae = cls.from_pretrained(directory, use_safetensors=True, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for missing or malformed files
        raise IntegrityError(f"{directory}: could not load the VAE ({str(e).splitlines()[0]})") from None
    return vae.to(device).eval().requires_grad_(False)


@dataclass
class Decoder:
    """How samples become pictures: pixel-space samples are images, latents go through a VAE or stay latents."""

    kind: Literal["pixels", "vae", "latents"]
    vae: nn.Module | None = None
    source: str | None = None
    batch: int = 8

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples → images in [-1, 1] (1 or 3 channels); latents without a VAE raise InputError."""
        if self.kind == "pixels":
            return x.clamp(-1, 1)
        if self.kind == "latents":
            raise InputError("latent samples need a VAE to become images: pass --vae DIR")
        cfg, param = self.vae.config, next(self.vae.parameters())
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        out = []
        for z in x.split(self.batch):
            z = z.to(param.device, param.dtype)
            if mean is not None and std is not None:
                m, s = (torch.tensor(v, device=z.device, dtype=z.dtype).view(1, -1, 1, 1) for v in (mean, std))
                z = z * s / cfg.scaling_factor + m
            else:
                z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
            out.append(self.vae.decode(z).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def describe(self) -> str:
        if self.kind == "pixels":
            return "pixel-space samples, shown as they are"
        if self.kind == "vae":
            return f"latents decoded to images by the VAE at {self.source}"
        return (
            "NOT images: the first 3 latent channels of each sample, each channel min-max normalised over the shown "
            "samples (no VAE: pass --vae DIR, or evaluate a pipeline directory that has vae/)"
        )


def decoder_for(model: nn.Module, shape: tuple[int, ...], vae: nn.Module | None = None, source: str | None = None):
    """The Decoder for `model`'s samples of `shape`: pixel space if the family says so, else the VAE when given."""
    channels = shape[0]
    if family_for(model).vae_scale(model) == 1 and channels in (1, 3):
        if vae is not None:
            raise InputError("--vae: this model samples in pixel space; a VAE does not apply")
        return Decoder("pixels")
    if vae is None:
        return Decoder("latents")
    latent_channels = getattr(vae.config, "latent_channels", None)
    if latent_channels != channels:
        raise InputError(f"VAE {source}: {latent_channels} latent channels, the model's samples have {channels}")
    return Decoder("vae", vae, source)


def latent_view(*sets: torch.Tensor) -> list[torch.Tensor]:
    """Latents → displayable (N, 1 or 3, H, W) in [-1, 1]: the first 3 channels, min-max normalised over all sets."""
    c = 3 if sets[0].shape[1] >= 3 else 1
    both = torch.cat([s[:, :c].float() for s in sets])
    lo, hi = both.amin(dim=(0, 2, 3), keepdim=True), both.amax(dim=(0, 2, 3), keepdim=True)
    return [((s[:, :c].float() - lo) / (hi - lo).clamp_min(1e-12)) * 2 - 1 for s in sets]


@dataclass
class FIDReference:
    """Real images and the FID Inception weights to compare samples with; the network loads on `load()`."""

    real: list[Path]
    weights: Path
    batch: int = 16
    device: str | torch.device = "cpu"
    inception: nn.Module | None = field(default=None, repr=False)
    real_features: torch.Tensor | None = field(default=None, repr=False)

    def load(self) -> None:
        if self.inception is None:
            self.inception = load_inception(self.weights).to(self.device)

    def fid(self, images: torch.Tensor) -> float:
        """FID of images in [-1, 1] (N, 1 or 3, H, W) against the real images (their features computed once)."""
        self.load()
        if self.real_features is None:
            self.real_features = inception_features(self.real, self.inception, self.batch)
        return frechet_distance(
            inception_features(to_uint8_rgb(images), self.inception, self.batch), self.real_features
        )


def check_comparable(model: nn.Module, teacher: nn.Module, n: int, conditions, resolution: int | None) -> None:
    """Refuses a teacher whose samples cannot be compared one to one with the model's (InputError)."""
    fm, ft = family_for(model), family_for(teacher)
    if fm.name != ft.name:
        raise InputError(f"--teacher is a {ft.name} model and MODEL a {fm.name} model; compare models of one family")
    sm, st = fm.latent_shape(model, resolution), ft.latent_shape(teacher, resolution)
    if tuple(sm) != tuple(st):
        raise InputError(f"--teacher samples have shape {tuple(st)}, the model's {tuple(sm)}")
    cm, ct = eval_conditions(model, n, conditions)[0], eval_conditions(teacher, n, conditions)[0]
    same = cm.keys() == ct.keys() and all(cm[k].shape == ct[k].shape and torch.equal(cm[k], ct[k]) for k in cm)
    if not same:
        raise InputError("--teacher takes other conditions than the model (class count, caption width or guidance)")


def compile_models(backend: str, *models: nn.Module | None) -> None:
    """torch.compile(fullgraph=True) on every transformer block, in place (regional compilation, as diffusers'
    `compile_repeated_blocks`): identical blocks share one graph, and model-level hooks that read the token grid
    off the inputs' values (FLUX's img_ids) stay eager, outside the graphs."""
    for m in models:
        if m is not None:
            for block in family_for(m).blocks(m):
                block.compile(fullgraph=True, backend=backend)


def evaluate(
    model: nn.Module,
    teacher: nn.Module | None,
    samples: int,
    steps: int,
    cfg: float,
    seed: int = 0,
    *,
    conditions: str | Path | None = None,
    resolution: int | None = None,
    vae: nn.Module | None = None,
    vae_source: str | None = None,
    fid: FIDReference | None = None,
    batch: int = 100,
    compile: str | None = None,
) -> tuple[dict[str, Any], Samples, Samples | None]:
    """All eval numbers for `model` (and its fidelity to `teacher`), plus the samples with their grid views.

    Everything that can be checked (teacher, conditions, VAE, FID inputs and weights) is checked before sampling.
    `resolution` is the latent size (see `latent_size`). Metrics that do not apply are None.
    """
    family = family_for(model)
    shape = tuple(family.latent_shape(model, resolution))
    decoder = decoder_for(model, shape, vae, vae_source)
    eval_conditions(model, samples, conditions)
    if teacher is not None:
        check_comparable(model, teacher, samples, conditions, resolution)
    if fid is not None:
        if decoder.kind == "latents":
            raise InputError(
                f"--real: FID needs images, and the {family.name} model samples latents {shape}: pass --vae DIR "
                "(a diffusers VAE or a pipeline directory with vae/)"
            )
        if samples < 2:
            raise InputError(f"FID needs at least 2 samples, got {samples}")
        fid.load()
    digits = is_digits_model(model, shape)
    notes = []

    if compile is not None:  # both compiled alike, so latency_ratio compares compiled student with compiled teacher
        compile_models(compile, model, teacher)
        notes.append(
            f"blocks compiled in place (torch.compile, fullgraph=True, backend={compile!r}); seconds exclude compiling"
            " (the untimed warm-up batch), except a recompile for a last, smaller batch (samples a multiple of batch)"
        )
    s = sample(model, samples, steps, cfg, seed, batch, conditions, resolution)
    t = sample(teacher, samples, steps, cfg, seed, batch, conditions, resolution) if teacher is not None else None
    report: dict[str, Any] = {
        "family": family.name,
        "samples": samples,
        "steps": steps,
        "cfg": cfg,
        "seed": seed,
        "sample_shape": list(shape),
        "conditions": _describe_conditions(model, conditions),
        "digits_metrics": digits,
        "fd": None,
        "fd_floor": None,
        "fd_ratio": None,
        "accuracy": None,
        "fid": None,
        "fid_real_images": None,
        "seconds": s.seconds,
        "teacher_fd": None,
        "teacher_accuracy": None,
        "teacher_fid": None,
        "psnr_to_teacher": None,
        "mse_to_teacher": None,
        "fidelity_space": None,
        "teacher_seconds": None,
        "latency_ratio": None,
        "grid": decoder.describe(),
        "compiled": compile,
    }
    if family.objective == "flow_velocity" and cfg != 1.0:
        notes.append(f"cfg {cfg} has no effect: {family.name} is guidance-distilled (no classifier-free guidance)")
    if digits:
        report.update(quality(s.images, s.labels, seed))
        if t is not None:
            tq = quality(t.images, t.labels, seed)
            report.update({"teacher_fd": tq["fd"], "teacher_accuracy": tq["accuracy"]})
    else:
        notes.append(
            f"fd, fd_floor, accuracy: not applicable (the digits metrics need pixel-space 1×16×16 samples of a "
            f"10-class model; these are {family.name} samples of shape {shape})"
        )

    images = [decoder.decode(x.images) for x in (s, t) if x is not None] if decoder.kind != "latents" else None
    views = images if images is not None else latent_view(*(x.images for x in (s, t) if x is not None))
    s.view = views[0]
    if t is not None:
        t.view = views[1]
        if images is not None:
            a, b, space, peak = images[0], images[1], "images", 2.0
        else:
            a, b, space = s.images, t.images, "latents"
            peak = (t.images.max() - t.images.min()).item() or 1.0
        err = mse(a, b)
        report.update(
            {
                "psnr_to_teacher": psnr(a, b, data_range=peak),
                "mse_to_teacher": err,
                "fidelity_space": space,
                "teacher_seconds": t.seconds,
                "latency_ratio": s.seconds / t.seconds,
            }
        )
        if space == "latents":
            notes.append(
                f"psnr_to_teacher, mse_to_teacher: in latent space (no VAE); PSNR's peak is the teacher samples' "
                f"value range, {peak:.4g}"
            )
    if fid is not None:
        report["fid"] = fid.fid(images[0])
        report["fid_real_images"] = len(fid.real)
        if t is not None:
            report["teacher_fid"] = fid.fid(images[1])
        notes.append(
            f"fid: {samples} samples against {len(fid.real)} real images; FID is biased upward at small counts, "
            "so compare only runs with the same counts"
        )
    report["notes"] = notes
    return report, s, t


def _describe_conditions(model: nn.Module, source) -> str:
    if source is not None:
        return str(source)
    return "class labels" if "class_labels" in eval_conditions(model, 1, None)[0] else "synthetic captions (seeded)"


def _displayable(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] → (N, 3, H, W); other channel counts show their first 3 channels, normalised."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] == 3:
        return images
    return latent_view(images)[0].expand(-1, 3, -1, -1)


def sample_grid(
    student: Samples, teacher: Samples | None, per_class: int = 8, classes: int = 10, pad: int = 1, cell: int = 128
) -> np.ndarray:
    """A uint8 RGB grid: one row per label (class or caption); teacher columns left of student columns when given.

    Shows each Samples' `view` (else its images); cells larger than `cell` pixels are downscaled to it.
    """
    labels = sorted(set(student.labels.tolist()))[:classes]
    cols = min(per_class, max(int((student.labels == c).sum()) for c in labels))

    def block(s: Samples) -> np.ndarray:
        imgs = _displayable((s.view if s.view is not None else s.images).float())
        if max(imgs.shape[-2:]) > cell:
            imgs = F.interpolate(imgs, size=(cell, cell), mode="area")
        h, w = imgs.shape[-2:]
        canvas = torch.full((3, len(labels) * (h + pad), cols * (w + pad)), -0.6)  # grey gutters between cells
        for r, c in enumerate(labels):
            for j, img in enumerate(imgs[s.labels == c][:cols]):
                canvas[:, r * (h + pad) : r * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = img
        return ((canvas.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()

    right = block(student)
    if teacher is None:
        return right
    return np.concatenate([block(teacher), np.full((right.shape[0], 4, 3), 255, np.uint8), right], axis=1)


def save_grid(grid: np.ndarray, path: Path, scale: int | None = None) -> None:
    """Saves a uint8 grid as a PNG, upscaled with nearest neighbours (×3 for small grids) so pixels stay visible."""
    from PIL import Image

    if scale is None:
        scale = 3 if max(grid.shape[:2]) <= 400 else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(report: dict[str, Any], grid: np.ndarray, out: Path) -> None:
    """Writes report.json, report.md (metrics table, notes) and samples.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_grid(grid, out / "samples.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in report.items() if k not in ("notes", "grid"))
    notes = "\n".join(f"- {n}" for n in [f"samples.png: {report.get('grid')}", *report.get("notes", [])])
    side = "teacher (left) | model (right), " if report.get("teacher") else ""
    (out / "report.md").write_text(
        f"# dit-graft eval\n\n| metric | value |\n|---|---|\n{rows}\n\n{notes}\n\n"
        f"![samples: {side}one row per class or caption](samples.png)\n"
    )
