"""Caption embeddings for the text-conditioned families: a seeded synthetic set, or cached real ones.

No text encoder runs inside dit-graft: a recipe's `distill.conditions` names a .safetensors of
embeddings computed once with the pipeline's own encoder (e.g. `pipe.encode_prompt(captions)`), one
row per caption:

    prompt_embeds                    (N, T, D)  T5 features (PixArt: D = caption_channels; FLUX: joint_attention_dim)
    prompt_attention_mask            (N, T)     PixArt: 1 for the caption's tokens
    pooled_prompt_embeds             (N, P)     FLUX: the CLIP pooled embedding, P = pooled_projection_dim
    negative_prompt_embeds           (1, T, D)  optional: the empty caption, PixArt's null condition
    negative_prompt_attention_mask   (1, T)

Without one, a small synthetic set stands in (8 captions of 16 tokens, standard-normal features,
caption lengths between 2 and 16 tokens, seeded): enough to exercise every code path on tiny models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dit_graft.errors import IntegrityError
from dit_graft.model.conditions import Conditions
from dit_graft.model.io import read_safetensors

SYNTHETIC_CAPTIONS = 8
SYNTHETIC_TOKENS = 16
SYNTHETIC_SEED = 1234


def synthetic_captions(dim: int, pooled_dim: int | None = None, tokens: int = SYNTHETIC_TOKENS) -> Conditions:
    """SYNTHETIC_CAPTIONS seeded random captions: prompt_embeds, prompt_attention_mask[, pooled_prompt_embeds]."""
    gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
    embeds = torch.randn(SYNTHETIC_CAPTIONS, tokens, dim, generator=gen)
    lengths = torch.randint(2, tokens + 1, (SYNTHETIC_CAPTIONS,), generator=gen)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()  # (K, T)
    out = {"prompt_embeds": embeds * mask[..., None], "prompt_attention_mask": mask}
    if pooled_dim is not None:
        out["pooled_prompt_embeds"] = torch.randn(SYNTHETIC_CAPTIONS, pooled_dim, generator=gen)
    return out


def read_captions(path: str | Path, dim: int, pooled_dim: int | None = None, masks: bool = True) -> Conditions:
    """Cached caption embeddings, every key and shape checked against the model's widths."""
    path = Path(path)
    data = read_safetensors(path)
    need = (
        ["prompt_embeds"]
        + (["prompt_attention_mask"] if masks else [])
        + (["pooled_prompt_embeds"] if pooled_dim else [])
    )
    for key in need:
        if key not in data:
            raise IntegrityError(f"{path}: no {key!r} (has: {', '.join(sorted(data)) or 'nothing'})")
    embeds = data["prompt_embeds"].float()
    if embeds.ndim != 3 or embeds.shape[-1] != dim or embeds.shape[0] == 0:
        raise IntegrityError(f"{path}: prompt_embeds has shape {tuple(embeds.shape)}, the model needs (N, T, {dim})")
    n, t = embeds.shape[:2]
    out = {"prompt_embeds": embeds}
    if masks:
        mask = data["prompt_attention_mask"]
        if tuple(mask.shape) != (n, t):
            raise IntegrityError(f"{path}: prompt_attention_mask has shape {tuple(mask.shape)}, expected {(n, t)}")
        out["prompt_attention_mask"] = mask.long()
    if pooled_dim:
        pooled = data["pooled_prompt_embeds"].float()
        if tuple(pooled.shape) != (n, pooled_dim):
            raise IntegrityError(
                f"{path}: pooled_prompt_embeds has shape {tuple(pooled.shape)}, expected {(n, pooled_dim)}"
            )
        out["pooled_prompt_embeds"] = pooled
    if "negative_prompt_embeds" in data:
        neg = data["negative_prompt_embeds"].float()
        neg_mask = data.get("negative_prompt_attention_mask", torch.ones(1, t)).long()
        if tuple(neg.shape) != (1, t, dim) or tuple(neg_mask.shape) != (1, t):
            raise IntegrityError(
                f"{path}: negative_prompt_embeds/mask have shapes {tuple(neg.shape)}/{tuple(neg_mask.shape)}, "
                f"expected {(1, t, dim)}/{(1, t)}"
            )
        out["negative_prompt_embeds"], out["negative_prompt_attention_mask"] = neg, neg_mask
    return out


def spread(captions: Conditions, n: int) -> Conditions:
    """n rows cycling through the caption set (caption i % K), without the negative entries."""
    idx = torch.arange(n) % captions["prompt_embeds"].shape[0]
    return {k: v[idx] for k, v in captions.items() if not k.startswith("negative_")}


def empty_caption(captions: Conditions) -> Conditions:
    """The null caption: the cached negative embedding, else zero features with only the first token visible."""
    if "negative_prompt_embeds" in captions:
        return {
            "prompt_embeds": captions["negative_prompt_embeds"],
            "prompt_attention_mask": captions["negative_prompt_attention_mask"],
        }
    _, t, d = captions["prompt_embeds"].shape
    mask = torch.zeros(1, t, dtype=torch.long)
    mask[:, 0] = 1
    return {"prompt_embeds": torch.zeros(1, t, d), "prompt_attention_mask": mask}
