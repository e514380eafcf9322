"""`prune_depth`: keep the k most important transformer blocks (ShortGPT's block importance, Men et al. 2024).

A structure edit (`site: depth`): planning scores the blocks and records which survive; applying
rebuilds the block list from the kept blocks, in their order, and updates the config's layer count,
so a depth-only student is a stock diffusers model (blocks renumbered 0 … k−1).

    method: importance   BI_i = 1 − E_tokens[cos(h_i, h_{i+1})],  h_i the input of block i

scored on `calibration_samples` teacher forward passes of random latents x ~ N(0, I) at uniform
random timesteps (0 … 999) with the family's evenly spread conditions, from a generator seeded by
`seed` (the global RNG is untouched): a data-free stand-in for teacher data. A block that barely
turns its input changes the residual stream least; the k highest BI are kept (ties: the earlier).
Blocks a family pins (DiT: block 0, whose label/timestep embedding the output layer reads) are
always kept.

On the meta device (dry runs) no block can be scored: the plan keeps the pinned blocks and then the
first ones (`scored: false` in the plan), which gives the right shapes and costs; a real conversion
scores on the loaded teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from dit_graft.operators.base import Operator, Options, register


class PruneDepthOptions(Options):
    """Options of the `prune_depth` structure edit."""

    method: Literal["importance"] = "importance"
    keep: int = Field(default=1, ge=1, description="blocks to keep")
    calibration_samples: int = Field(default=8, ge=1, le=4096, description="random latents scored (importance)")
    seed: int = Field(default=0, ge=0, description="seed of the calibration latents, timesteps and conditions")


def block_importance(model: nn.Module, options: PruneDepthOptions) -> list[float]:
    """BI_i = 1 − mean cosine similarity of block i's input and output tokens, over seeded random teacher inputs."""
    from dit_graft.families import family_for
    from dit_graft.families.base import take_rows

    family = family_for(model)
    blocks = family.blocks(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(options.seed)
    n = options.calibration_samples
    x = torch.randn(n, *family.latent_shape(model), generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    cond = family.conditions(model, n)
    cond = take_rows(cond, torch.randperm(n, generator=gen) % next(iter(cond.values())).shape[0])
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)

    def hook(i):
        def record(module, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, N)
            sums[i] += cos.sum().item()
            counts[i] += cos.numel()

        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            family.forward(model, x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()})
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [1.0 - s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


def choose_blocks(scores: list[float] | None, num_layers: int, keep: int, pinned: tuple[int, ...]) -> list[int]:
    """The kept block indices, ascending: the pinned ones, then the highest scores (no scores: the first ones)."""
    pinned = tuple(p for p in pinned if p < num_layers)[:keep]
    rest = [i for i in range(num_layers) if i not in pinned]
    if scores is not None:
        rest = sorted(rest, key=lambda i: (-scores[i], i))
    return sorted([*pinned, *rest[: keep - len(pinned)]])


def keep_blocks(model: nn.Module, kept: list[int]) -> None:
    """Keeps only the blocks `kept` (in that order) and updates the config's layer count, in place."""
    from dit_graft.families import family_for

    family = family_for(model)
    if family.keep_blocks is None:
        raise ValueError(f"the {family.name} family does not support depth edits yet")
    family.keep_blocks(model, kept)


register(
    Operator(
        name="prune_depth",
        site="depth",
        summary="Structure edit: keep the `keep` blocks of highest importance 1 − cos(block input, output) "
        "(ShortGPT); exports as a stock diffusers model.",
        options=PruneDepthOptions,
        build=None,
        installs="structure",
        paper="ShortGPT (Men et al. 2024); TinyFusion's baseline",
    )
)
