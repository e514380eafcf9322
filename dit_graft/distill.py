"""Stage 2 on an already built student (kept for callers of the old module): see `dit_graft.training`."""

from __future__ import annotations

from dit_graft.training import DistillResult, distill, lr_lambda, training_batch, training_pool
from dit_graft.training.logs import write_loss_log
from dit_graft.training.stages import feature_blocks

__all__ = [
    "DistillResult",
    "distill",
    "feature_blocks",
    "lr_lambda",
    "training_batch",
    "training_pool",
    "write_loss_log",
]
