"""What an export records so that `dit-graft verify` (dit_graft.verify) can check it later.

At export time (`record`, called by `dit_graft.export.export` on the finished temporary directory):

    verify.safetensors   the inputs of one seeded forward (the family's example inputs at a small latent
                         size, hidden states and text drawn from a seeded generator) and the output the
                         export, reloaded by the exporter's loader on the CPU, gives for them
    graft.json           "verify": the seed, the latent size, the input layout, the device and dtype
    integrity.json       sha256 and size of every other file of the export (graft.json included)

This module sits below both `export` (which records) and `verify` (which checks): the loader is an argument.
Reloading costs a second copy of the model in host memory at export time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dit_graft import __version__

VERIFY_NAME = "verify.safetensors"
INTEGRITY_NAME = "integrity.json"
SEED = 0
MAX_LATENT = 32  # latent size of the recorded forward (smaller models use their own)
RANDOM_INPUTS = ("hidden_states", "pooled_projections", "encoder_hidden_states_image")
TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != INTEGRITY_NAME
    )


def seeded_inputs(model, seed: int = SEED) -> tuple[dict[str, Any], int | None]:
    """The family's example inputs at a small latent size, with hidden states and text drawn from `seed`."""
    from dit_graft.families import family_for

    family = family_for(model)
    size = family.latent_shape(model)[-1]
    resolution = None if size <= MAX_LATENT else MAX_LATENT
    inputs = family.example_inputs(model, 1, resolution, "cpu")
    gen = torch.Generator().manual_seed(seed)

    def fill(name: str, value):
        if isinstance(value, dict):
            return {k: fill(f"{name}.{k}", v) for k, v in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point() and any(w in name for w in RANDOM_INPUTS):
            return torch.randn(value.shape, generator=gen).to(value.dtype)
        if name == "timestep":  # mid-trajectory: 500 of 1000 steps, or σ = 0.5 for flow models
            return torch.full_like(value, 0.5 if value.is_floating_point() else 500)
        return value

    return {k: fill(k, v) for k, v in inputs.items()}, resolution


def _flatten(inputs: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(layout, tensors): the layout is JSON ("tensor" where a tensor goes), the tensors keyed input.<path>."""
    layout, tensors = {}, {}
    for k, v in inputs.items():
        if isinstance(v, dict):
            layout[k], sub = _flatten(v, f"{prefix}{k}.")
            tensors.update(sub)
        elif isinstance(v, torch.Tensor):
            layout[k] = "tensor"
            tensors[f"input.{prefix}{k}"] = v.detach().cpu().contiguous()
        else:
            layout[k] = {"value": v}
    return layout, tensors


def _unflatten(layout: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in layout.items():
        if v == "tensor":
            out[k] = tensors[f"input.{prefix}{k}"]
        elif isinstance(v, dict) and set(v) == {"value"}:
            out[k] = v["value"]
        else:
            out[k] = _unflatten(v, tensors, f"{prefix}{k}.")
    return out


def _forward(model, inputs: dict[str, Any]) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    inputs = {
        k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v)) for k, v in inputs.items()
    }
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out.float()


def record(directory: Path, load: Callable[[Path, str], Any], graft_name: str) -> None:
    """Records the seeded forward and every file's checksum in a finished export directory (before it is committed).

    `load(directory, device)` reloads the export as a user would (`dit_graft.export.from_pretrained`); `graft_name`
    is the plan file the "verify" entry is added to.
    """
    directory = Path(directory)
    model = load(directory, "cpu")
    inputs, resolution = seeded_inputs(model)
    output = _forward(model, inputs)
    del model
    layout, tensors = _flatten(inputs)
    save_file({**tensors, "output": output.contiguous()}, str(directory / VERIFY_NAME), metadata={"format": "pt"})
    graft_file = directory / graft_name
    graft = json.loads(graft_file.read_text())
    graft["verify"] = {
        "file": VERIFY_NAME,
        "seed": SEED,
        "latent_size": resolution,
        "inputs": layout,
        "device": "cpu",
        "torch": torch.__version__,
    }
    graft_file.write_text(json.dumps(graft, indent=2))
    files = {
        name: {"sha256": sha256(directory / name), "bytes": (directory / name).stat().st_size}
        for name in _files(directory)
    }
    (directory / INTEGRITY_NAME).write_text(json.dumps({"dit_graft_version": __version__, "files": files}, indent=2))
