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

from .._blockwise import attend, chunk_size, compute_dtype, pad_tokens, run_chunks, text_rows, with_text_keys


def frame_tile_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    group: int = 1,
    global_frames: int = 1,
    text: int = 0,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over the frames each query's frame sees, in fp32 (float64 stays float64).

    With text = T > 0 the first T tokens are a text prefix (CLEAR's rule): text queries see every key, every query
    sees the text keys.
    """
    B, H, length, D = q.shape
    DV = v.shape[-1]
    BH = B * H
    dtype = compute_dtype(q)
    frames, h, w = grid
    S = h * w
    G = min(global_frames, frames)
    scale = D**-0.5
    qf = q.to(dtype).reshape(BH, length, D)
    kf = k.to(dtype).reshape(BH, length, D)
    vf = v.to(dtype).reshape(BH, length, DV)
    # Text queries and the global frames' queries (the first text + G·S rows) see every key.
    parts = text_rows(qf, kf, vf, text + G * S, scale)
    # Keys every other query sees: the text, then the global frames (contiguous, right after the text).
    seen = text + G * S

    rest = frames - G
    if rest > 0:  # the other frames, a group at a time: global keys + the group's keys
        n_groups = math.ceil(rest / group)
        span = group * S
        qg = pad_tokens(qf[:, seen:], n_groups * span).reshape(BH, n_groups, span, D)
        kg = pad_tokens(kf[:, seen:], n_groups * span).reshape(BH, n_groups, span, D)
        vg = pad_tokens(vf[:, seen:], n_groups * span).reshape(BH, n_groups, span, DV)
        own_ok = (torch.arange(n_groups * span, device=q.device) < rest * S).view(n_groups, span)

        def grouped(start, stop, qg, kg, vg, kf, vf):
            mask = own_ok[start:stop, None, :]  # [c, 1, span]
            keys, values, mask = with_text_keys(kg[:, start:stop], vg[:, start:stop], mask, kf[:, :seen], vf[:, :seen])
            return attend(qg[:, start:stop], keys, values, mask, scale)  # [BH, c, span, DV]

        step = chunk_size(n_groups, BH * span * (seen + span))
        o = torch.cat(run_chunks(grouped, n_groups, step, qg, kg, vg, kf, vf), dim=1)
        parts.append(o.reshape(BH, n_groups * span, DV)[:, : rest * S])
    return torch.cat(parts, dim=1).reshape(B, H, length, DV).to(q.dtype)
