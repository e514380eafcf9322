"""Reading weights and building diffusers models: safetensors without unpickling, strict checked loads."""

from __future__ import annotations

import argparse
import pickle
import re
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from dit_graft.errors import IntegrityError, RecipeError


def model_class(class_name: str) -> type:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise RecipeError(f"unknown diffusers class {class_name!r}")
    return cls


# config.json entries that are about loading, not the architecture (an export's `auto_map` for stock diffusers)
LOADING_KEYS = ("auto_map",)


def build_from_config(config: dict[str, Any], meta: bool = False) -> nn.Module:
    """Instantiates the config's diffusers class with random weights, or on the meta device."""
    cls = model_class(config["_class_name"])
    config = {k: v for k, v in config.items() if k not in LOADING_KEYS}
    if meta:
        with init_empty_weights(include_buffers=True):
            return cls.from_config(config)
    return cls.from_config(config)


def build_without_weights(config: dict[str, Any], meta: bool = False) -> nn.Module:
    """The config's model with its parameters on the meta device (to be assigned); buffers computed for real,
    unless `meta` (a dry run: everything on meta)."""
    cls = model_class(config["_class_name"])
    config = {k: v for k, v in config.items() if k not in LOADING_KEYS}
    with init_empty_weights(include_buffers=meta):
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


def _unpickle_refusal(err: pickle.UnpicklingError) -> str:
    """The reason torch's weights-only unpickler gave (e.g. the code-running global it met), on one line."""
    m = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(err))
    return f" ({m.group(0)})" if m else ""


def read_checkpoint(path: str | PathLike) -> dict[str, torch.Tensor]:
    """A flat name → tensor dict from .safetensors or weights-only .pt/.pth/.bin (training nesting unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            obj = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise IntegrityError(f"{path}: corrupt or truncated safetensors file ({err})") from err
    elif suffix in (".pt", ".pth", ".bin"):
        try:
            # DiT's train.py stores its argparse Namespace under "args"; Namespace is a plain attribute bag.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise IntegrityError(
                f"{path}: refused to unpickle: not a tensors-only pickle{_unpickle_refusal(err)}"
            ) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise IntegrityError(f"{path}: unreadable torch checkpoint ({reason})") from err
    else:
        raise IntegrityError(f"{path}: unknown checkpoint suffix {suffix!r} (use .safetensors, .pt, .pth or .bin)")

    if isinstance(obj, dict):
        for nest in ("ema", "model", "state_dict"):  # EMA weights are the ones DiT samples with
            if isinstance(obj.get(nest), dict):
                obj = obj[nest]
                break
    if not isinstance(obj, dict):
        raise IntegrityError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise IntegrityError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return obj
