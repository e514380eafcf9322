"""What trains, what is frozen and shared, in which dtype, and what is recomputed.

`distill.trainable` picks the trained parameters among the modules the edits touched (the stage-1
targets, `dit_graft.training.stages.targets`):

- `new`: the parameters the graft added: those of a touched module with no parameter of the same name
  in the teacher module it replaces (a linear-attention module's depthwise conv, MoE experts; the
  inherited q/k/v/out projections stay frozen);
- `grafted`: every parameter of the touched modules (CLEAR, LinFusion);
- `all`: the whole student (LiT);
- `lora`: peft LoRA adapters of rank `distill.lora.rank` on the touched modules' linear layers, plus the
  added (`new`) parameters that are not linear weights, merged into the weights at export (TinyFusion's
  recovery).

Every other parameter is frozen: no gradient, no optimizer state. A frozen parameter the edits left
unchanged (same name, shape and value as the teacher's) is the teacher's own tensor, not a copy, so a
`grafted` student costs only its trained modules twice; the teacher and the frozen weights are held in
`distill.frozen_dtype`, the trained weights in float32. Under FSDP the student's frozen weights are
sharded with it instead of shared (the teacher keeps its full copy in the frozen dtype on every device).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dit_graft.errors import RecipeError
from dit_graft.families import family_for
from dit_graft.recipe import DistillSection
from dit_graft.training.stages import Target

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BRANCH = re.compile(r"branches\.\d+\.")


@dataclass
class Scope:
    """The trained parameters of a student (by name) and how many parameters they hold."""

    names: list[str]
    count: int
    lora_modules: list[str]  # linear layers that carry LoRA adapters (trainable: lora)


def _teacher_names(teacher: nn.Module, path: str) -> set[str]:
    try:
        module = teacher.get_submodule(path)
    except AttributeError:
        return set()
    return {n for n, _ in module.named_parameters()}


def _new_names(teacher: nn.Module, student: nn.Module, target_list: list[Target]) -> list[str]:
    """Parameters of the touched modules with no same-named parameter in the teacher module they replace."""
    out = []
    for tgt in target_list:
        known = _teacher_names(teacher, tgt.first)
        for name, _ in student.get_submodule(tgt.student).named_parameters():
            if _BRANCH.sub("", name) not in known and name not in known:
                out.append(f"{tgt.student}.{name}")
    return out


def _grafted_names(student: nn.Module, target_list: list[Target]) -> list[str]:
    return [f"{t.student}.{n}" for t in target_list for n, _ in student.get_submodule(t.student).named_parameters()]


def lora_targets(student: nn.Module, target_list: list[Target]) -> list[str]:
    """The linear layers inside the touched modules (full paths)."""
    return [
        f"{t.student}.{n}"
        for t in target_list
        for n, m in student.get_submodule(t.student).named_modules()
        if isinstance(m, nn.Linear) and n
    ]


def add_lora(student: nn.Module, modules: list[str], cfg: DistillSection) -> None:
    """Wraps each named linear layer with a peft LoRA adapter (B initialised to zero: the output is unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = cfg.lora
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        lora_dropout=lora.dropout,
        target_modules=modules,
    )
    inject_adapter_in_model(config, student)


def merge_lora(student: nn.Module) -> int:
    """Folds every LoRA adapter into its base linear layer (in float32) and removes the adapter; returns the count.

    The base weight is cloned first: it may be the teacher's own (shared) tensor.
    """
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(student.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        base.weight = nn.Parameter(base.weight.detach().float().clone(), requires_grad=False)
        if base.bias is not None:
            base.bias = nn.Parameter(base.bias.detach().float().clone(), requires_grad=False)
        for adapter in module.lora_A.values():
            adapter.float()
        for adapter in module.lora_B.values():
            adapter.float()
        module.merge(safe_merge=True)
        parent, _, attr = name.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, attr, base)
        merged += 1
    return merged


def select(teacher: nn.Module, student: nn.Module, target_list: list[Target], cfg: DistillSection) -> Scope:
    """Applies `distill.trainable` to `student` (adding LoRA adapters for `lora`); frozen parameters get
    requires_grad False. A scope that matches no parameter is a RecipeError."""
    kind = cfg.trainable
    lora_modules: list[str] = []
    if kind == "all":
        names = [n for n, _ in student.named_parameters()]
    elif kind == "grafted":
        names = _grafted_names(student, target_list)
    elif kind == "new":
        names = _new_names(teacher, student, target_list)
    elif kind == "lora":
        lora_modules = lora_targets(student, target_list)
        extra = [n for n in _new_names(teacher, student, target_list) if n.rsplit(".", 1)[0] not in lora_modules]
        if lora_modules:
            add_lora(student, lora_modules, cfg)
        names = [n for n, _ in student.named_parameters() if ".lora_A." in n or ".lora_B." in n] + extra
    else:
        raise RecipeError(f"distill.trainable: unknown scope {kind!r} (known: new, grafted, all, lora)")
    params = dict(student.named_parameters())
    names = [n for n in dict.fromkeys(names) if n in params]
    if not names:
        what = "no module was grafted" if not target_list else "the grafted modules have no such parameters"
        raise RecipeError(f"distill.trainable: {kind} matches no parameter of the student ({what})")
    student.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    return Scope(names, sum(params[n].numel() for n in names), lora_modules)


def share_frozen(teacher: nn.Module, student: nn.Module) -> int:
    """Makes every frozen student parameter equal to the teacher's same-named one *be* that tensor.

    A LoRA-wrapped layer's frozen weight (peft names it `…<layer>.base_layer.weight`) is the teacher's
    `…<layer>.weight`. Returns the number of parameters (elements) now shared. Call before casting either model.
    """
    teacher_params = dict(teacher.named_parameters())
    shared = 0
    for name, p in list(student.named_parameters()):
        if p.requires_grad:
            continue
        t = teacher_params.get(name.replace(".base_layer.", "."))
        if t is None or t is p or t.shape != p.shape or t.dtype != p.dtype or not torch.equal(t, p):
            continue
        module_path, _, attr = name.rpartition(".")
        module = student.get_submodule(module_path) if module_path else student
        module._parameters[attr] = t
        shared += p.numel()
    return shared


def unshare(teacher: nn.Module, student: nn.Module, device: torch.device | None = None) -> None:
    """Gives the student its own copy (on `device`, default where it is) of every tensor it shares with the teacher."""
    teacher_ids = {id(p) for p in teacher.parameters()}
    for module in student.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and id(p) in teacher_ids:
                copy = p.detach().to(device or p.device, copy=True)
                module._parameters[attr] = nn.Parameter(copy, requires_grad=p.requires_grad)


def cast_frozen(teacher: nn.Module, student: nn.Module, dtype_name: str) -> None:
    """The teacher and the student's frozen parameters in `dtype_name`; trained parameters in float32."""
    dtype = DTYPES[dtype_name]
    for p in teacher.parameters():  # parameter by parameter: diffusers' `to(dtype)` has its own rules
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for p in student.parameters():
        want = torch.float32 if p.requires_grad else dtype
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)


def checkpoint_blocks(model: nn.Module) -> int:
    """Recomputes each transformer block's activations in the backward pass (the family's block list).

    Grafted processors run inside their block, so they are recomputed with it. Returns the block count.
    """
    blocks = family_for(model).blocks(model)
    for block in blocks:
        if getattr(block, "_dit_graft_checkpointed", False):
            continue
        forward = block.forward

        def run(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = run
        block._dit_graft_checkpointed = True
    return len(blocks)


def uncheckpoint_blocks(model: nn.Module) -> None:
    """Undoes `checkpoint_blocks` (before export: the instance attribute is not part of the model)."""
    for module in model.modules():
        if getattr(module, "_dit_graft_checkpointed", False):
            del module.forward
            del module._dit_graft_checkpointed
