"""Reading weights and building diffusers models: safetensors without unpickling, strict checked loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn

from dit_graft.errors import IntegrityError, RecipeError


def model_class(class_name: str) -> type:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise RecipeError(f"unknown diffusers class {class_name!r}")
    return cls


def build_from_config(config: dict[str, Any], meta: bool = False) -> nn.Module:
    """Instantiates the config's diffusers class with random weights, or on the meta device."""
    cls = model_class(config["_class_name"])
    if meta:
        with init_empty_weights(include_buffers=True):
            return cls.from_config(config)
    return cls.from_config(config)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Reads a safetensors file; truncated or corrupt files raise IntegrityError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: missing weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IntegrityError(f"{path}: corrupt or truncated safetensors ({str(e).splitlines()[0]})") from None


def safetensors_header(path: Path) -> dict[str, list[int]]:
    """Key → shape of every tensor in a safetensors file, from its header alone (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IntegrityError(f"{path}: corrupt or truncated safetensors ({str(e).splitlines()[0]})") from None


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Loads `state` strictly: every key present, none extra, every shape equal; errors name the key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        raise IntegrityError(
            f"{where}: missing key {missing[0]}" + (f" (+{len(missing) - 1} more)" if missing[1:] else "")
        )
    if extra:
        raise IntegrityError(
            f"{where}: unexpected key {extra[0]}" + (f" (+{len(extra) - 1} more)" if extra[1:] else "")
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise IntegrityError(f"{where}: {k} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)


def meta_state(header: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Meta tensors of a header's shapes: what converters check keys and shapes on without reading weights."""
    return {k: torch.empty(tuple(s), device="meta") for k, s in header.items()}


def assign_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Puts a converted state dict (every key and shape already checked) into a model built without weights.

    Tensors in the model's dtypes; a tensor that fills several keys (shared original embedders) is copied per key,
    so that no two parameters share storage.
    """
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.to(dtypes[k])
        if id(v) in seen or v.data_ptr() in seen:
            v = v.clone()
        seen.update((id(v), v.data_ptr()))
        out[k] = v
    model.load_state_dict(out, strict=True, assign=True)
    return model
