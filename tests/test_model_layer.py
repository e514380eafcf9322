"""The model layer on its own: token layouts (CLEAR's rule), needs against caps, the checkpoint-layout registry."""

from __future__ import annotations

import pytest
import torch

import dit_graft.families  # noqa: F401 - the families register their checkpoint layouts
from dit_graft.model.attention import AttentionNeeds
from dit_graft.model.checkpoints import detect_layout
from dit_graft.model.layout import TokenLayout
from dit_graft.model.site import AttentionCaps


def test_a_layout_counts_its_tokens():
    joint = TokenLayout(text=3, grid=(2, 4))
    assert (joint.image, joint.length, joint.keys, joint.dims, joint.is_cross) == (8, 11, 11, 2, False)
    cross = TokenLayout(grid=(2, 3, 4), context=7)
    assert (cross.image, cross.length, cross.keys, cross.dims, cross.is_cross) == (24, 24, 7, 3, True)
    assert TokenLayout(tokens=5).image == 5 and TokenLayout(tokens=5).dims is None
    with pytest.raises(ValueError, match="either a text prefix or a cross-attention context"):
        TokenLayout(text=2, grid=(2, 2), context=3)
    with pytest.raises(ValueError, match="cannot infer a token grid for 6 tokens"):
        TokenLayout(tokens=6).require_grid("local")
    with pytest.raises(ValueError, match="works on 2-D grids"):
        TokenLayout(grid=(2, 2, 2)).require_grid("local", dims=(2,))


def test_clear_rule_text_rows_and_columns_stay_dense():
    layout = TokenLayout(text=2, grid=(1, 3))
    image = torch.eye(3, dtype=torch.bool)  # each image query sees itself only
    mask = layout.pair_mask(image)
    assert mask.shape == (5, 5)
    assert mask[:2].all() and mask[:, :2].all()  # text queries see every key; every query sees the text
    assert torch.equal(mask[2:, 2:], image)
    assert layout.pair_mask(None) is None and TokenLayout(grid=(1, 3)).pair_mask(image) is image


def test_block_maps_cover_the_text_when_it_fills_whole_blocks():
    blocks = torch.tensor([[True, False], [False, True]]).expand(1, 1, 2, 2)
    joint = TokenLayout(text=4, grid=(2, 4)).block_map(blocks, block=4)
    assert joint.shape == (1, 1, 3, 3) and joint[..., 0, :].all() and joint[..., :, 0].all()
    assert torch.equal(joint[..., 1:, 1:], blocks)
    assert TokenLayout(text=3, grid=(2, 4)).block_map(blocks, block=4) is None  # text and image would share one


@pytest.mark.parametrize(
    "needs, caps, reason",
    [
        (AttentionNeeds(), AttentionCaps(keys=True, grid_dims=2, text="prefix"), None),
        (AttentionNeeds(keys=False, text=("none",)), AttentionCaps(keys=True, text="prefix"), "has no keys"),
        (AttentionNeeds(text=("none", "prefix")), AttentionCaps(keys=True, text="cross"), "cross-attention"),
        (AttentionNeeds(grid_dims=(2,)), AttentionCaps(grid_dims=3), "2-D token grids, and the site's grid is 3-D"),
        (AttentionNeeds(grid_dims=(2, 3)), AttentionCaps(grid_dims=None), "needs a token grid"),
        (AttentionNeeds(), None, "not an attention site"),
    ],
)
def test_needs_against_caps_give_the_reason(needs, caps, reason):
    got = needs.refusal(caps)
    assert got is None if reason is None else reason in got


def test_checkpoint_layouts_are_detected_from_key_names():
    assert detect_layout({"img_in.weight", "double_blocks.0.img_mod.lin.weight"}).name == "bfl-flux"
    assert detect_layout({"x_embedder.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed"}).name == "original-dit"
    assert detect_layout({"transformer_blocks.0.attn1.to_q.weight"}).name == "diffusers"
    assert detect_layout({"down.0.conv.weight"}) is None
    assert detect_layout({"img_in.weight", "double_blocks.0.x"}, pickle=True) is None  # BFL files are safetensors
