"""The conversion pipeline as one library function: teacher → automatic layers → plan → apply → stages → export.

`convert(recipe, out)` is what `dit-graft convert` and the scripts in scripts/ run. Launched with
several processes (`torchrun`, `accelerate launch`), every rank runs it: the teacher pool is made once,
each rank trains on its slice of every global batch, and only the main process writes (work directory,
checkpoints, logs, export); the others wait at barriers.

Memory: the teacher is loaded and the student built in float32 on the host, then the teacher and the
student's frozen weights are cast to `distill.frozen_dtype` (frozen unedited weights are the teacher's own
tensors) and both models move to the device.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_graft.cost import model_cost
from dit_graft.errors import InputError, RecipeError
from dit_graft.families import family_for, param_count
from dit_graft.plan import GraftPlan, apply, plan
from dit_graft.recipe import Recipe
from dit_graft.training import dist
from dit_graft.training.data import training_pool
from dit_graft.training.logs import write_loss_log
from dit_graft.training.scope import (
    Scope,
    cast_frozen,
    checkpoint_blocks,
    merge_lora,
    select,
    share_frozen,
    uncheckpoint_blocks,
    unshare,
)
from dit_graft.training.stages import ActivationStage, EndToEndStage, targets
from dit_graft.training.trainer import Trainer, TrainResult

Progress = Callable[[str], Callable[..., None]]  # description → report(done, total, info=None)


def load_teacher(recipe: Recipe, base_dir: Path | None = None, meta: bool = False, check_out: Path | None = None):
    """Resolves and loads the recipe's teacher: (source, model); with `check_out`, first refuses a bad output path."""
    from dit_graft.loading import load_model, resolve_config, resolve_source

    source = resolve_source(recipe.model.source, base_dir)
    config = resolve_config(recipe.model.config, base_dir) if recipe.model.config else None
    if check_out is not None:
        check_output(check_out, source)
    model = load_model(source, recipe.model.subfolder, meta=meta, num_heads=recipe.model.num_heads, config=config)
    if recipe.model.options:  # the family's runtime options (Wan: flow_shift, guidance_2), recorded in graft.json
        try:
            family_for(model).apply_runtime_options(model, dict(recipe.model.options))
        except ValueError as e:
            raise RecipeError(f"model.options: {e}") from None
    return source, model


def check_family(model: nn.Module) -> None:
    try:
        family_for(model)
    except KeyError as e:
        raise RecipeError(f"model: {e.args[0]}") from None


def check_output(out: Path, source) -> None:
    """Refuses an output path that is the teacher's, is a file, or is a non-empty directory that is no export."""
    if isinstance(source, Path):
        src = source.resolve()
        o = out.resolve()
        if o == src or src in o.parents or o in src.parents:
            raise InputError(f"--out {out}: the output path is the teacher's own path; choose another directory")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "graft.json").is_file():
        raise InputError(f"--out {out}: exists, is not empty and is not a dit-graft export; refusing to overwrite it")


def work_dir_for(out: Path) -> Path:
    """The work directory (pool, checkpoints) of an export directory: a hidden sibling."""
    return out.with_name(f".{out.name}.work")


def choose_layers(teacher: nn.Module, recipe: Recipe, work_dir: Path, progress: Progress | None = None, pool=None):
    """Resolves `layers: {auto: ...}` on the teacher; returns the explicit recipe and the selections."""
    from dit_graft.autoselect import has_auto, resolve

    if not has_auto(recipe):
        return recipe, []
    if pool is None:
        pool = training_pool(teacher, recipe.distill, work_dir, _report(progress, "teacher samples"))
    return resolve(teacher, recipe, pool, _report(progress, "choose layers"))


def _report(progress: Progress | None, description: str):
    if progress is None or not dist.current().main:
        return None
    return progress(description)


@dataclass
class Conversion:
    """What `convert` produced: the student (on the main process; merged, unsharded), its plan and metrics."""

    student: nn.Module | None
    graft_plan: GraftPlan
    recipe: Recipe
    metrics: dict[str, Any] = field(default_factory=dict)
    selections: list = field(default_factory=list)
    out: Path | None = None
    log: list[dict] = field(default_factory=list)


def prepare_student(teacher: nn.Module, student: nn.Module, target_list, cfg) -> tuple[Scope, int]:
    """Trainable scope, shared frozen weights, dtypes and activation checkpointing; (scope, shared elements)."""
    scope = select(teacher, student, target_list, cfg)
    teacher.requires_grad_(False)  # the teacher is frozen; the student shares some of its tensors from here on
    shared = share_frozen(teacher, student)
    cast_frozen(teacher, student, cfg.frozen_dtype)
    if cfg.gradient_checkpointing:
        checkpoint_blocks(student)
    return scope, shared


def convert(
    recipe: Recipe,
    out: Path | None = None,
    *,
    base_dir: Path | None = None,
    teacher: nn.Module | None = None,
    resume: bool = False,
    work_dir: Path | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    pool: dict[str, torch.Tensor] | None = None,
    after_apply: Callable[[nn.Module, GraftPlan], None] | None = None,
) -> Conversion:
    """Converts the recipe's teacher (or `teacher`) into a student, distils it and exports it to `out`.

    Without `out` nothing is exported (the student is returned); `work_dir` defaults to `out`'s hidden
    `.NAME.work` sibling, removed after the export. `progress(description)` returns a report callback;
    `log` receives one-line notes; the teacher's and student's parameters and FLOPs per image
    (`dit_graft.cost.model_cost`) go into the metrics. Sweeps may pass the training `pool` they share between
    conversions, and `after_apply(student, plan)` to change the student before it trains (e.g. re-initialise
    it). Everything the run writes is written by the main process.
    """
    if recipe.model.experts is not None and teacher is None:
        return convert_experts(recipe, out, base_dir=base_dir, resume=resume, progress=progress, log=log)
    t0 = time.perf_counter()
    procs = dist.init()
    say = log if (log is not None and procs.main) else (lambda _msg: None)
    cfg = recipe.distill
    if procs.world > 1 and cfg.batch_size % procs.world:
        raise RecipeError(
            f"distill.batch_size: the global batch {cfg.batch_size} is not divisible by the {procs.world} processes"
        )
    if procs.world > 1 and "activation" in cfg.stages and cfg.activation.batch_size % procs.world:
        raise RecipeError(
            f"distill.activation.batch_size: the global batch {cfg.activation.batch_size} is not divisible by "
            f"the {procs.world} processes"
        )
    if teacher is None:
        _, teacher = load_teacher(recipe, base_dir, meta=False, check_out=out)
    elif out is not None:
        check_output(out, None)
    check_family(teacher)
    if work_dir is None:
        if out is None:
            raise InputError("convert: give an output directory or a work directory")
        work_dir = work_dir_for(out)
    _start_fresh(work_dir, resume, say)

    recipe, selections = choose_layers(teacher, recipe, work_dir, progress, pool)
    graft_plan = _plan(teacher, recipe)
    student = apply(teacher, graft_plan)
    if after_apply is not None:
        after_apply(student, graft_plan)
    before, after = model_cost(teacher), model_cost(student)
    ratio = ""
    if before:
        attn_b, attn_a = sum(before["attention_flops"].values()), sum(after["attention_flops"].values())
        ratio = f"; attention FLOPs ×{attn_a / max(attn_b, 1):.3f}"
    say(
        f"teacher {recipe.model.source}: {param_count(teacher) / 1e6:.2f}M params; "
        f"{sum(len(e.modules) for e in graft_plan.edits)} modules grafted{ratio}"
    )
    for sel in selections:
        say(f"graft.{sel.edit}: {sel.op} on {sel.group} layers {sel.chosen} (least sensitive)")

    target_list = targets(teacher, student, graft_plan)
    scope, shared = prepare_student(teacher, student, target_list, cfg)
    say(
        f"trainable: {cfg.trainable} — {scope.count / 1e6:.3f}M of {param_count(student) / 1e6:.3f}M parameters "
        f"trained; {shared / 1e6:.3f}M shared with the teacher; {procs.world} process(es), {cfg.parallel}"
    )
    dev = dist.device()
    teacher.to(dev).eval()
    student.to(dev)
    family = family_for(teacher)
    metrics: dict[str, Any] = {}
    if pool is None:
        pool = training_pool(teacher, cfg, work_dir, _report(progress, "teacher samples"))
    params = dict(student.named_parameters())
    trained = [params[n] for n in scope.names]

    result = TrainResult()
    if "activation" in cfg.stages and target_list:
        stage1 = ActivationStage(teacher, student, target_list, cfg)
        in_targets = {id(p) for p in stage1.trainable()}
        stage1_params = [p for p in trained if id(p) in in_targets]
        if stage1_params:
            student.eval()
            trainer = Trainer(
                teacher, student, stage1_params, cfg, work_dir, _report(progress, "stage 1 (activations)")
            )
            trainer.run(stage1, pool, resume=resume)
            metrics["stage1_relative_error"] = _reduced_errors(stage1)
        else:
            say("stage 1 skipped: the trainable scope has no parameter in the grafted modules")

    sharded = False
    if "end_to_end" in cfg.stages:
        model = family.prepare_for_training(student.train())
        if cfg.parallel == "fsdp" and procs.distributed:
            model, trained = _shard(teacher, student, scope)
            sharded = True
        stage2 = EndToEndStage(teacher, model, cfg, graft_plan)
        trainer = Trainer(teacher, model, trained, cfg, work_dir, _report(progress, "distill"), sharded=sharded)
        t_train = time.perf_counter()
        result = trainer.run(stage2, pool, resume=resume)
        trained_steps = result.steps - (result.resumed_from or 0)
        if trained_steps:
            seconds = time.perf_counter() - t_train
            metrics["samples_per_second"] = round(trained_steps * cfg.batch_size * cfg.grad_accum / seconds, 2)
    metrics["peak_memory_mb"] = _peak_memory_mb(dev)

    final = _exportable(teacher, student, graft_plan, scope, cfg, sharded)
    metrics = {
        "steps": result.steps,
        "final_loss": round(result.log[-1]["loss"], 6) if result.log else None,
        "skipped_steps": result.skipped,
        **metrics,
        **({"layer_sensitivity": {f"graft.{s.edit}": s.sensitivity for s in selections}} if selections else {}),
        "trainable": cfg.trainable,
        "params_trained": scope.count,
        "params_shared_with_teacher": shared,
        "processes": procs.world,
        "parallel": cfg.parallel,
        "params_teacher": param_count(teacher),
        "params_student": param_count(final) if final is not None else None,
        **({"flops_per_image_teacher": before["flops"], "flops_per_image_student": after["flops"]} if before else {}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if out is not None:
        _write(final, graft_plan, recipe, out, metrics, result.log, work_dir)
    return Conversion(final, graft_plan, recipe, metrics, selections, out, result.log)


def convert_experts(recipe: Recipe, out: Path | None, *, base_dir: Path | None = None, **kwargs) -> Conversion:
    """`model.experts`: every timestep expert (a subfolder of `model.source`) converted by the same recipe.

    The experts are loaded together and their family links them (`link_experts`: each trains on its own noise
    range; teacher samples come from the pair, switching at the boundary); then each is converted into
    OUT/<subfolder> (its own work directory, pool and export), and OUT/experts.json records the subfolders and the
    boundary. Returns the last expert's Conversion, with every expert's metrics under `metrics["experts"]`.
    """
    import json

    experts = recipe.model.experts
    loaded = []
    for sub in experts.subfolders:
        one = recipe.model_copy(deep=True)
        one.model.subfolder, one.model.experts = sub, None
        _, teacher = load_teacher(one, base_dir, check_out=None if out is None else out / sub)
        check_family(teacher)
        loaded.append((sub, one, teacher))
    family = family_for(loaded[0][2])
    try:
        family.link_experts([teacher for *_, teacher in loaded], experts.boundary)
    except ValueError as e:
        raise RecipeError(f"model.experts: {e}") from None
    done, metrics = None, {}
    for sub, one, teacher in loaded:
        done = convert(one, None if out is None else out / sub, base_dir=base_dir, teacher=teacher, **kwargs)
        metrics[sub] = done.metrics
        nn.Module.to(teacher, "cpu")  # off the device while the next expert converts (it joins its pool sampling)
    if out is not None and dist.current().main:
        index = {"subfolders": experts.subfolders, "boundary_ratio": experts.boundary}
        (out / "experts.json").write_text(json.dumps(index, indent=2) + "\n")
    done.metrics = {**done.metrics, "experts": metrics}
    return done


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space (Linux).

    Not getrusage's ru_maxrss: Linux carries a process's peak across fork and exec, so a process started by a
    large parent (a test runner, a launcher) would report the parent's size as its own peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere (macOS reports bytes: close enough)


def _peak_memory_mb(dev: torch.device) -> float:
    """The largest peak over the ranks: CUDA's max_memory_allocated, else the process's peak resident memory."""
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = peak_rss_bytes() / 2**20
    value = torch.tensor([peak], dtype=torch.float64)
    if dist.current().distributed:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return round(float(value), 1)


def _plan(teacher: nn.Module, recipe: Recipe) -> GraftPlan:
    return plan(teacher, recipe)


def _start_fresh(work_dir: Path, resume: bool, say) -> None:
    """Without --resume, the main process removes an old work directory; every rank waits for it."""
    error = None
    if dist.current().main and not resume and work_dir.exists():
        say(f"starting fresh: removing {work_dir} (pass --resume to continue from its checkpoints)")
        try:
            shutil.rmtree(work_dir)
        except OSError as e:
            error = InputError(f"{work_dir}: cannot remove the old work directory ({e.strerror})")
    dist.agree(error)


def _reduced_errors(stage: ActivationStage) -> dict[str, float]:
    """Stage 1's per-target relative errors on the last global batch (summed over the ranks' slices)."""
    if not stage.errors:
        return {}
    names = sorted(stage.errors)
    totals = torch.tensor([v for n in names for v in stage.errors[n]], dtype=torch.float64)
    if dist.current().distributed:
        dist.all_reduce_mean([totals])
    return {n: round(float(totals[2 * i] / max(totals[2 * i + 1], 1e-30)), 6) for i, n in enumerate(names)}


def _shard(teacher: nn.Module, student: nn.Module, scope: Scope):
    """FSDP2: one unit per transformer block, then the root; returns (model, trained parameters after sharding)."""
    from torch.distributed.fsdp import fully_shard

    unshare(teacher, student)  # FSDP replaces the parameters it shards: the student needs its own
    for i, block in enumerate(family_for(student).blocks(student)):
        # DiT's output layer reads block 0's conditioning embedding after the block loop: the first block
        # stays gathered until its backward
        fully_shard(block, reshard_after_forward=i > 0)
    fully_shard(student)
    params = dict(student.named_parameters())
    return student, [params[n] for n in scope.names]


def _exportable(teacher, student, graft_plan, scope: Scope, cfg, sharded: bool) -> nn.Module | None:
    """The trained student as one unsharded float32 module on the CPU with LoRA merged (main process; else None)."""
    if sharded:  # gather every tensor (a collective), rebuild an unsharded student on the main process
        state = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
            for k, v in student.state_dict().items()
        }
        if not dist.current().main:
            return None
        full = apply(teacher, graft_plan).float()
        if scope.lora_modules:
            from dit_graft.training.scope import add_lora

            add_lora(full, scope.lora_modules, cfg)
        full.load_state_dict(state, strict=True)
        student = full
    elif not dist.current().main:
        return None
    uncheckpoint_blocks(student)
    unshare(teacher, student, torch.device("cpu"))  # the export is independent of the teacher: its own tensors
    student = student.cpu()
    merge_lora(student)
    return student.float().eval()


def _write(student, graft_plan, recipe, out: Path, metrics, log: list[dict], work_dir: Path) -> None:
    """The main process writes the loss log and the export, then removes the work directory; all ranks wait."""
    from dit_graft.export import export

    error = None
    if dist.current().main:
        try:
            write_loss_log(log, work_dir)
            extra = {n: work_dir / n for n in ("loss.csv", "loss.json", "loss.png") if (work_dir / n).is_file()}
            export(student, graft_plan, recipe.model_dump(), out, metrics, extra, recipe.export.dtype)
            shutil.rmtree(work_dir, ignore_errors=True)
        except Exception as e:  # noqa: BLE001 - reported to every rank by agree()
            error = e
    dist.agree(error)


def trained_parameters(teacher: nn.Module, graft_plan: GraftPlan, cfg) -> tuple[int, int]:
    """(parameters `distill.trainable` trains, student parameters), on a fresh student (meta works: dry runs)."""
    student = apply(teacher, graft_plan)
    total = param_count(student)
    return select(teacher, student, targets(teacher, student, graft_plan), cfg).count, total
