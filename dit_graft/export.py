"""Export: a diffusers-format directory that `dit_graft.from_pretrained` rebuilds exactly.

    out/
      config.json                          base diffusers class + config
      diffusion_pytorch_model.safetensors  every key of the student, strict
      graft.json                           dit-graft version, resolved recipe, GraftPlan, per-layer operators, metrics
      verify.safetensors, integrity.json   a seeded forward's inputs and output, every file's sha256 (dit-graft verify)
      README.md                            model card
      modeling_dit_graft.py                loader for diffusers.AutoModel(trust_remote_code=True) (dit_graft.standalone)

The directory is written to a temporary sibling and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dit_graft import __version__
from dit_graft.errors import IntegrityError
from dit_graft.integrity import record
from dit_graft.loading import WEIGHTS_NAME, build_from_config, load_weights, model_dir, read_config, safetensors_files
from dit_graft.plan import GraftPlan, apply
from dit_graft.standalone import write as write_modeling_file

GRAFT_JSON = "graft.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tmp_sibling(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp")


def commit_dir(tmp: Path, out: Path) -> None:
    """Replaces `out` by the finished `tmp` directory."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def export(
    student: nn.Module,
    graft_plan: GraftPlan,
    recipe: dict[str, Any],
    out: Path,
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    dtype: str = "float32",
) -> Path:
    """Writes the student, its plan and its model card to `out` atomically.

    With several processes only the main one writes (the others return at once; `dit_graft.pipeline` makes
    them wait for it).
    """
    out = Path(out)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return out
    tmp = tmp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        student.save_config(tmp)
        state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "dit_graft": __version__})
        graft = {
            "dit_graft_version": __version__,
            "recipe": recipe,
            "plan": graft_plan.model_dump(),
            "operators": graft_plan.operators_by_site(),
            "dtype": dtype,
            "metrics": metrics or {},
        }
        (tmp / GRAFT_JSON).write_text(json.dumps(graft, indent=2))
        (tmp / "README.md").write_text(model_card(graft_plan, recipe, metrics or {}))
        write_modeling_file(tmp)  # modeling_dit_graft.py + config.json's auto_map (dit_graft.standalone)
        for name, src in (extra_files or {}).items():
            if src.is_file():
                shutil.copyfile(src, tmp / name)
        record_verification(tmp)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def record_verification(directory: Path) -> None:
    """The seeded forward and every file's checksum that `dit-graft verify` checks (see dit_graft.verify)."""
    record(directory, from_pretrained, GRAFT_JSON)


def model_card(graft_plan: GraftPlan, recipe: dict[str, Any], metrics: dict[str, Any]) -> str:
    """A Hugging Face model card: base model, relation, the recipe and the measured results."""
    source = recipe.get("model", {}).get("source", "unknown")
    rows = "\n".join(f"| {e.index} | {e.site} | {e.op} | {', '.join(map(str, e.layers))} |" for e in graft_plan.edits)
    results = "\n".join(f"| {k} | {v} |" for k, v in metrics.items()) or "| (none measured) | |"
    return f"""---
base_model: {source}
base_model_relation: finetune
library_name: diffusers
tags: [dit-graft, diffusion-transformer]
---

# {recipe.get("name") or "dit-graft student"}

Converted from `{source}` ({graft_plan.base_class}) with dit-graft {__version__}.
{recipe.get("description") or ""}

Load with `dit_graft.from_pretrained(path)`, or without dit-graft installed (torch, diffusers, safetensors,
accelerate, pydantic and pyyaml suffice) with `diffusers.AutoModel.from_pretrained(path, trust_remote_code=True)`,
which runs the bundled `modeling_dit_graft.py` (dit-graft's own loader, embedded at export time); both build the
same model, which plugs into the family's diffusers pipeline as `transformer=`.

## Edits

| # | site | operator | layers |
|---|---|---|---|
{rows}

## Results

| metric | value |
|---|---|
{results}

{_runtime_note(graft_plan)}The full recipe and plan are in `graft.json`.
"""


def _runtime_note(graft_plan: GraftPlan) -> str:
    """The family's model-card paragraph on runtime options the stock diffusers class cannot express ("" if none)."""
    from dit_graft.families import FAMILIES

    note = FAMILIES.get(graft_plan.family).runtime_note(graft_plan.runtime) if graft_plan.runtime else None
    return f"## Loading\n\n{note}\n\n" if note else ""


def read_graft(path: Path) -> dict[str, Any] | None:
    f = path / GRAFT_JSON
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{f}: unreadable ({e})") from None


def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuilds a student from an export: base class from config, plan re-applied, strict load.

    A plain diffusers model or pipeline directory (no graft.json) loads as its stock class.
    """
    path = Path(path)
    if not path.exists():
        raise IntegrityError(f"{path}: no such directory")
    directory = model_dir(path)
    config = read_config(directory)  # build_from_config leaves out loading entries (auto_map)
    safetensors_files(directory)  # a config-only directory fails here, before a possibly huge model is built
    graft = read_graft(directory)
    graft_plan = None if graft is None else GraftPlan.model_validate(graft["plan"])
    # structure edits changed the saved config (num_layers): the plan replays from the teacher's config
    model = build_from_config({**config, **graft_plan.base_config} if graft_plan is not None else config)
    if graft_plan is not None:
        model = apply(model, graft_plan, inplace=True)
        # every tensor was written in the export dtype (modules diffusers keeps in fp32 included), so reload it so;
        # nn.Module.to: ModelMixin.to warns about _keep_in_fp32_modules even when that list is empty
        model = nn.Module.to(model, DTYPES[graft.get("dtype", "float32")])
    load_weights(model, directory)
    return model.to(device).eval()
