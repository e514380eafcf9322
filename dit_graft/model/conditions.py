"""Batches of conditions: dicts of tensors whose first dimension is the sample.

Conditions are opaque to everything but the family (`{"class_labels": (B,)}` for DiT, `{"prompt_embeds": (B, T, D),
"prompt_attention_mask": (B, T)}` for PixArt, ...). Generic code only selects rows, concatenates and moves them.
"""

from __future__ import annotations

from typing import Any

import torch

Conditions = dict[str, torch.Tensor]


def take_rows(cond: Conditions, idx: torch.Tensor | slice) -> Conditions:
    """The conditions of the selected samples."""
    return {k: v[idx] for k, v in cond.items()}


def conditions_to(cond: Conditions, device: Any) -> Conditions:
    return {k: v.to(device) for k, v in cond.items()}


def cat_conditions(*conds: Conditions) -> Conditions:
    """Concatenates condition batches along the sample dimension."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def num_conditions(cond: Conditions) -> int:
    return next(iter(cond.values())).shape[0]


def expand_null(null: Conditions, like: Conditions) -> Conditions:
    """The one-row null condition repeated for every row of `like` (keys null lacks are kept from `like`)."""
    n = num_conditions(like)
    return {k: null[k].to(v.device).expand(n, *v.shape[1:]) if k in null else v for k, v in like.items()}


def drop_to_null(cond: Conditions, null: Conditions | None, mask: torch.Tensor) -> Conditions:
    """cond with the rows where `mask` is True replaced by the one-row null condition (no null: unchanged)."""
    if null is None:
        return cond
    out = {}
    for k, v in cond.items():
        if k in null:
            keep = mask.view(-1, *([1] * (v.dim() - 1)))
            v = torch.where(keep, null[k].to(v.dtype).expand_as(v), v)
        out[k] = v
    return out
