"""Bounded-memory PyTorch path for window attention on a 1-D, 2-D or 3-D token grid: tiles of queries, each with
the box of keys its window can reach.

The grid is cut into tiles (sized per window by `tile_sizes`: e.g. 64 tokens on a 1-D sequence, 4 x 4 or 8 x 8 on
an image, 1-4 frames x that on a video). Each
query tile gathers the keys of the box "tile ± the window's reach per dim" (clipped at the grid's borders by a
validity mask, never padded with keys), and takes exact softmax over them with the window's own token mask over
the gathered box. So a query sees exactly the keys of the reference's (N, N) mask while the work and memory are
O(N · box), not O(N²). Tiles are processed in chunks (kernels/_blockwise.py).
"""

from __future__ import annotations

import math

import torch

from .._blockwise import attend, chunk_size, compute_dtype, run_chunks, text_rows, with_text_keys
from .naive import offsets_inside


def reach(radius: float, shape: str) -> int:
    """The largest |Δ| along one dim that the window can include: ⌊r⌋ (square), the largest Δ with Δ² < r² (circle)."""
    if shape == "square":
        return math.floor(radius)
    delta = math.floor(radius) + 1
    while delta > 0 and delta * delta >= radius * radius:
        delta -= 1
    return delta


# Gathering a key (and building its masks) costs about as much as this many scores inside SDPA, on CPUs: fitted to
# 16K-token forwards (16 heads x 72) of swa (window 256) and local (circle r = 8), where it picks the fastest tiles.
GATHER_COST = 128


def tile_sizes(grid: tuple[int, ...], reaches: tuple[int, ...]) -> tuple[int, ...]:
    """Query tile per dim, minimising per query the scores (the key box, L) plus the gathered keys (L / tile volume).

    Smaller tiles waste fewer scores on keys outside the window; larger ones gather each key fewer times. Candidates:
    16-256 tokens on a 1-D sequence; 2-32 per spatial dim (the same for h and w); 1-4 frames in time.
    """
    if len(grid) == 1:
        candidates = [(t,) for t in (16, 32, 64, 128, 256)]
    else:
        spatial = [(t, t) for t in (2, 4, 8, 16, 32)]
        candidates = spatial if len(grid) == 2 else [(f, *s) for f in (1, 2, 4) for s in spatial]

    def cost(tiles: tuple[int, ...]) -> float:
        tiles = tuple(min(t, g) for t, g in zip(tiles, grid, strict=True))
        box = math.prod(min(t + 2 * r, g) for t, r, g in zip(tiles, reaches, grid, strict=True))
        padded = math.prod(math.ceil(g / t) * t for g, t in zip(grid, tiles, strict=True)) / math.prod(grid)
        return padded * box * (1 + GATHER_COST / math.prod(tiles))

    best = min(candidates, key=cost)
    return tuple(min(t, g) for t, g in zip(best, grid, strict=True))


def window_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, ...],
    radius: float,
    shape: str = "square",
    temporal_radius: int | None = None,
    text: int = 0,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over each query's window on the row-major grid, in fp32 (float64 stays float64).

    With text = T > 0 the first T tokens are a text prefix (CLEAR's rule): text queries see every key, grid queries
    every text key plus their window.
    """
    B, H, length, D = q.shape
    N = length - text
    DV = v.shape[-1]
    BH = B * H
    dtype = compute_dtype(q)
    device = q.device
    grid = tuple(grid)
    dims = len(grid)
    box = [reach(radius, shape)] * dims
    if temporal_radius is not None:
        box[0] = temporal_radius
    box = tuple(min(r, g - 1) for r, g in zip(box, grid, strict=True))
    tiles = tile_sizes(grid, box)
    counts = tuple(math.ceil(g / t) for g, t in zip(grid, tiles, strict=True))
    # The key box of a tile: its queries' reach, but never past the grid (shifted inward at the borders, so that
    # every box holds only grid tokens and small grids are not padded with empty slots).
    spans = tuple(min(t + 2 * r, g) for t, r, g in zip(tiles, box, grid, strict=True))
    n_tiles, Q, L = math.prod(counts), math.prod(tiles), math.prod(spans)

    # Per dim: query coordinates [count, tile] and key coordinates [count, span] of every tile, and their offsets.
    offsets, flat = [], None
    for i, (c, t, s, r, g) in enumerate(zip(counts, tiles, spans, box, grid, strict=True)):
        start = torch.arange(c, device=device) * t
        box_start = (start - r).clamp(0, g - s)
        keys = box_start[:, None] + torch.arange(s, device=device)  # [c, s], inside the grid
        queries = start[:, None] + torch.arange(t, device=device)  # [c, t] (past the grid: padding rows)
        offsets.append(keys[:, None, :] - queries[:, :, None])  # [c, t, s]: key − query
        view = [1] * (2 * dims)
        view[i], view[dims + i] = c, s
        flat = keys.view(view) if flat is None else flat * g + keys.view(view)
    key_index = flat.expand(*counts, *spans).reshape(n_tiles, L)  # [n_tiles, L]
    strides = [math.prod(counts[i + 1 :]) for i in range(dims)]

    def window_mask(start: int, stop: int) -> torch.Tensor:
        """[c, Q, L]: the window between each query and each key of the tiles [start, stop)."""
        tile = torch.arange(start, stop, device=device)
        deltas = []
        for i, (d, t, s) in enumerate(zip(offsets, tiles, spans, strict=True)):
            view = [stop - start] + [1] * (2 * dims)
            view[1 + i], view[1 + dims + i] = t, s
            deltas.append(d[(tile // strides[i]) % counts[i]].view(view))
        return offsets_inside(deltas, radius, shape, temporal_radius).expand(-1, *tiles, *spans).reshape(-1, Q, L)

    # Query tiles: the grid zero-padded to whole tiles, cut into [n_tiles, Q] (padding rows are dropped at the end).
    padded = tuple(c * t for c, t in zip(counts, tiles, strict=True))

    def to_tiles(x: torch.Tensor, width: int) -> torch.Tensor:
        x = x.to(dtype).reshape(BH, *grid, width)
        pad = []
        for g, p in zip(reversed(grid), reversed(padded), strict=True):
            pad += [0, p - g]
        x = torch.nn.functional.pad(x, [0, 0, *pad]) if padded != grid else x
        split = [BH]
        for c, t in zip(counts, tiles, strict=True):
            split += [c, t]
        order = [0, *range(1, 2 * dims, 2), *range(2, 2 * dims + 1, 2), 2 * dims + 1]
        return x.reshape(*split, width).permute(order).reshape(BH, n_tiles, Q, width)

    qt = to_tiles(q[:, :, text:], D)
    qf = q.to(dtype).reshape(BH, length, D)
    kf = k.to(dtype).reshape(BH, length, D)
    vf = v.to(dtype).reshape(BH, length, DV)
    scale = D**-0.5

    def chunk(start: int, stop: int, qt: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
        index = key_index[start:stop] + text  # [c, L]
        mask = window_mask(start, stop)  # [c, Q, L]
        keys, values, mask = with_text_keys(kf[:, index], vf[:, index], mask, kf[:, :text], vf[:, :text])
        return attend(qt[:, start:stop], keys, values, mask, scale)  # [BH, c, Q, DV]

    step = chunk_size(n_tiles, BH * Q * (text + L))
    o = torch.cat(run_chunks(chunk, n_tiles, step, qt, kf, vf), dim=1)  # [BH, n_tiles, Q, DV]
    # Back from tiles to the padded grid, then crop to the grid.
    o = o.reshape(BH, *counts, *tiles, DV)
    order = [0]
    for i in range(dims):
        order += [1 + i, 1 + dims + i]
    o = o.permute(*order, 2 * dims + 1).reshape(BH, *padded, DV)
    o = o[(slice(None), *(slice(0, g) for g in grid))].reshape(BH, N, DV)
    o = torch.cat([*text_rows(qf, kf, vf, text, scale), o], dim=1) if text else o
    return o.reshape(B, H, length, DV).to(q.dtype)
