"""Training: one `Trainer` loop, the two stages as loss steps, data, processes and the trainable scope.

    data.py     teacher-sample pool (made once, cached, shared by the ranks); seeded global batches, sliced per rank
    dist.py     processes: main process, barriers, one failure ending every rank
    stages.py   ActivationStage (stage 1) and EndToEndStage (stage 2): loss steps and clipping groups
    scope.py    distill.trainable, LoRA, shared frozen weights, frozen dtype, activation checkpointing
    trainer.py  the loop: precision, gradient averaging, non-finite guard, checkpoints, resume, logging
    logs.py     loss.csv / loss.json / loss.png

    run.py      `distill` and `activation_distill`: one stage on a student someone already built (scripts, tests,
                automatic layer choice)

`dit_graft.pipeline.convert` runs a whole conversion. This `__init__` imports none of the modules (import them by
name), so that no module of the package runs another through it.
"""
