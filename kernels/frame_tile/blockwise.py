"""Bounded-memory PyTorch path for frame-tile attention.

Queries of the global frames see every key: dense attention, chunked over query rows. The other frames are cut
into groups of `group` frames (the last group padded to a whole group and masked); each group's queries see the
global frames' keys followed by their own group's keys, gathered per chunk of groups. Work and memory are
O(N · (global_frames + group) · h · w) plus the global rows' O(global_frames · h · w · N), never O(N²) for a
fixed number of global frames.
"""

from __future__ import annotations

import math

import torch

from .._blockwise import attend, chunk_size, compute_dtype, pad_tokens, run_chunks


def frame_tile_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    group: int = 1,
    global_frames: int = 1,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over the frames each query's frame sees, in fp32 (float64 stays float64)."""
    B, H, N, D = q.shape
    DV = v.shape[-1]
    BH = B * H
    dtype = compute_dtype(q)
    frames, h, w = grid
    S = h * w
    G = min(global_frames, frames)
    scale = D**-0.5
    qf, kf, vf = q.to(dtype).reshape(BH, N, D), k.to(dtype).reshape(BH, N, D), v.to(dtype).reshape(BH, N, DV)
    parts = []

    if G > 0:  # global frames' queries: every key
        rows = G * S

        def dense(start: int, stop: int, qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
            return attend(qf[:, start:stop], kf, vf, None, scale)

        parts += run_chunks(dense, rows, chunk_size(rows, BH * N), qf, kf, vf)

    rest = frames - G
    if rest > 0:  # the other frames, a group at a time: global keys + the group's keys
        n_groups = math.ceil(rest / group)
        span = group * S
        qg = pad_tokens(qf[:, G * S :], n_groups * span).reshape(BH, n_groups, span, D)
        kg = pad_tokens(kf[:, G * S :], n_groups * span).reshape(BH, n_groups, span, D)
        vg = pad_tokens(vf[:, G * S :], n_groups * span).reshape(BH, n_groups, span, DV)
        own_ok = (torch.arange(n_groups * span, device=q.device) < rest * S).view(n_groups, span)
        global_ok = torch.ones(n_groups, G * S, dtype=torch.bool, device=q.device)
        key_ok = torch.cat([global_ok, own_ok], dim=1)  # [n_groups, (G + group) · S]

        def grouped(start, stop, qg, kg, vg, kf, vf):
            c = stop - start
            keys = torch.cat([kf[:, None, : G * S].expand(BH, c, G * S, D), kg[:, start:stop]], dim=2)
            values = torch.cat([vf[:, None, : G * S].expand(BH, c, G * S, DV), vg[:, start:stop]], dim=2)
            mask = key_ok[start:stop, None, :]  # [c, 1, (G + group) · S]
            return attend(qg[:, start:stop], keys, values, mask, scale)  # [BH, c, span, DV]

        step = chunk_size(n_groups, BH * span * (G + group) * S)
        o = torch.cat(run_chunks(grouped, n_groups, step, qg, kg, vg, kf, vf), dim=1)
        parts.append(o.reshape(BH, n_groups * span, DV)[:, : rest * S])
    return torch.cat(parts, dim=1).reshape(B, H, N, DV).to(q.dtype)
