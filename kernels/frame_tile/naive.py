"""PyTorch reference for frame-tile attention: a dense (N, N) mask from the frame pattern, masked softmax (O(N²))."""

from __future__ import annotations

import torch

from .._blockwise import text_prefix_mask


def frame_pattern(frames: int, group: int, global_frames: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[frames, frames] bool: True where query frame f sees key frame f'.

    f or f' among the first `global_frames` frames, or both in the same group of `group` consecutive frames
    counted from the first non-global frame (the last group may be short).
    """
    f = torch.arange(frames, device=device)
    is_global = f < global_frames
    group_id = torch.div(f - global_frames, group, rounding_mode="floor")
    same = group_id[:, None] == group_id[None, :]
    return is_global[:, None] | is_global[None, :] | same


def frame_tile_mask(
    grid: tuple[int, int, int], group: int, global_frames: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[N, N] bool token mask, N = frames · h · w, frame-major: the frame pattern expanded to each frame's tokens."""
    frames, h, w = grid
    pattern = frame_pattern(frames, group, global_frames, device)
    return pattern.repeat_interleave(h * w, dim=0).repeat_interleave(h * w, dim=1)


def frame_tile_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    group: int = 1,
    global_frames: int = 1,
    text: int = 0,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over the frames each query's frame sees, in fp32 (float64 stays float64); a T-token
    text prefix (text = T) keeps its rows and columns dense."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhid,bhjd->bhij", q.to(compute_dtype), k.to(compute_dtype)) * scale  # [B, H, N, N]
    # Every frame sees itself, so no row is empty.
    mask = text_prefix_mask(frame_tile_mask(tuple(grid), group, global_frames, q.device), text)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bhje->bhie", weights, v.to(compute_dtype)).to(q.dtype)
