"""The bottom layer: what families and operators share, depending on neither.

Sites, token grids and layouts, block groups and streams, conditions, the attention adapter/core interface,
the abstract `Family` and its registry, and the checkpoint-layout registry. Imports torch, diffusers,
safetensors, accelerate and dit_graft's leaf modules (errors, registry) only.

Import from the modules themselves (`dit_graft.model.site`, `.layout`, `.attention`, `.family`, `.conditions`,
`.checkpoints`, `.calibration`, `.io`): this package's `__init__` imports none of them, so that importing one
module of the layer never runs the others (no import cycle through the package).
"""
