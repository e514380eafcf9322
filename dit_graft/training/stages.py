"""The two stages as loss steps for the one `Trainer`: `ActivationStage` (stage 1) and `EndToEndStage` (stage 2).

Stage 1, activation distillation (grafting, Chandrasegaran et al. 2025): every new module learns,
alone, to reproduce what the teacher computed at its place from the same input:

- a grafted attention or MLP module regresses the teacher's module at the same site;
- a block that stands in for a span of teacher blocks after a depth edit (PPCL's contiguous spans,
  parallel block pairs, a kept block followed by dropped ones) regresses the span: from the input of
  the span's first teacher block to the output of its last one.

Inputs are never stored: every step runs the teacher on a fresh batch of noised teacher samples,
forward hooks record each target's input and output, and each student module runs on its recorded
input. Losses and gradient clipping are per target (one clipping group per target, disjoint
parameters), so the modules train independently.

Stage 2, end-to-end distillation: the whole student output regresses the teacher's with the recipe's
hybrid loss (`dit_graft.losses`), optionally with block features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dit_graft.families import family_for
from dit_graft.losses import LOSSES, LossInputs
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
    """The modules an edit touched, as stage-1 targets of a plan applied to `teacher` (giving `student`).

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


def feature_blocks(teacher: nn.Module, graft_plan: GraftPlan | None) -> list[nn.Module]:
    """The teacher blocks whose outputs the student's blocks (`family.blocks(student)`) match, in order.

    After depth edits, each student block of a block group is matched with the last teacher block of the
    span it stands for in that group (FLUX: the double blocks, then the single blocks).
    """
    family = family_for(teacher)
    if graft_plan is None or not any(e.layer_map is not None for e in graft_plan.edits):
        return family.blocks(teacher)
    origins = block_origins(teacher, graft_plan)
    return [g.blocks(teacher)[last] for g in family.depth_groups for _, last in origins[g.name]]


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    if hasattr(x, "sample"):
        return [x.sample]
    raise TypeError(f"cannot compare module output of type {type(x).__name__}")


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


def error_terms(pred: Any, target: Any) -> tuple[float, float]:
    """(‖pred − target‖², ‖target‖²) over all output tensors."""
    preds, targs = _tensors(pred), _tensors(target)
    num = sum(float(((p.float() - t.float()) ** 2).sum()) for p, t in zip(preds, targs, strict=True))
    den = sum(float((t.float() ** 2).sum()) for t in targs)
    return num, den


def relative_error(pred: Any, target: Any) -> float:
    """‖pred − target‖² / ‖target‖², over all output tensors."""
    num, den = error_terms(pred, target)
    return num / max(den, 1e-30)


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


class Recorder:
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


class BlockOutputs:
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


def _teacher_forward(family, teacher: nn.Module, xt, t, y):
    """The teacher's raw output, without gradients, in its own (frozen) dtype."""
    dtype = next(teacher.parameters()).dtype
    with torch.no_grad(), torch.autocast(xt.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return family.forward(teacher, xt, t, y)


class EndToEndStage:
    """Stage 2: the student's output (and optionally block features) regresses the teacher's."""

    name = "end_to_end"

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DistillSection, graft_plan: GraftPlan | None):
        self.teacher, self.student, self.cfg, self.graft_plan = teacher, student, cfg, graft_plan
        self.family = family_for(teacher)
        self.weights = {k: w for k, w in cfg.losses.model_dump().items() if w > 0}
        self.hooks: list[BlockOutputs] = []
        # hyperparameters the trainer reads
        self.steps, self.batch_size, self.lr, self.warmup = cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup
        self.grad_clip, self.grad_accum, self.log_every = cfg.grad_clip, cfg.grad_accum, cfg.log_every
        self.weight_decay, self.seed = cfg.weight_decay, cfg.seed
        self.terms = list(self.weights)

    def clip_groups(self, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
        return [params]

    def begin(self, model: nn.Module, probe, autocast) -> None:
        """Installs the feature hooks on `model` (the student as trained: sharded or not) and the teacher."""
        if "feature_mse" in self.weights:
            self.hooks = [
                BlockOutputs(self.family.blocks(model)),
                BlockOutputs(feature_blocks(self.teacher, self.graft_plan)),
            ]

    def end(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def loss(self, model: nn.Module, batch, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xt, t, target, y = batch
        t_out = _teacher_forward(self.family, self.teacher, xt, t, y)
        with autocast():
            s_out = self.family.forward(model, xt, t, y)
        s_feats, t_feats = (self.hooks[0].take(), self.hooks[1].take()) if self.hooks else ([], [])
        inputs = LossInputs(s_out, t_out, target, s_feats, t_feats, student_model=model)
        terms = {k: LOSSES.get(k)(inputs) for k in self.weights}
        return sum(self.weights[k] * v for k, v in terms.items()), terms


class ActivationStage:
    """Stage 1: each target module, run alone on its recorded teacher input, regresses the teacher's output."""

    name = "activation"

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        target_list: list[Target],
        cfg: DistillSection,
        steps: int | None = None,
    ):
        act = cfg.activation
        self.teacher, self.student, self.targets, self.act = teacher, student, target_list, act
        self.family = family_for(teacher)
        self.modules = {t: student.get_submodule(t.student) for t in target_list}
        self.steps = act.steps if steps is None else steps
        self.batch_size, self.lr, self.warmup, self.grad_clip = act.batch_size, act.lr, act.warmup, act.grad_clip
        self.grad_accum, self.log_every, self.weight_decay, self.seed = 1, act.log_every, 0.0, cfg.seed + 7
        self.recorder: Recorder | None = None
        self.terms = ["loss"]
        self.errors: dict[str, tuple[float, float]] = {}  # target name → (‖pred − target‖², ‖target‖²), last step

    def trainable(self) -> list[nn.Parameter]:
        """Every parameter of the target modules (stage 1 trains the modules the edits touched, whole)."""
        seen, out = set(), []
        for m in self.modules.values():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def state(self) -> dict:
        """What a checkpoint keeps of the stage besides weights: the last step's per-target errors."""
        return {"errors": {k: list(v) for k, v in self.errors.items()}}

    def load_state(self, state: dict) -> None:
        self.errors = {k: tuple(v) for k, v in state.get("errors", {}).items()}

    def clip_groups(self, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
        """One clipping group per target: the targets train independently."""
        wanted = {id(p) for p in params}
        return [[p for p in m.parameters() if id(p) in wanted] for m in self.modules.values()]

    def begin(self, model: nn.Module, probe, autocast) -> None:
        xt, t, _, y = probe
        with torch.no_grad(), autocast():  # sets the student's token grid (grid-aware operators read it)
            self.family.forward(self.student, xt[:1], t[:1], {k: v[:1] for k, v in y.items()})
        self.recorder = Recorder(self.teacher, self.targets)

    def end(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None

    def loss(self, model: nn.Module, batch, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xt, t, _, y = batch
        _teacher_forward(self.family, self.teacher, xt, t, y)
        losses = []
        for tgt, module in self.modules.items():
            args, kwargs = self.recorder.inputs[tgt.first]
            with autocast():
                pred = module(*args, **kwargs)
            target = self.recorder.outputs[tgt.last]
            losses.append(regression_loss(self.act, pred, target))
            with torch.no_grad():
                self.errors[tgt.name] = error_terms(pred, target)
        # disjoint parameters: the sum's gradient is each target's own loss gradient
        # the logged loss is the mean over the targets
        return sum(losses), {"loss": torch.stack([x.detach() for x in losses]).mean()}
