"""Distillation loss terms, one per registry entry, weighted by the recipe's `distill.losses`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dit_graft.diffusion import split_output
from dit_graft.registry import Registry


@dataclass
class LossInputs:
    """What one distillation micro-batch produced: outputs, true noise and block features."""

    student: torch.Tensor  # (B, C_out, H, W) raw student output
    teacher: torch.Tensor  # (B, C_out, H, W) raw teacher output
    noise: torch.Tensor  # (B, C_in, H, W) the noise that was added
    student_features: list[torch.Tensor]
    teacher_features: list[torch.Tensor]
    student_model: nn.Module | None = None  # the student that produced `student` (auxiliary terms read it)


LossFn = Callable[[LossInputs], torch.Tensor]
LOSSES: Registry[LossFn] = Registry("loss")


def _eps(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return split_output(x, noise.shape[1])[0]


@LOSSES.register("eps_mse")
def eps_mse(b: LossInputs) -> torch.Tensor:
    """Noise prediction of the student vs the teacher's."""
    return F.mse_loss(_eps(b.student, b.noise).float(), _eps(b.teacher, b.noise).float())


@LOSSES.register("sigma_mse")
def sigma_mse(b: LossInputs) -> torch.Tensor:
    """Learned-variance channels of the student vs the teacher's (LiT's hybrid KD); 0 without them."""
    s = split_output(b.student, b.noise.shape[1])[1]
    t = split_output(b.teacher, b.noise.shape[1])[1]
    if s is None or t is None:
        return b.student.new_zeros(())
    return F.mse_loss(s.float(), t.float())


@LOSSES.register("feature_mse")
def feature_mse(b: LossInputs) -> torch.Tensor:
    """Mean over blocks of the MSE between student and teacher block outputs."""
    pairs = list(zip(b.student_features, b.teacher_features, strict=True))
    return sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / max(len(pairs), 1)


@LOSSES.register("task")
def task(b: LossInputs) -> torch.Tensor:
    """The ordinary diffusion loss: student eps vs the true noise."""
    return F.mse_loss(_eps(b.student, b.noise).float(), b.noise.float())


@LOSSES.register("load_balance")
def load_balance(b: LossInputs) -> torch.Tensor:
    """Mean over the student's MoE FFNs of their last forward's load-balancing term (1 when balanced; 0 without)."""
    terms = [] if b.student_model is None else [m.aux_loss for m in b.student_model.modules() if _has_aux(m)]
    if not terms:
        return b.student.new_zeros(())
    return torch.stack([t.float() for t in terms]).mean()


def _has_aux(module: nn.Module) -> bool:
    return isinstance(getattr(module, "aux_loss", None), torch.Tensor)
