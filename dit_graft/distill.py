"""Distillation: the student learns to match the frozen teacher with the recipe's hybrid loss.

Training inputs are noised samples the teacher generated itself (or a dataset the recipe names); the
family decides the conditions, the noising (DDPM for eps models, flow matching for FLUX) and what the
ground-truth target is, so this loop is the same for every family.
Checkpoints are written atomically (a temporary directory, then a rename) every
`checkpoint_every` steps; `resume=True` continues from the latest complete one with the optimizer,
the LR schedule, the data generator and the step restored, so an interrupted run ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from torch import nn

from dit_graft.errors import DivergenceError, IntegrityError, RecipeError
from dit_graft.families import Family, family_for
from dit_graft.families.base import Conditions, conditions_to, drop_to_null, num_conditions, take_rows
from dit_graft.families.dit import freeze_label_dropout
from dit_graft.losses import LOSSES, LossInputs
from dit_graft.plan import GraftPlan
from dit_graft.recipe import DistillSection

CKPT_PREFIX = "step-"
# Fault injection for the resume tests: "step:N" or "checkpoint:N" sends SIGKILL to this process
# right after optimizer step N, or halfway through writing checkpoint N.
KILL_ENV = "DIT_GRAFT_TEST_KILL"


def _maybe_killed(where: str, step: int) -> None:
    if os.environ.get(KILL_ENV) == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class DistillResult:
    """The loss log and counters of a run."""

    log: list[dict] = field(default_factory=list)
    steps: int = 0
    skipped: int = 0
    resumed_from: int | None = None


COND_PREFIX = "cond."


def pool_key(cfg: DistillSection) -> str:
    """What a cached pool depends on; a different key regenerates it."""
    key = f"{cfg.pool_size}-{cfg.pool_steps}-{cfg.seed}"
    if cfg.conditions is not None or cfg.resolution is not None:
        key += f"-{cfg.conditions}-{cfg.resolution}"
    return key


def pool_conditions(pool: dict[str, torch.Tensor]) -> Conditions:
    """The conditions stored in a pool (keys `cond.NAME`)."""
    return {k[len(COND_PREFIX) :]: v for k, v in pool.items() if k.startswith(COND_PREFIX)}


def teacher_pool(teacher: nn.Module, cfg: DistillSection, work_dir: Path, progress=None) -> dict[str, torch.Tensor]:
    """Samples the teacher once (seeded) and caches the pool in the work directory.

    The pool holds `images` (the teacher's samples, in the family's latent layout) and the conditions each
    was sampled with, as `cond.NAME` tensors.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "pool.safetensors"
    key = pool_key(cfg)
    if path.is_file():
        pool = load_file(str(path))
        if (work_dir / "pool.key").read_text() == key:
            return pool
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
    for start in range(0, cfg.pool_size, chunk):
        c = take_rows(cond, slice(start, start + chunk))
        noise = torch.randn((num_conditions(c), *shape), generator=gen)
        images.append(family.sample(teacher, noise.to(device), conditions_to(c, device), steps=cfg.pool_steps).cpu())
        if progress is not None:
            progress(min(start + chunk, cfg.pool_size), cfg.pool_size)
    pool = {"images": torch.cat(images), **{COND_PREFIX + k: v.contiguous() for k, v in cond.items()}}
    tmp = work_dir / "pool.tmp.safetensors"
    save_file(pool, str(tmp))
    os.replace(tmp, path)
    (work_dir / "pool.key").write_text(key)
    return pool


def latent_resolution(model: nn.Module, pixels: int | None) -> int | None:
    """An image size in pixels → the model's latent size (None stays None: the model's own)."""
    if pixels is None:
        return None
    scale = family_for(model).vae_scale(model)
    if pixels % scale:
        raise RecipeError(f"distill.resolution: {pixels} px is not a multiple of the VAE factor {scale}")
    return pixels // scale


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


def training_batch(
    teacher: nn.Module,
    pool: dict[str, torch.Tensor],
    null: Conditions | None,
    batch_size: int,
    null_prob: float,
    gen: torch.Generator,
    device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditions]:
    """One seeded batch (x_t, t, target, conditions) on `device`: pool rows, null-dropped, noised by the family."""
    images = pool["images"]
    idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
    drop = torch.rand(batch_size, generator=gen) < null_prob
    y = drop_to_null(take_rows(pool_conditions(pool), idx), null, drop)
    xt, t, target = family_for(teacher).noise(teacher, images[idx], gen)
    return xt.to(device), t.to(device), target.to(device), conditions_to(y, device)


def latest_checkpoint(work_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (work_dir / "checkpoints").glob(f"{CKPT_PREFIX}*") if (p / "state.json").is_file())
    return ckpts[-1] if ckpts else None


def save_checkpoint(work_dir: Path, step: int, student, opt, sched, gen: torch.Generator, result: DistillResult):
    """Writes checkpoints/step-N atomically and keeps the newest two."""
    root = work_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(tmp / "student.safetensors"))
    _maybe_killed("checkpoint", step)
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state()},
        tmp / "trainer.pt",
    )
    meta = {"step": step, "skipped": result.skipped, "log": result.log}
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(p for p in root.glob(f"{CKPT_PREFIX}*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, student, opt, sched, gen: torch.Generator, result: DistillResult) -> int:
    try:
        state = load_file(str(ckpt / "student.safetensors"))
        trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        meta = json.loads((ckpt / "state.json").read_text())
    except Exception as e:  # noqa: BLE001 - any unreadable part makes the checkpoint unusable
        raise IntegrityError(f"{ckpt}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    student.load_state_dict(state, strict=True)
    opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    gen.set_state(trainer["generator"])
    result.log, result.skipped = meta["log"], meta["skipped"]
    return meta["step"]


class _BlockOutputs:
    """Forward hooks collecting every block's output tensor."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, args, out):
        # blocks with two streams (FLUX: text, image) return a tuple: their features are both, joined
        self.outputs.append(torch.cat(out, dim=1) if isinstance(out, tuple) else out)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def feature_blocks(teacher: nn.Module, graft_plan: GraftPlan | None) -> list[nn.Module]:
    """The teacher blocks whose outputs the student's blocks (`family.blocks(student)`) match, in order.

    After depth edits, each student block of a block group is matched with the last teacher block of the
    span it stands for in that group (FLUX: the double blocks, then the single blocks).
    """
    family = family_for(teacher)
    if graft_plan is None or not any(e.layer_map is not None for e in graft_plan.edits):
        return family.blocks(teacher)
    from dit_graft.stage1 import block_origins

    origins = block_origins(teacher, graft_plan)
    return [g.blocks(teacher)[last] for g in family.depth_groups for _, last in origins[g.name]]


def lr_lambda(cfg: DistillSection):
    """Linear warmup, then cosine decay to 10% of the peak."""
    total = max(cfg.steps, 1)
    return lambda s: (
        min(1.0, (s + 1) / max(cfg.warmup, 1)) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total) / total)))
    )


def distill(
    teacher: nn.Module,
    student: nn.Module,
    cfg: DistillSection,
    work_dir: Path,
    resume: bool = False,
    progress=None,
    graft_plan: GraftPlan | None = None,
) -> DistillResult:
    """Trains `student` in place against the frozen `teacher`; returns the loss log.

    `graft_plan` (the plan that made the student) is needed by `feature_mse` after depth edits: each
    student block's output is compared with the output of the last teacher block it stands for.
    """
    family: Family = family_for(teacher)
    work_dir.mkdir(parents=True, exist_ok=True)
    # accelerate keeps one process-wide state; a library may run several distillations with different
    # precisions in one process (tests, sweeps), so start each from a clean state.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    # the teacher runs under no_grad; its requires_grad flags are left alone because students deep-copied
    # from it later (sweeps, tests) would inherit frozen parameters
    teacher = teacher.to(accelerator.device).eval()
    student = student.to(accelerator.device)
    freeze_label_dropout(student.train())
    trainable = list(student.requires_grad_(True).parameters())
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    student, opt, sched = accelerator.prepare(student, opt, sched)

    pool = training_pool(teacher, cfg, work_dir, progress)
    null = family.null_conditions(teacher, cfg.conditions)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = DistillResult()
    start = 0
    if resume and (ckpt := latest_checkpoint(work_dir)) is not None:
        start = load_checkpoint(ckpt, accelerator.unwrap_model(student), opt, sched, gen, result)
        result.resumed_from = start
    weights = {k: w for k, w in cfg.losses.model_dump().items() if w > 0}
    want_features = "feature_mse" in weights
    s_hooks = _BlockOutputs(family.blocks(accelerator.unwrap_model(student))) if want_features else None
    t_hooks = _BlockOutputs(feature_blocks(teacher, graft_plan)) if want_features else None
    bad = 0
    try:
        for step in range(start, cfg.steps):
            opt.zero_grad(set_to_none=True)
            terms_sum: dict[str, float] = {}
            finite = True
            for _ in range(cfg.grad_accum):
                xt, t, target, y = training_batch(
                    teacher, pool, null, cfg.batch_size, cfg.null_class_prob, gen, accelerator.device
                )
                with torch.no_grad():
                    t_out = family.forward(teacher, xt, t, y)
                with accelerator.autocast():
                    s_out = family.forward(student, xt, t, y)
                batch = LossInputs(
                    s_out,
                    t_out,
                    target,
                    s_hooks.take() if s_hooks else [],
                    t_hooks.take() if t_hooks else [],
                    student_model=accelerator.unwrap_model(student),
                )
                terms = {k: LOSSES.get(k)(batch) for k in weights}
                loss = sum(weights[k] * v for k, v in terms.items()) / cfg.grad_accum
                if not torch.isfinite(loss):
                    finite = False
                    break
                accelerator.backward(loss)
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v.item() / cfg.grad_accum
            if finite:
                norm = accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
                finite = bool(torch.isfinite(norm))
            if finite:
                opt.step()
                bad = 0
            else:
                opt.zero_grad(set_to_none=True)
                bad += 1
                result.skipped += 1
                if bad >= cfg.max_bad_steps or step == cfg.steps - 1:
                    raise DivergenceError(
                        f"distillation diverged: {bad} consecutive non-finite losses up to step {step} "
                        f"(lr={cfg.lr}; lower distill.lr or use mixed_precision: no)"
                    )
            sched.step()
            _maybe_killed("step", step + 1)
            if finite and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                total = sum(weights[k] * v for k, v in terms_sum.items())
                result.log.append({"step": step, "loss": total, **terms_sum, "lr": sched.get_last_lr()[0]})
            if progress is not None:
                progress(step + 1, cfg.steps, result.log[-1]["loss"] if result.log else float("nan"))
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(work_dir, step + 1, accelerator.unwrap_model(student), opt, sched, gen, result)
    finally:
        for h in (s_hooks, t_hooks):
            if h is not None:
                h.remove()
    result.steps = cfg.steps
    accelerator.unwrap_model(student).eval()
    return result


def write_loss_log(log: list[dict], out_dir: Path) -> None:
    """Writes loss.csv, loss.json and a loss-curve PNG."""
    if not log:
        return
    keys = list(dict.fromkeys(k for row in log for k in row))
    with open(out_dir / "loss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(log)
    (out_dir / "loss.json").write_text(json.dumps(log))
    with contextlib.suppress(ImportError):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        steps = [r["step"] for r in log]
        curves = {k: [r.get(k, float("nan")) for r in log] for k in keys if k not in ("step", "lr")}
        for k, values in curves.items():
            ax.plot(steps, values, label=k)
        if all(v > 0 for values in curves.values() for v in values if not math.isnan(v)):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png")
        plt.close(fig)
