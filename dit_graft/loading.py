"""Loading teachers and checkpoints: diffusers directories, pipeline directories, hub ids, single files.

Every weight file is read without unpickling (safetensors; `.pt` only through
`torch.load(weights_only=True)`), and every key and shape is checked before the model is touched.

A single `.safetensors` file is recognised by its key names, read from the header alone
(`checkpoint_layout`), against the checkpoint-layout registry (`dit_graft.model.checkpoints`) that the
families fill: Black Forest Labs' FLUX layout, the original facebookresearch DiT layout, Wan's original
layout, ... and diffusers' own layout (registered by the model layer itself). A layout reads its config off
the checkpoint's shapes where it can (`infer_config`); a local config directory (`model.config` in a recipe: a
diffusers model or pipeline directory, or `bundled:configs/NAME`) overrides it, and diffusers' layout needs
one. Weights-only torch pickles (`.pt`/`.pth`/`.bin`) are read as the layouts that accept them. Anything else
is refused with one line naming the file and its first keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_graft.errors import InputError, IntegrityError
from dit_graft.model.checkpoints import LAYOUTS, detect_layout
from dit_graft.model.io import (  # noqa: F401 - re-exported: the loading API
    assign_state,
    build_from_config,
    build_without_weights,
    load_state_dict_checked,
    meta_state,
    model_class,
    read_checkpoint,
    read_safetensors,
    safetensors_header,
)

ASSETS = Path(__file__).parent / "assets"
BUNDLED_PREFIX = "bundled:"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


CONFIGS = "configs"


def bundled_models() -> list[str]:
    """Names of the models that ship inside the package (usable as `bundled:NAME`).

    `configs/NAME` entries are config-only (no weights): full-size architectures for `--dry-run`, `validate`
    and `inspect` on the meta device; their config's `_name_or_path` names the hub id to convert for real.
    """
    if not ASSETS.is_dir():
        return []
    dirs = [p for p in ASSETS.iterdir() if p.is_dir()]
    if (ASSETS / CONFIGS).is_dir():
        dirs += [p for p in (ASSETS / CONFIGS).iterdir() if p.is_dir()]
    return sorted(str(p.relative_to(ASSETS)) for p in dirs if '"_class_name"' in _text(p / "config.json"))


def config_only_hint(directory: Path) -> str | None:
    """For a bundled config-only directory: how to get the real weights; None for any other directory."""
    try:
        directory.resolve().relative_to((ASSETS / CONFIGS).resolve())
    except ValueError:
        return None
    hub_id = json.loads(_text(directory / "config.json") or "{}").get("_name_or_path")
    where = f"set model.source to the hub id {hub_id!r} (subfolder transformer)" if hub_id else "use a real checkpoint"
    return f"{directory.name} is a bundled config without weights (for --dry-run, validate, inspect); {where}"


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def resolve_source(source: str, base_dir: Path | None = None) -> str | Path:
    """A recipe's `model.source` → a local Path (model dir, pipeline dir or checkpoint file) or a hub id.

    `bundled:NAME` names a model inside the package (`bundled:digits-dit`) or a config-only full-size
    architecture (`bundled:configs/flux-dev`; see `bundled_models`).
    """
    if source.startswith(BUNDLED_PREFIX):
        name = source[len(BUNDLED_PREFIX) :]
        path = ASSETS / name
        if not (path / "config.json").is_file():
            raise IntegrityError(f"bundled model {name!r} not found (have: {', '.join(bundled_models()) or 'none'})")
        return path
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.exists():
        return path.resolve()
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return source
    raise IntegrityError(f"model source {source!r}: no such file or directory")


def resolve_config(config: str, base_dir: Path | None = None) -> Path:
    """A recipe's `model.config` → the local directory holding its config.json (`bundled:configs/NAME` too)."""
    try:
        path = resolve_source(config, base_dir)
    except IntegrityError:
        raise InputError(f"model.config {config!r}: no such directory") from None
    if not isinstance(path, Path):
        raise InputError(f"model.config {config!r}: not a local directory (configs are not fetched from the hub)")
    return model_dir(path)


def model_dir(path: Path, subfolder: str | None = None) -> Path:
    """The directory holding config.json: the path itself, its `subfolder`, or a pipeline's transformer/."""
    if subfolder:
        path = path / subfolder
    if (path / "config.json").is_file():
        return path
    if (path / "model_index.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    raise IntegrityError(f"{path}: no config.json (neither a diffusers model directory nor a pipeline directory)")


def read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{directory / 'config.json'}: unreadable config ({e})") from None
    if "_class_name" not in config:
        raise IntegrityError(f"{directory / 'config.json'}: no _class_name (not a diffusers config)")
    return config


def safetensors_files(directory: Path) -> list[Path]:
    hint = config_only_hint(directory)
    if hint is not None:
        raise IntegrityError(hint)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise IntegrityError(f"{index}: unreadable index ({e})") from None
        return [directory / n for n in names]
    single = directory / WEIGHTS_NAME
    if not single.is_file():
        if (directory / "diffusion_pytorch_model.bin").is_file():
            raise IntegrityError(f"{directory}: only a pickled .bin checkpoint; convert it to safetensors first")
        raise IntegrityError(f"{single}: missing weights file")
    return [single]


def load_weights(model: nn.Module, directory: Path) -> None:
    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(directory):
        state.update(read_safetensors(f))
    load_state_dict_checked(model, state, str(directory))


def load_model(
    source: str | Path,
    subfolder: str | None = None,
    meta: bool = False,
    num_heads: int | None = None,
    config: Path | None = None,
):
    """Loads a diffusers transformer from a local directory, a single checkpoint file or a hub id.

    `config` (a directory holding a config.json, see `model_dir`) is the config of a single-file checkpoint
    in the BFL FLUX or diffusers layout. With `meta=True` only configs and headers are read and the model
    lives on the meta device (no weights).
    """
    if config is not None and not (isinstance(source, Path) and source.is_file()):
        raise InputError(f"model.config {config}: only single-file checkpoints take a config ({source} has its own)")
    if isinstance(source, str):
        return _load_hub(source, subfolder, meta)
    if source.is_file():
        return _load_file(source, meta, num_heads, config)
    directory = model_dir(source, subfolder)
    if not meta:
        safetensors_files(directory)  # a config-only or weightless directory fails here, before the model is built
    model = build_from_config(read_config(directory), meta=meta)
    if not meta:
        load_weights(model, directory)
    return model.eval()


def checkpoint_layout(keys) -> str | None:
    """The registered checkpoint layout of a state dict's key names ("bfl-flux", "original-dit", "diffusers", ...)."""
    import dit_graft.families  # noqa: F401 - the families register their layouts

    layout = detect_layout(keys)
    return None if layout is None else layout.name


def _load_file(path: Path, meta: bool, num_heads: int | None, config: Path | None):
    """A single checkpoint file: its layout from the key names (a safetensors header, or a weights-only pickle)."""
    import dit_graft.families  # noqa: F401 - the families register their layouts

    pickled = path.suffix.lower() != ".safetensors"
    state = read_checkpoint(path) if pickled else None
    header = {k: list(v.shape) for k, v in state.items()} if pickled else safetensors_header(path)
    layout = detect_layout(header, pickle=pickled)
    if layout is None:
        first = ", ".join(sorted(header)[:3]) or "no tensors"
        known = ", ".join(name for name, lay in LAYOUTS.items() if lay.pickle or not pickled)
        raise InputError(f"{path}: not a checkpoint layout dit-graft reads ({known}; first keys: {first})")
    if config is not None:
        cfg = read_config(model_dir(config))
    elif layout.infer_config is not None:
        try:
            cfg = layout.infer_config(header, {"num_heads": num_heads})
        except IntegrityError as e:
            raise IntegrityError(f"{path}: {e}") from None
    else:
        raise InputError(
            f"{path}: a {layout.name}-layout state dict carries no config; set model.config to its directory"
        )
    model = build_without_weights(cfg, meta=meta)
    try:
        layout.convert(meta_state(header), model)  # every key and shape, from the header alone
        if not meta:
            assign_state(model, layout.convert(state if pickled else read_safetensors(path), model))
    except IntegrityError as e:
        raise IntegrityError(f"{path}: {e}") from None
    if layout.finish is not None:
        layout.finish(model)
    return model.eval()


def _load_hub(repo_id: str, subfolder: str | None, meta: bool):
    """Hub ids go through diffusers' own loader (needs network or a populated HF cache)."""
    from huggingface_hub import hf_hub_download

    sub = subfolder if subfolder is not None else "transformer"
    try:
        config_path = hf_hub_download(repo_id, "config.json", subfolder=sub or None)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; report the first line
        raise IntegrityError(f"hub id {repo_id!r}: could not fetch config.json ({str(e).splitlines()[0]})") from None
    config = json.loads(Path(config_path).read_text())
    if meta:
        return build_from_config(config, meta=True)
    cls = model_class(config["_class_name"])
    try:
        return cls.from_pretrained(repo_id, subfolder=sub or None).eval()
    except Exception as e:  # noqa: BLE001
        raise IntegrityError(f"hub id {repo_id!r}: could not load weights ({str(e).splitlines()[0]})") from None
