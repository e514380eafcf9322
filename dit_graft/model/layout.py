"""How the tokens of one attention call are laid out: a text prefix, an n-D grid, or a cross-attention context.

`TokenLayout` is what a family's attention adapter hands an operator's core together with q, k, v
(`dit_graft.model.attention`). The core computes attention on [B, H, N, d] and reads from the layout where
the grid tokens are and where the text is. CLEAR's rule for joint text-image attention is a property of the
layout and lives here, once (`TokenLayout.pair_mask`, `TokenLayout.block_map`): with `text` = T > 0, the text
query rows and the text key columns stay dense softmax; an operator's pattern (a window, a band, kept blocks)
applies to image-query × image-key pairs only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """The token layout of one attention call.

    - `text`: T text tokens in FRONT of the grid tokens in the q/k/v sequence (joint attention, FLUX); 0: none
    - `grid`: the shape of the grid tokens, (h, w) or (frames, h, w), row-major; None: unknown
    - `context`: cross-attention: the keys/values are `context` text tokens (no grid on the keys); None: self
    - `tokens`: the number of grid tokens when `grid` is None (a grid, when known, says it itself)
    """

    text: int = 0
    grid: tuple[int, ...] | None = None
    context: int | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if self.text and self.context is not None:
            raise ValueError("a token layout has either a text prefix or a cross-attention context, not both")
        if self.grid is not None and self.tokens is not None and math.prod(self.grid) != self.tokens:
            raise ValueError(f"grid {self.grid} holds {math.prod(self.grid)} tokens, not {self.tokens}")

    @property
    def image(self) -> int:
        """N, the grid (image or video) tokens: the queries of a cross-attention call, the rows after the text."""
        if self.grid is not None:
            return math.prod(self.grid)
        if self.tokens is None:
            raise ValueError("a token layout needs a grid or a token count")
        return self.tokens

    @property
    def length(self) -> int:
        """The length of the query sequence: T + N."""
        return self.text + self.image

    @property
    def keys(self) -> int:
        """The length of the key sequence: the context for cross-attention, else the query sequence."""
        return self.context if self.context is not None else self.length

    @property
    def dims(self) -> int | None:
        """How many grid dimensions (2: images, 3: video); None when the grid is unknown."""
        return None if self.grid is None else len(self.grid)

    @property
    def is_cross(self) -> bool:
        return self.context is not None

    def require_grid(self, op: str, dims: tuple[int, ...] = (2, 3)) -> tuple[int, ...]:
        """The grid, or a ValueError saying that operator `op` needs one of `dims` dimensions."""
        if self.grid is None:
            raise ValueError(
                f"the {op} operator needs the token grid of the call: cannot infer a token grid for {self.tokens} "
                "tokens (no grid recorded, not square)"
            )
        if len(self.grid) not in dims:
            raise ValueError(f"the {op} operator works on {' or '.join(f'{d}-D' for d in dims)} grids, not {self.grid}")
        return self.grid

    # CLEAR's rule, once: text rows and columns dense, the operator's pattern on the image pairs.

    def pair_mask(self, image: torch.Tensor | None) -> torch.Tensor | None:
        """The boolean (..., L, L) mask of an operator whose (..., N, N) mask over the image pairs is `image`.

        Text query rows see every key; image query rows see every text key and the image keys `image` keeps.
        None (every image key visible) stays None. Without text the image mask is the mask.
        """
        if image is None or self.text == 0:
            return image
        t, length = self.text, self.length
        mask = image.new_ones(*image.shape[:-2], length, length)
        mask[..., t:, t:] = image
        return mask

    def block_map(self, image: torch.Tensor, block: int) -> torch.Tensor | None:
        """The (B, H, nb, nb) block map over the whole sequence for an image-block map `image`, or None.

        Possible when the text fills whole blocks (T a multiple of `block`): text blocks are then kept by every
        query block and text query blocks keep every block. None otherwise (text and image tokens would share a
        block): the caller expands the image map to tokens and uses `pair_mask`.
        """
        if self.text == 0:
            return image
        if self.text % block:
            return None
        tb = self.text // block
        nb = image.shape[-1]
        index = image.new_ones(*image.shape[:-2], tb + nb, tb + nb)
        index[..., tb:, tb:] = image
        return index

    def split(self, x: torch.Tensor, dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """(text part, image part) of a sequence tensor along `dim` (the token dimension; [B, H, N, d]: 2)."""
        return x.narrow(dim, 0, self.text), x.narrow(dim, self.text, x.shape[dim] - self.text)
