"""Frame-tile attention (Efficient-vDiT's "attention tile" pattern) on a video token grid (frames, h, w): a query
sees the keys of its own group of frames and of a few global frames; the global frames' queries see every key.

Frame pattern, for query frame f and key frame f' (frames numbered from 0, tokens frame-major):

    keep(f, f')  ⇔  f < G  or  f' < G  or  ⌊(f − G) / g⌋ = ⌊(f' − G) / g⌋,    G = global_frames, g = group

Efficient-vDiT's mask "k:(T − k)" on T latent frames is group = 1, global_frames = k. There is no Triton kernel:
every device runs the bounded-memory PyTorch path (blockwise.py); DIT_GRAFT_KERNELS=naive forces the dense
reference.
"""

from __future__ import annotations

import torch

from .._checks import check_qkv
from .._dispatch import pytorch_path
from .blockwise import frame_tile_attention_blockwise
from .naive import frame_pattern, frame_tile_attention_naive, frame_tile_mask

__all__ = ["frame_pattern", "frame_tile_attention", "frame_tile_mask", "frame_tile_pairs"]


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def frame_tile_pairs(frames: int, tokens_per_frame: int, group: int, global_frames: int) -> int:
    """Query-key token pairs the pattern keeps (exact; for FLOP counts)."""
    return int(frame_pattern(frames, group, global_frames).sum()) * tokens_per_frame * tokens_per_frame


def frame_tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    group: int = 1,
    global_frames: int = 1,
    *,
    text: int = 0,
) -> torch.Tensor:
    """Frame-tile softmax attention; q, k [B, H, N, d], v [B, H, N, dv] → [B, H, N, dv], N = frames · h · w.

    Scale 1/√d; computed in fp32 (float64 stays float64), returned in q's dtype. group ≥ 1 frames per group,
    global_frames ≥ 0 (0: block-diagonal groups only). text = T > 0: the first T tokens are a text prefix, the grid
    holds the N − T after it, text rows and columns stay dense (CLEAR's rule).
    """
    check_qkv("frame_tile_attention", q, k, v)
    if isinstance(text, bool) or not isinstance(text, int) or not 0 <= text < q.shape[2]:
        raise ValueError(f"frame_tile_attention: text must be an int in [0, N={q.shape[2]}), got {text!r}")
    if not isinstance(grid, tuple | list) or len(grid) != 3 or not all(_positive_int(g) for g in grid):
        raise ValueError(f"frame_tile_attention: grid must be (frames, h, w), three positive ints, got {grid!r}")
    if grid[0] * grid[1] * grid[2] != q.shape[2] - text:
        after = f" after {text} text tokens" if text else ""
        raise ValueError(
            f"frame_tile_attention: grid {tuple(grid)} holds {grid[0] * grid[1] * grid[2]} tokens, "
            f"q has N={q.shape[2]}{after}"
        )
    if not _positive_int(group):
        raise ValueError(f"frame_tile_attention: group must be an int ≥ 1, got {group!r}")
    if isinstance(global_frames, bool) or not isinstance(global_frames, int) or global_frames < 0:
        raise ValueError(f"frame_tile_attention: global_frames must be an int ≥ 0, got {global_frames!r}")
    if pytorch_path(q) == "naive":
        return frame_tile_attention_naive(q, k, v, tuple(grid), group, global_frames, text)
    return frame_tile_attention_blockwise(q, k, v, tuple(grid), group, global_frames, text)
