"""Distillation: the student learns to match the frozen teacher with the recipe's hybrid loss.

Training inputs are noised samples the teacher generated itself (or a dataset the recipe names).
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

from dit_graft.diffusion import Schedule
from dit_graft.errors import DivergenceError, IntegrityError, RecipeError
from dit_graft.families import Family, family_for
from dit_graft.families.dit import freeze_label_dropout
from dit_graft.losses import LOSSES, LossInputs
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


def teacher_pool(teacher: nn.Module, cfg: DistillSection, work_dir: Path, progress=None) -> dict[str, torch.Tensor]:
    """Samples the teacher once (seeded) and caches the pool in the work directory."""
    path = work_dir / "pool.safetensors"
    key = f"{cfg.pool_size}-{cfg.pool_steps}-{cfg.seed}"
    if path.is_file():
        pool = load_file(str(path))
        if (work_dir / "pool.key").read_text() == key:
            return pool
    family = family_for(teacher)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    labels, _ = family.conditions(teacher, cfg.pool_size)
    example = family.example_inputs(teacher, 1, None, "cpu")["hidden_states"]
    images = []
    chunk = 64
    device = next(teacher.parameters()).device
    for start in range(0, cfg.pool_size, chunk):
        y = labels[start : start + chunk]
        noise = torch.randn((len(y), *example.shape[1:]), generator=gen)
        images.append(family.sample(teacher, noise.to(device), y.to(device), steps=cfg.pool_steps).cpu())
        if progress is not None:
            progress(min(start + chunk, cfg.pool_size), cfg.pool_size)
    pool = {"images": torch.cat(images), "labels": labels}
    tmp = work_dir / "pool.tmp.safetensors"
    save_file(pool, str(tmp))
    os.replace(tmp, path)
    (work_dir / "pool.key").write_text(key)
    return pool


def dataset_pool(name: str | None) -> dict[str, torch.Tensor]:
    if name != "digits":
        raise RecipeError(f"distill.dataset: unknown dataset {name!r} (known: digits)")
    from dit_graft.data.digits import load_digits_split

    split = load_digits_split("train")
    return {"images": split.images, "labels": split.labels}


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
        self.outputs.append(out[0] if isinstance(out, tuple) else out)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
) -> DistillResult:
    """Trains `student` in place against the frozen `teacher`; returns the loss log."""
    family: Family = family_for(teacher)
    work_dir.mkdir(parents=True, exist_ok=True)
    # accelerate keeps one process-wide state; a library may run several distillations with different
    # precisions in one process (tests, sweeps), so start each from a clean state.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    student = student.to(accelerator.device)
    freeze_label_dropout(student.train())
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    student, opt, sched = accelerator.prepare(student, opt, sched)

    pool = teacher_pool(teacher, cfg, work_dir, progress) if cfg.data == "teacher" else dataset_pool(cfg.dataset)
    images, labels = pool["images"], pool["labels"]
    _, null = family.conditions(teacher, 1)
    schedule = Schedule.linear()
    gen = torch.Generator().manual_seed(cfg.seed)
    result = DistillResult()
    start = 0
    if resume and (ckpt := latest_checkpoint(work_dir)) is not None:
        start = load_checkpoint(ckpt, accelerator.unwrap_model(student), opt, sched, gen, result)
        result.resumed_from = start
    weights = {k: w for k, w in cfg.losses.model_dump().items() if w > 0}
    want_features = "feature_mse" in weights
    s_hooks = _BlockOutputs(family.blocks(accelerator.unwrap_model(student))) if want_features else None
    t_hooks = _BlockOutputs(family.blocks(teacher)) if want_features else None
    bad = 0
    try:
        for step in range(start, cfg.steps):
            opt.zero_grad(set_to_none=True)
            terms_sum: dict[str, float] = {}
            finite = True
            for _ in range(cfg.grad_accum):
                idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
                x0, y = images[idx], labels[idx].clone()
                y[torch.rand(cfg.batch_size, generator=gen) < cfg.null_class_prob] = null
                t = torch.randint(0, schedule.num_steps, (cfg.batch_size,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                xt = schedule.q_sample(x0, t, noise)
                xt, t, y, noise = (a.to(accelerator.device) for a in (xt, t, y, noise))
                with torch.no_grad():
                    t_out = family.forward(teacher, xt, t, y)
                with accelerator.autocast():
                    s_out = family.forward(student, xt, t, y)
                batch = LossInputs(
                    s_out, t_out, noise, s_hooks.take() if s_hooks else [], t_hooks.take() if t_hooks else []
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
        for k in keys:
            if k not in ("step", "lr"):
                ax.plot(steps, [r.get(k, float("nan")) for r in log], label=k)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png")
        plt.close(fig)
