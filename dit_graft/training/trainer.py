"""The one training loop both stages run through.

A stage (`dit_graft.training.stages`) supplies its loss step, its clipping groups and its
hyperparameters; the `Trainer` supplies everything else, the same for both:

- data: one seeded global batch per micro-step (`distill.batch_size` or `activation.batch_size` rows),
  this rank's slice of it (`dit_graft.training.data`);
- precision: accelerate's autocast for `mixed_precision`; with a non-float32 `frozen_dtype` and no
  mixed precision, autocast in the frozen dtype (trainable weights stay float32);
- processes: gradients averaged over the ranks (`ddp`: one all-reduce per dtype after backward;
  `fsdp`: FSDP2's reduce-scatter), so a step depends on the global batch and the seed only;
- the non-finite guard: a step whose loss (on any rank) or gradient norm is not finite is skipped on
  every rank; `max_bad_steps` consecutive skips (or a skip at the last step) end the run with exit 4;
- checkpoints every `checkpoint_every` steps and at the end of the stage, written atomically by the
  main process (`checkpoints/<stage>/step-N`: trainable weights, optimizer state keyed by parameter
  name, scheduler, data generator, log), so `--resume` continues with any process count and an
  interrupted run ends with the weights of an uninterrupted one;
- logging (a row every `log_every` steps, averaged over the ranks) and progress (main process only).
"""

from __future__ import annotations

import contextlib
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

from dit_graft.errors import DivergenceError, IntegrityError
from dit_graft.families import family_for
from dit_graft.recipe import DistillSection
from dit_graft.training import dist
from dit_graft.training.data import local_rows, training_batch

CKPT_PREFIX = "step-"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Fault injection for the resume tests: "step:N" or "checkpoint:N" sends SIGKILL to this process right
# after optimizer step N, or halfway through writing checkpoint N; "step:N@R" kills rank R only.
KILL_ENV = "DIT_GRAFT_TEST_KILL"


def maybe_killed(where: str, step: int) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, rank = spec.partition("@")
    if point == f"{where}:{step}" and (not rank or int(rank) == dist.current().rank):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TrainResult:
    """The loss log and counters of a stage."""

    log: list[dict] = field(default_factory=list)
    steps: int = 0
    skipped: int = 0
    resumed_from: int | None = None


def lr_lambda(steps: int, warmup: int):
    """Linear warmup, then cosine decay to 10% of the peak."""
    total = max(steps, 1)
    return lambda s: min(1.0, (s + 1) / max(warmup, 1)) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total) / total)))


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = sorted(p for p in root.glob(f"{CKPT_PREFIX}*") if (p / "state.json").is_file())
    return ckpts[-1] if ckpts else None


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


class Trainer:
    """Runs one stage on `model` (the student as trained: plain, or sharded with FSDP2) against the teacher."""

    def __init__(
        self,
        teacher: nn.Module,
        model: nn.Module,
        params: list[nn.Parameter],
        cfg: DistillSection,
        work_dir: Path | None = None,
        progress=None,
        sharded: bool = False,
    ) -> None:
        self.teacher, self.model, self.params, self.cfg = teacher, model, params, cfg
        self.work_dir, self.progress, self.sharded = work_dir, progress, sharded
        self.procs = dist.current()
        # accelerate keeps one process-wide state; a library may run several trainings with different
        # precisions in one process (tests, sweeps), so start each from a clean state.
        AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = [names[id(p)] for p in params]

    def autocast(self):
        if self.cfg.mixed_precision != "no":
            return self.accelerator.autocast()
        frozen = DTYPES[self.cfg.frozen_dtype]
        if frozen != torch.float32:
            return torch.autocast(self.accelerator.device.type, dtype=frozen)
        return contextlib.nullcontext()

    # checkpoints ---------------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights, full (gathered from the shards under FSDP), on the CPU."""
        return {n: _full(p.detach()).cpu().contiguous() for n, p in zip(self.names, self.params, strict=True)}

    def _optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """The optimizer state keyed by parameter name (independent of the process count)."""
        state = opt.state_dict()
        by_index = dict(enumerate(self.names))
        return {
            "state": {
                by_index[i]: {k: _full(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                for i, s in state["state"].items()
            },
            "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in state["param_groups"]],
        }

    def _load_optimizer_state(self, opt: torch.optim.Optimizer, saved: dict) -> None:
        index = {n: i for i, n in enumerate(self.names)}
        state = {}
        for name, s in saved["state"].items():
            p = self.params[index[name]]
            state[index[name]] = {k: self._like(p, v) if k != "step" else v for k, v in s.items()}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
        opt.load_state_dict({"state": state, "param_groups": groups})

    @staticmethod
    def _like(p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """`full` laid out like `p` (this rank's shard under FSDP)."""
        if _is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements)
        return full.to(p.device)

    def save(
        self, root: Path, step: int, opt, sched, gen: torch.Generator, result: TrainResult, bad: int, stage=None
    ) -> None:
        """Writes root/step-N atomically (main process) and keeps the newest two."""
        weights, optim = self._trainable_state(), self._optimizer_state(opt)
        error = None
        if self.procs.main:
            try:
                root.mkdir(parents=True, exist_ok=True)
                final = root / f"{CKPT_PREFIX}{step:08d}"
                tmp = root / f".tmp-{CKPT_PREFIX}{step:08d}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                save_file(weights, str(tmp / "student.safetensors"))
                maybe_killed("checkpoint", step)
                trainer = {"optimizer": optim, "scheduler": sched.state_dict(), "generator": gen.get_state()}
                torch.save(trainer, tmp / "trainer.pt")
                meta = {"step": step, "skipped": result.skipped, "bad": bad, "log": result.log}
                if stage is not None and hasattr(stage, "state"):
                    meta["stage"] = stage.state()
                (tmp / "state.json").write_text(json.dumps(meta))
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
                for old in sorted(p for p in root.glob(f"{CKPT_PREFIX}*"))[:-2]:
                    shutil.rmtree(old, ignore_errors=True)
            except Exception as e:  # noqa: BLE001 - reported to every rank by agree()
                error = e
        dist.agree(error)

    def load(self, ckpt: Path, opt, sched, gen: torch.Generator, result: TrainResult, stage=None) -> tuple[int, int]:
        try:
            weights = load_file(str(ckpt / "student.safetensors"))
            trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
            meta = json.loads((ckpt / "state.json").read_text())
            missing = sorted(set(self.names) - set(weights))
            if missing:
                raise ValueError(f"no weights for {missing[0]} (trained with another distill.trainable?)")
        except Exception as e:  # noqa: BLE001 - any unreadable part makes the checkpoint unusable
            raise IntegrityError(f"{ckpt}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                w = weights[name]
                if tuple(w.shape) != tuple(p.shape):
                    raise IntegrityError(f"{ckpt}: {name} has shape {tuple(w.shape)}, the student {tuple(p.shape)}")
                p.copy_(self._like(p, w))
        self._load_optimizer_state(opt, trainer["optimizer"])
        sched.load_state_dict(trainer["scheduler"])
        gen.set_state(trainer["generator"])
        result.log, result.skipped = meta["log"], meta["skipped"]
        if stage is not None and "stage" in meta:
            stage.load_state(meta["stage"])
        return meta["step"], meta.get("bad", 0)

    # the loop ------------------------------------------------------------------------------------

    def run(self, stage, pool: dict[str, torch.Tensor], resume: bool = False) -> TrainResult:
        """Trains `stage` for its steps (continuing from its latest checkpoint with `resume`)."""
        cfg, device = self.cfg, self.accelerator.device
        family = family_for(self.teacher)
        rows = local_rows(stage.batch_size, self.procs)
        opt = torch.optim.AdamW(self.params, lr=stage.lr, weight_decay=stage.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage.steps, stage.warmup))
        opt = self.accelerator.prepare_optimizer(opt)
        null = family.null_conditions(self.teacher, cfg.conditions)
        gen = torch.Generator().manual_seed(stage.seed)
        probe = training_batch(
            self.teacher, pool, null, 1, 0.0, torch.Generator().manual_seed(stage.seed + 101), device
        )
        result = TrainResult(steps=stage.steps)
        root = self.work_dir / "checkpoints" / stage.name if self.work_dir is not None else None
        start, bad = 0, 0
        if resume and root is not None and (ckpt := latest_checkpoint(root)) is not None:
            start, bad = self.load(ckpt, opt, sched, gen, result, stage)
            result.resumed_from = start
        groups = stage.clip_groups(self.params)
        stage.begin(self.model, probe, self.autocast)
        try:
            for step in range(start, stage.steps):
                bad = self._step(stage, step, opt, sched, gen, pool, null, rows, groups, result, bad)
                if root is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == stage.steps):
                    self.save(root, step + 1, opt, sched, gen, result, bad, stage)
        finally:
            stage.end()
        return result

    def _step(self, stage, step, opt, sched, gen, pool, null, rows, groups, result: TrainResult, bad: int) -> int:
        device, accum = self.accelerator.device, stage.grad_accum
        opt.zero_grad(set_to_none=True)
        stats = torch.zeros(2 + len(stage.terms), dtype=torch.float64)  # non-finite count, loss, terms
        for _ in range(accum):
            batch = training_batch(
                self.teacher, pool, null, stage.batch_size, self.cfg.null_class_prob, gen, device, rows
            )
            loss, terms = stage.loss(self.model, batch, self.autocast)
            # backward even when not finite: under FSDP every rank must join the gradient reduction
            self.accelerator.backward(loss / accum)
            values = [float(loss.detach())] + [float(terms[k].detach()) for k in stage.terms]
            stats += torch.tensor([0.0 if math.isfinite(values[0]) else 1.0] + [v / accum for v in values])
        dist.all_reduce_mean([stats])
        finite = stats[0].item() == 0
        if finite:
            for p in self.params:  # every rank reduces the same tensors; absent gradients count as zero
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if not self.sharded:
                dist.all_reduce_mean([p.grad for p in self.params])
            self.accelerator.unscale_gradients()
            norms = [_full(torch.nn.utils.clip_grad_norm_(g, stage.grad_clip)) for g in groups if g]
            finite = all(bool(torch.isfinite(n)) for n in norms)
        if finite:
            opt.step()
            bad = 0
        else:
            opt.zero_grad(set_to_none=True)
            bad += 1
            result.skipped += 1
            if bad >= self.cfg.max_bad_steps or step == stage.steps - 1:
                hint = "distill.activation.lr" if stage.name == "activation" else "distill.lr"
                raise DivergenceError(
                    f"{stage.name} distillation diverged: {bad} consecutive non-finite losses up to step {step} "
                    f"(lower {hint} or use mixed_precision: no)"
                )
        sched.step()
        maybe_killed("step", step + 1)
        loss, terms = stats[1].item(), dict(zip(stage.terms, stats[2:].tolist(), strict=True))
        if finite and (step % stage.log_every == 0 or step == stage.steps - 1):
            result.log.append({"step": step, "loss": terms.pop("loss", loss), **terms, "lr": sched.get_last_lr()[0]})
        if self.progress is not None and self.procs.main:
            self.progress(step + 1, stage.steps, result.log[-1]["loss"] if result.log else float("nan"))
        return bad
