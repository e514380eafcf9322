"""dit_graft.kernels: attention kernels (Triton on CUDA; bounded-memory PyTorch paths and dense references
everywhere)."""

from .block_sparse import block_sparse_attention, topk_block_index
from .frame_tile import frame_tile_attention
from .linear_attention import linear_attention
from .sla import sla_attention, sla_block_index
from .tile import tile_attention
from .window import window_attention

__all__ = [
    "block_sparse_attention",
    "frame_tile_attention",
    "linear_attention",
    "sla_attention",
    "sla_block_index",
    "tile_attention",
    "topk_block_index",
    "window_attention",
]
