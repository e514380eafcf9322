"""Stage 1 on an already built student (kept for callers of the old module): see `dit_graft.training`."""

from __future__ import annotations

from dit_graft.training import Stage1Result, Target, activation_distill, relative_error, targets
from dit_graft.training.stages import Recorder, block_origins, regression_loss

__all__ = [
    "Recorder",
    "Stage1Result",
    "Target",
    "activation_distill",
    "block_origins",
    "regression_loss",
    "relative_error",
    "targets",
]
