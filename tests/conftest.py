"""Shared fixtures: tiny diffusers DiTs saved to disk and recipes that point at them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton picks interpreter or GPU mode when triton is first imported (diffusers imports it), so the
# kernels' CPU tests need TRITON_INTERPRET before anything below pulls triton in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402
from diffusers import DiTTransformer2DModel  # noqa: E402


def _tiny_config(family: str) -> dict:
    """A family's tiny config (`Family.tiny_config`, the one place they live), as constructor kwargs."""
    from dit_graft.families import FAMILIES

    return {k: v for k, v in FAMILIES.get(family).tiny_config().items() if not k.startswith("_")}


TINY_DIT = _tiny_config("dit")


def tiny_dit(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    """A 2-block DiT on 8x8 single-channel images (a 4x4 token grid) with non-trivial weights."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**TINY_DIT, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.normal_(0, 0.05)  # adaLN-Zero starts at zero: make every block matter
    return model.eval()


def tiny_dit_inputs(batch: int = 2, seed: int = 1) -> dict:
    """Seeded forward kwargs for `tiny_dit()` (8x8 single-channel images, 4 classes)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 1, 8, 8, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        class_labels=torch.randint(0, 4, (batch,), generator=g),
    )


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-dit"
    tiny_dit().save_pretrained(path, safe_serialization=True)
    return path


def tiny_recipe(source: Path | str, out: Path | str, **distill) -> dict:
    """A recipe grafting every attention layer to linear attention, with a tiny distillation budget."""
    return {
        "name": "tiny",
        "model": {"source": str(source)},
        "graft": [{"site": "attention", "layers": "all", "op": "linear", "options": {"dwconv": 3}}],
        "distill": {
            "steps": 4,
            "batch_size": 4,
            "pool_size": 8,
            "pool_steps": 2,
            "warmup": 1,
            "checkpoint_every": 2,
            "log_every": 1,
            **distill,
        },
        "export": {"out": str(out)},
    }


@pytest.fixture
def write_recipe(tmp_path):
    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def op_of(processor) -> str:
    """The operator that built an installed processor or module ("linear", ...), else its class name (stock)."""
    from dit_graft.operators.base import installed_operator

    found = installed_operator(processor)
    return found[0].name if found is not None else type(processor).__name__


def grafted(core, grid: tuple[int, ...] | None = None):
    """A core on a plain self-attention module: DiT's adapter around it, on a recorded `grid` (None: square)."""
    from dit_graft.families.dit import SelfAttentionAdapter
    from dit_graft.model.attention import GraftedAttnProcessor
    from dit_graft.model.site import TokenGrid

    return GraftedAttnProcessor(SelfAttentionAdapter(TokenGrid(grid)), core)
