"""Stage 1, activation distillation (grafting, Chandrasegaran et al. 2025): new modules regress the teacher.

Each new module learns, alone, to reproduce what the teacher computed at its place from the same
input, before the end-to-end stage (`dit_graft.distill`) tunes the whole student:

- a grafted attention or MLP module regresses the teacher's module at the same site;
- a block that stands in for a span of teacher blocks after a depth edit (PPCL's contiguous spans,
  parallel block pairs, a kept block followed by dropped ones) regresses the span: from the input of
  the span's first teacher block to the output of its last one.

Inputs are never stored: every step runs the teacher on a fresh batch of noised teacher samples (the
same pool and noising as stage 2), forward hooks record each target's input and output, and each
student module runs on its recorded input. The losses and gradient clipping are per target, so the
modules train independently (one optimizer, disjoint parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dit_graft.errors import DivergenceError, IntegrityError
from dit_graft.export import commit_dir
from dit_graft.families import family_for
from dit_graft.families.dit import freeze_label_dropout
from dit_graft.plan import GraftPlan, depth_spans
from dit_graft.recipe import ActivationSection, DistillSection


@dataclass(frozen=True)
class Target:
    """A student module and the teacher modules it regresses: `first`'s input → `last`'s output."""

    student: str
    first: str
    last: str

    @property
    def name(self) -> str:
        if self.first == self.last:
            return self.student
        return f"{self.student} ← {self.first}…{self.last.rsplit('.', 1)[-1]}"


def _split_at_layer(path: str, layer: int) -> tuple[list[str], list[str]]:
    """`transformer_blocks.3.attn1`, 3 → (["transformer_blocks"], ["attn1"])."""
    parts = path.split(".")
    i = parts.index(str(layer))
    return parts[:i], parts[i + 1 :]


def _at(prefix: list[str], layer: int, suffix: list[str]) -> str:
    return ".".join([*prefix, str(layer), *suffix])


def targets(teacher: nn.Module, student: nn.Module, graft_plan: GraftPlan) -> list[Target]:
    """The stage-1 targets of a plan applied to `teacher` (giving `student`), in module order.

    Block indices are followed through the edits, each depth edit in its own block group (DiT: blocks;
    PixArt: self; FLUX: double, single; see `block_origins`). A grafted site whose block still stands for
    exactly one teacher block regresses that block's module; a site inside a merged block is covered by the
    block's own span target (student block `g.i` ← teacher blocks `g.a` … `g.b`, listed after the sites,
    group by group).
    """
    family = family_for(teacher)
    sites: dict[tuple[str, int, str], None] = {}  # (prefix, layer, suffix), insertion-ordered
    for edit in graft_plan.edits:
        if edit.layer_map is not None:
            group = family.depth_group(edit.group)
            spans = depth_spans(edit)
            renumbered: dict[tuple[str, int, str], None] = {}
            for prefix, layer, suffix in sites:
                if prefix != group.attr:  # another group's site: its block keeps its number
                    renumbered[(prefix, layer, suffix)] = None
                    continue
                new = edit.layer_map[layer]
                if new != "dropped" and len(spans[new]) == 1:
                    renumbered[(prefix, new, suffix)] = None
            sites = renumbered
            continue
        for m in edit.modules:
            prefix, suffix = _split_at_layer(m.path, m.layer)
            sites[(".".join(prefix), m.layer, ".".join(suffix))] = None

    origin = block_origins(teacher, graft_plan)
    by_attr = {g.attr: g for g in family.depth_groups}
    out = []
    for prefix, layer, suffix in sites:
        teacher_layer = layer
        if prefix in by_attr:
            first, last = origin[by_attr[prefix].name][layer]
            if first != last:
                continue
            teacher_layer = first
        p, s = prefix.split("."), suffix.split(".") if suffix else []
        path = _at(p, teacher_layer, s)
        out.append(Target(student=_at(p, layer, s), first=path, last=path))
    for group in family.depth_groups:
        for j, (a, b) in enumerate(origin[group.name]):
            if a != b:
                out.append(Target(student=group.path(j), first=group.path(a), last=group.path(b)))
    for tgt in out:  # a plan that does not describe the student fails here, naming the module
        student.get_submodule(tgt.student)
    return out


def _merge(origin: dict[int, tuple[int, int]], spans: list[list[int]]) -> dict[int, tuple[int, int]]:
    """Block origins after a depth edit: new block j spans from its first old block's start to its last's end."""
    return {j: (origin[span[0]][0], origin[span[-1]][1]) for j, span in enumerate(spans)}


def block_origins(teacher: nn.Module, graft_plan: GraftPlan) -> dict[str, list[tuple[int, int]]]:
    """Per block group of the teacher's family, for each student block of the group, the span (first, last)
    of the group's teacher blocks it stands for (each depth edit merges the spans of its own group)."""
    family = family_for(teacher)
    origin = {g.name: {i: (i, i) for i in range(g.num_blocks(teacher))} for g in family.depth_groups}
    for edit in graft_plan.edits:
        if edit.layer_map is not None:
            name = family.depth_group(edit.group).name
            origin[name] = _merge(origin[name], depth_spans(edit))
    return {name: [o[j] for j in range(len(o))] for name, o in origin.items()}


def regression_loss(cfg: ActivationSection, pred: Any, target: Any) -> torch.Tensor:
    """The configured loss between a module's output and its target (tuples: mean over the tensors)."""
    preds, targs = _tensors(pred), _tensors(target)
    if len(preds) != len(targs):
        raise ValueError(f"student module returned {len(preds)} tensors, the teacher {len(targs)}")
    total = 0.0
    for p, t in zip(preds, targs, strict=True):
        p, t = p.float(), t.float()
        if cfg.loss == "l1":
            total = total + F.l1_loss(p, t)
        elif cfg.loss == "l2":
            total = total + F.mse_loss(p, t)
        else:
            total = total + F.huber_loss(p, t, delta=cfg.huber_delta)
    return total / len(preds)


def relative_error(pred: Any, target: Any) -> float:
    """‖pred − target‖² / ‖target‖², over all output tensors."""
    preds, targs = _tensors(pred), _tensors(target)
    num = sum(float(((p.float() - t.float()) ** 2).sum()) for p, t in zip(preds, targs, strict=True))
    den = sum(float((t.float() ** 2).sum()) for t in targs)
    return num / max(den, 1e-30)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    if hasattr(x, "sample"):
        return [x.sample]
    raise TypeError(f"cannot compare module output of type {type(x).__name__}")


class _Recorder:
    """Hooks on the teacher: the (args, kwargs) entering each `first` module and the output of each `last`."""

    def __init__(self, model: nn.Module, targets: list[Target]) -> None:
        self.inputs: dict[str, tuple[tuple, dict]] = {}
        self.outputs: dict[str, Any] = {}
        self.handles = []
        for path in {t.first for t in targets}:
            self.handles.append(model.get_submodule(path).register_forward_pre_hook(self._pre(path), with_kwargs=True))
        for path in {t.last for t in targets}:
            self.handles.append(model.get_submodule(path).register_forward_hook(self._post(path)))

    def _pre(self, path: str):
        def hook(module, args, kwargs):
            self.inputs[path] = (_detach(args), _detach(kwargs))

        return hook

    def _post(self, path: str):
        def hook(module, args, out):
            self.outputs[path] = _detach(out)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


@dataclass
class Stage1Result:
    log: list[dict]
    errors: dict[str, float]  # target name → relative output error after the stage, on its last batch
    resumed: bool = False


STATE = "stage1"


def activation_distill(
    teacher: nn.Module,
    student: nn.Module,
    target_list: list[Target],
    cfg: DistillSection,
    pool: dict[str, torch.Tensor],
    work_dir: Path | None = None,
    resume: bool = False,
    progress=None,
    steps: int | None = None,
) -> Stage1Result:
    """Trains each target's student module alone to reproduce its teacher output; updates `student` in place.

    With `work_dir`, the result is saved there atomically (`stage1/`) and `resume=True` reloads it
    instead of training again (an interrupted stage 1 restarts from its beginning: it is short).
    """
    from dit_graft.distill import lr_lambda, training_batch

    act = cfg.activation
    steps = act.steps if steps is None else steps
    saved = work_dir / STATE if work_dir is not None else None
    if resume and saved is not None and (saved / "state.json").is_file():
        try:
            student.load_state_dict(load_file(str(saved / "student.safetensors")), strict=True)
            meta = json.loads((saved / "state.json").read_text())
        except Exception as e:  # noqa: BLE001 - any unreadable part makes the saved stage unusable
            raise IntegrityError(f"{saved}: unreadable stage-1 result ({str(e).splitlines()[0]})") from None
        return Stage1Result(meta["log"], meta["errors"], resumed=True)
    if not target_list:
        return Stage1Result([], {})

    family = family_for(teacher)
    device = next(teacher.parameters()).device
    teacher.eval()
    student.to(device).eval()
    freeze_label_dropout(student)
    student.requires_grad_(False)
    modules = {t: student.get_submodule(t.student) for t in target_list}
    groups = {t: [p for p in m.parameters()] for t, m in modules.items()}
    for m in modules.values():
        m.requires_grad_(True)
    params = [p for ps in groups.values() for p in ps]
    opt = torch.optim.AdamW(params, lr=act.lr, weight_decay=0.0) if params else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(act.model_copy(update={"steps": steps}))) if opt else None
    null = family.null_conditions(teacher, cfg.conditions)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    recorder = _Recorder(teacher, target_list)
    log: list[dict] = []
    errors: dict[str, float] = {}
    try:
        for step in range(steps):
            xt, t, _, y = training_batch(teacher, pool, null, act.batch_size, cfg.null_class_prob, gen, device)
            if step == 0:
                with torch.no_grad():  # sets the student's token grid (grid-aware operators read it)
                    family.forward(student, xt[:1], t[:1], {k: v[:1] for k, v in y.items()})
            with torch.no_grad():
                family.forward(teacher, xt, t, y)
            losses = {}
            for tgt, module in modules.items():
                args, kwargs = recorder.inputs[tgt.first]
                pred = module(*args, **kwargs)
                loss = regression_loss(act, pred, recorder.outputs[tgt.last])
                if not torch.isfinite(loss):
                    raise DivergenceError(
                        f"stage 1 diverged at step {step} on {tgt.name} (lower distill.activation.lr)"
                    )
                if groups[tgt]:
                    loss.backward()
                losses[tgt] = loss.item()
                if step == steps - 1:
                    with torch.no_grad():
                        errors[tgt.name] = relative_error(pred, recorder.outputs[tgt.last])
            if opt is not None:
                for ps in groups.values():
                    if ps:
                        torch.nn.utils.clip_grad_norm_(ps, act.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
            if step % act.log_every == 0 or step == steps - 1:
                log.append({"step": step, "loss": sum(losses.values()) / len(losses)})
            if progress is not None:
                progress(step + 1, steps, log[-1]["loss"])
    finally:
        recorder.remove()
    student.requires_grad_(True)
    if saved is not None:
        _save(saved, student, log, errors)
    return Stage1Result(log, errors)


def _save(saved: Path, student: nn.Module, log: list[dict], errors: dict[str, float]) -> None:
    tmp = saved.with_name(f".{saved.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(tmp / "student.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"log": log, "errors": errors}))
    commit_dir(tmp, saved)
