"""The checkpoint-layout registry: single-file checkpoints in layouts other than a diffusers model directory.

A layout (registered by the family whose model it builds) says how to recognise a state dict from its key
names (`detect`), how to read a diffusers config off its shapes (`infer_config`), and how to convert it to the
model's state dict (`convert`, every key and shape checked, on meta tensors too, so that a dry run checks a
checkpoint from its header alone). `finish` applies computation choices of the original code that the diffusers
config cannot hold (original DiT: its timestep frequencies), so that the loaded model computes the original
function.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dit_graft.errors import IntegrityError
from dit_graft.registry import Registry


@dataclass(frozen=True)
class CheckpointLayout:
    """One checkpoint layout.

    - `detect(keys) -> bool`: whether a state dict's key names are this layout
    - `infer_config(shapes, hints) -> dict | None`: a diffusers config (with `_class_name`) from key → shape;
      `hints` carries what shapes cannot say (a recipe's `model.num_heads`); None: the layout needs a config
    - `convert(state, model) -> dict`: the model's state dict from the checkpoint's; raises IntegrityError
      naming the first bad key or shape; works on meta tensors
    - `pickle`: whether weights-only torch pickles (.pt/.pth/.bin) may be read as this layout
    - `finish(model) -> model`: applied after the weights are in (None: nothing)
    - `priority`: layouts are tried highest first
    """

    name: str
    family: str
    detect: Callable[[Collection[str]], bool]
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
    infer_config: Callable[[dict[str, tuple[int, ...]], dict[str, Any]], dict[str, Any] | None] | None = None
    pickle: bool = False
    finish: Callable[[nn.Module], nn.Module] | None = None
    priority: int = 0


LAYOUTS: Registry[CheckpointLayout] = Registry("checkpoint layout")


def register_layout(layout: CheckpointLayout) -> CheckpointLayout:
    return LAYOUTS.register(layout.name)(layout)


def detect_layout(keys: Collection[str], pickle: bool = False) -> CheckpointLayout | None:
    """The registered layout whose `detect` accepts these key names (highest priority first); None: none does."""
    keys = set(keys)
    for layout in sorted((lay for _, lay in LAYOUTS.items()), key=lambda lay: -lay.priority):
        if pickle and not layout.pickle:
            continue
        if layout.detect(keys):
            return layout
    return None


def layout_names() -> list[str]:
    return [name for name, _ in LAYOUTS.items()]


def _diffusers_detect(keys) -> bool:
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "blocks.")) for k in keys)


def _diffusers_convert(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """diffusers' own layout: the state dict as it is, every key and shape checked against the model's."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what, keys = ("missing key", missing) if missing else ("unexpected key", extra)
        raise IntegrityError(f"{what} {keys[0]}" + (f" (+{len(keys) - 1} more)" if keys[1:] else ""))
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise IntegrityError(f"{k} has shape {tuple(state[k].shape)}, the model expects {tuple(shape)}")
    return dict(state)


register_layout(
    CheckpointLayout("diffusers", "any", _diffusers_detect, _diffusers_convert, priority=-10)
)  # diffusers' own layout: any family's, the config comes from model.config
