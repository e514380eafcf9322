"""One stage on a student someone already built: `distill` (stage 2) and `activation_distill` (stage 1).

`dit_graft.pipeline.convert` runs both, and everything around them, for a whole conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dit_graft.families import family_for
from dit_graft.plan import GraftPlan
from dit_graft.recipe import DistillSection
from dit_graft.training import dist
from dit_graft.training.data import training_batch, training_pool
from dit_graft.training.logs import write_loss_log
from dit_graft.training.stages import ActivationStage, EndToEndStage, Target, feature_blocks, relative_error, targets
from dit_graft.training.trainer import Trainer, TrainResult, lr_lambda

DistillResult = TrainResult

__all__ = [
    "ActivationStage",
    "DistillResult",
    "EndToEndStage",
    "Stage1Result",
    "Target",
    "TrainResult",
    "Trainer",
    "activation_distill",
    "distill",
    "feature_blocks",
    "lr_lambda",
    "relative_error",
    "targets",
    "training_batch",
    "training_pool",
    "write_loss_log",
]


def _device(teacher: nn.Module):
    return next(teacher.parameters()).device


def distill(
    teacher: nn.Module,
    student: nn.Module,
    cfg: DistillSection,
    work_dir: Path,
    resume: bool = False,
    progress=None,
    graft_plan: GraftPlan | None = None,
) -> TrainResult:
    """Stage 2 on an already built student: trains every student parameter in place against `teacher`.

    `graft_plan` (the plan that made the student) is needed by `feature_mse` after depth edits. The teacher's
    parameters are left as they are (requires_grad included). For trainable scopes, shared weights and
    several processes, run `dit_graft.pipeline.convert`.
    """
    dev = dist.device()
    teacher.to(dev).eval()
    student.to(dev)
    model = family_for(teacher).prepare_for_training(student.train())
    params = list(model.requires_grad_(True).parameters())
    pool = training_pool(teacher, cfg, Path(work_dir), progress)
    result = Trainer(teacher, model, params, cfg, Path(work_dir), progress).run(
        EndToEndStage(teacher, model, cfg, graft_plan), pool, resume=resume
    )
    student.eval()
    return result


@dataclass
class Stage1Result:
    log: list[dict]
    errors: dict[str, float]  # target name → relative output error after the stage, on its last batch
    resumed: bool = False


def activation_distill(
    teacher: nn.Module,
    student: nn.Module,
    target_list: list[Target],
    cfg: DistillSection,
    pool,
    work_dir: Path | None = None,
    resume: bool = False,
    progress=None,
    steps: int | None = None,
) -> Stage1Result:
    """Stage 1 on an already built student: each target module, alone, learns its teacher output (in place).

    With `work_dir`, checkpoints go to `work_dir/checkpoints/activation` and `resume=True` continues from them.
    """
    if not target_list:
        return Stage1Result([], {})
    student.to(_device(teacher)).eval()
    teacher.eval()
    stage = ActivationStage(teacher, student, target_list, cfg, steps=steps)
    student.requires_grad_(False)
    params = stage.trainable()
    for p in params:
        p.requires_grad_(True)
    trainer = Trainer(teacher, student, params, cfg, work_dir, progress)
    result = trainer.run(stage, pool, resume=resume)
    student.requires_grad_(True)
    errors = {n: num / max(den, 1e-30) for n, (num, den) in stage.errors.items()}
    return Stage1Result(result.log, errors, resumed=result.resumed_from is not None)
