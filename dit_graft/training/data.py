"""Training data: the teacher-sample pool (or a dataset) and seeded global batches sliced per rank.

The pool is produced once: the main process samples the teacher (seeded) and caches it in the work
directory; the other ranks wait at a barrier and read the cache. A batch is drawn for the whole run
(`distill.batch_size` rows: pool indices, null-condition drops, noise) from one seeded generator that
every rank advances identically, and each rank keeps its contiguous slice, so the data the run sees
depends on the global batch and the seed, never on the process count.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dit_graft.errors import RecipeError
from dit_graft.families import family_for
from dit_graft.families.base import Conditions, conditions_to, drop_to_null, num_conditions, take_rows
from dit_graft.recipe import DistillSection
from dit_graft.training import dist

COND_PREFIX = "cond."
POOL_FILE = "pool.safetensors"


def pool_key(cfg: DistillSection) -> str:
    """What a cached pool depends on; a different key regenerates it."""
    key = f"{cfg.pool_size}-{cfg.pool_steps}-{cfg.seed}"
    if cfg.conditions is not None or cfg.resolution is not None:
        key += f"-{cfg.conditions}-{cfg.resolution}"
    return key


def pool_conditions(pool: dict[str, torch.Tensor]) -> Conditions:
    """The conditions stored in a pool (keys `cond.NAME`)."""
    return {k[len(COND_PREFIX) :]: v for k, v in pool.items() if k.startswith(COND_PREFIX)}


def latent_resolution(model: nn.Module, pixels: int | None) -> int | None:
    """An image size in pixels → the model's latent size (None stays None: the model's own)."""
    if pixels is None:
        return None
    scale = family_for(model).vae_scale(model)
    if pixels % scale:
        raise RecipeError(f"distill.resolution: {pixels} px is not a multiple of the VAE factor {scale}")
    return pixels // scale


def _cached(work_dir: Path, key: str) -> dict[str, torch.Tensor] | None:
    path = work_dir / POOL_FILE
    if path.is_file() and (work_dir / "pool.key").is_file() and (work_dir / "pool.key").read_text() == key:
        return load_file(str(path))
    return None


def _sample_pool(teacher: nn.Module, cfg: DistillSection, progress=None) -> dict[str, torch.Tensor]:
    family = family_for(teacher)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    try:
        cond = family.conditions(teacher, cfg.pool_size, cfg.conditions)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    shape = family.latent_shape(teacher, latent_resolution(teacher, cfg.resolution))
    images = []
    chunk = 64
    device = next(teacher.parameters()).device
    dtype = next(teacher.parameters()).dtype
    for start in range(0, cfg.pool_size, chunk):
        c = take_rows(cond, slice(start, start + chunk))
        noise = torch.randn((num_conditions(c), *shape), generator=gen)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = family.sample(teacher, noise.to(device), conditions_to(c, device), steps=cfg.pool_steps)
        images.append(out.float().cpu())
        if progress is not None:
            progress(min(start + chunk, cfg.pool_size), cfg.pool_size)
    return {"images": torch.cat(images), **{COND_PREFIX + k: v.contiguous() for k, v in cond.items()}}


def teacher_pool(teacher: nn.Module, cfg: DistillSection, work_dir: Path, progress=None) -> dict[str, torch.Tensor]:
    """Samples the teacher once (seeded) and caches the pool in the work directory.

    The pool holds `images` (the teacher's samples, in the family's latent layout) and the conditions each
    was sampled with, as `cond.NAME` tensors. With several processes, the main process samples and writes
    it; the others read it after a barrier.
    """
    key = pool_key(cfg)
    procs = dist.current()
    error = None
    if procs.main:
        try:
            if _cached(work_dir, key) is None:
                pool = _sample_pool(teacher, cfg, progress)
                work_dir.mkdir(parents=True, exist_ok=True)
                tmp = work_dir / "pool.tmp.safetensors"
                save_file(pool, str(tmp))
                os.replace(tmp, work_dir / POOL_FILE)
                (work_dir / "pool.key").write_text(key)
        except Exception as e:  # noqa: BLE001 - reported to every rank by agree()
            error = e
    dist.agree(error)
    return _cached(work_dir, key)


def dataset_pool(name: str | None) -> dict[str, torch.Tensor]:
    if name != "digits":
        raise RecipeError(f"distill.dataset: unknown dataset {name!r} (known: digits)")
    from dit_graft.data.digits import load_digits_split

    split = load_digits_split("train")
    return {"images": split.images, COND_PREFIX + "class_labels": split.labels}


def training_pool(teacher: nn.Module, cfg: DistillSection, work_dir: Path, progress=None) -> dict[str, torch.Tensor]:
    """The images and conditions training batches are drawn from: the teacher's pool or the named dataset."""
    if cfg.data == "teacher":
        return teacher_pool(teacher, cfg, work_dir, progress)
    return dataset_pool(cfg.dataset)


def local_rows(batch_size: int, procs: dist.Procs | None = None) -> slice:
    """This rank's contiguous share of a global batch (the process count must divide it)."""
    procs = procs or dist.current()
    if batch_size % procs.world:
        raise RecipeError(
            f"distill.batch_size: the global batch {batch_size} is not divisible by the {procs.world} processes"
        )
    n = batch_size // procs.world
    return slice(procs.rank * n, (procs.rank + 1) * n)


def training_batch(
    teacher: nn.Module,
    pool: dict[str, torch.Tensor],
    null: Conditions | None,
    batch_size: int,
    null_prob: float,
    gen: torch.Generator,
    device,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditions]:
    """One seeded global batch (x_t, t, target, conditions), this rank's `rows` of it, on `device`.

    The whole global batch is drawn (pool rows, null drops, the family's noising), so `gen` advances the
    same way on every rank; `rows` (default: all) selects what this rank trains on.
    """
    images = pool["images"]
    idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
    drop = torch.rand(batch_size, generator=gen) < null_prob
    y = drop_to_null(take_rows(pool_conditions(pool), idx), null, drop)
    xt, t, target = family_for(teacher).noise(teacher, images[idx], gen)
    if rows is not None:
        xt, t, target, y = xt[rows], t[rows], target[rows], take_rows(y, rows)
    return xt.to(device), t.to(device), target.to(device), conditions_to(y, device)
