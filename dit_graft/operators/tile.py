"""`tile`: frame-tile attention over a video's frames (Efficient-vDiT's "attention tile", Ding et al. 2025).

On a 3-D token grid (frames, h, w), tokens frame-major, query frame f sees key frame f' when

    f < G  or  f' < G  or  ⌊(f − G) / g⌋ = ⌊(f' − G) / g⌋          G = `global_frames`, g = `group`

    o_i = Σ_{j : keep(frame(i), frame(j))} softmax_j(q_i·k_j / √d) v_j      (exact softmax over the kept frames)

The first G frames are global: every query sees them and their queries see every frame. The other frames are
cut into groups of g consecutive frames (the last group may be short), and a query sees its own group. Work is
linear in the number of frames for fixed G and g. Efficient-vDiT's masks "k:(T − k)" on T latent frames
(its Table 1: 4:4 ... 1:7 at 29 frames, 12:12 ... 3:21 at 93 frames) are `group: 1, global_frames: k`; the
defaults are its sparsest, 1:(T − 1). `global_frames` ≥ frames, or a group holding every non-global frame, is
softmax attention. With a text prefix (a joint text-video sequence), text rows and columns stay dense
(CLEAR's rule, `TokenLayout`).

Departures from the paper: the paper searches a mask per layer on calibration data and distils afterwards;
here the pattern is the recipe's choice per site (one option set, or per-layer through the recipe's layer
selection). This follows the paper (arXiv 2502.06155v2; its Fig. 3: mask "2:6" keeps the main-diagonal frame
blocks and 2 global reference latent frames); Efficient-vDiT's own kernel and repository
(hao-ai-lab/Efficient-vDiT) could not be read from this project's sources. The paper does not say which frames
are the reference ones: here the first G (its Fig. 1c measures attention against the first frame; no count
depends on the choice). Checked against all nine masks of
its Table 1: dense global rows and columns plus the diagonal are 0.8–1.5 points sparser than reported (1:7 on 8
frames keeps 22 of 64 frame pairs, 65.6% against 64.38% measured on its block kernel); global keys alone would
be 10–25 points sparser, so the global frames' queries see every frame.

Paths: `dit_graft.kernels.frame_tile_attention` — the bounded-memory PyTorch path on every device (global
rows dense in chunks, each group's queries over the global and own-group keys), no Triton kernel yet.

FLOPs (the operator's formula): 4·P·C over the P kept query-key pairs (exact: kept frame pairs × (h·w)²).

Inheritance: the family's adapter uses the attention module's own projections and norms; the core adds no
parameters.
"""

from __future__ import annotations

from pydantic import Field

from dit_graft.kernels import frame_tile_attention
from dit_graft.kernels.frame_tile import frame_tile_pairs
from dit_graft.model.attention import AttentionCore, AttentionNeeds
from dit_graft.model.layout import TokenLayout
from dit_graft.operators.base import Case, Operator, Options, Site, attention_pairs_flops, register


class TileOptions(Options):
    """Options of the `tile` operator."""

    group: int = Field(default=1, ge=1, description="g: consecutive non-global frames per group")
    global_frames: int = Field(default=1, ge=0, description="G: the first G frames, seen by and seeing every frame")


class TileCore(AttentionCore):
    """Frame-tile softmax attention on a (frames, h, w) grid (+ dense text rows and columns)."""

    op = "tile"

    def __init__(self, options: TileOptions) -> None:
        super().__init__(options)
        self.group = options.group
        self.global_frames = options.global_frames

    def forward(self, q, k, v, layout: TokenLayout, key_mask=None):
        if layout.is_cross:
            raise ValueError("the tile operator does not take cross-attention")
        if key_mask is not None:
            raise ValueError("the tile operator takes no key mask on self-attention")
        grid = layout.require_grid(self.op, dims=(3,))
        return frame_tile_attention(q, k, v, grid, self.group, self.global_frames, text=layout.text)


def tile_flops(site: Site, tokens: int, options: TileOptions) -> int:
    """4·P·C over the P kept query-key pairs of the site's (frames, h, w) grid (an image grid counts as one frame,
    where the operator is softmax attention; sites with image grids refuse it at plan time)."""
    grid = site.grid.resolve(tokens)
    frames, h, w = grid if len(grid) == 3 else (1, *grid)
    return attention_pairs_flops(frame_tile_pairs(frames, h * w, options.group, options.global_frames), site.dim)


register(
    Operator(
        name="tile",
        site="attention",
        summary="Exact softmax within groups of frames plus a few global frames on the video grid; inherited "
        "q/k/v/out (Efficient-vDiT's attention tile).",
        options=TileOptions,
        core=lambda site, options: TileCore(options),
        needs=AttentionNeeds(grid_dims=(3,), text=("none", "prefix")),
        paper="Efficient-vDiT (Ding et al. 2025), attention tile",
        flops=tile_flops,
        cases=(
            Case({"global_frames": 10_000}, exact=True),
            Case({"group": 1, "global_frames": 1}),
            Case({"group": 2, "global_frames": 0}),
        ),
    )
)
