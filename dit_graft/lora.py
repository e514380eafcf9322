"""`dit-graft lora`: a LoRA trained for the teacher, remapped onto a student by the student's plan.

A LoRA adds ΔW = s · B · A (B: out × r, A: r × in, s = alpha / r) to a teacher Linear. The student's plan
(graft.json) says where every teacher Linear went, so the student's LoRA is

    inherited module (attention projections under any processor, untouched MLPs)   ΔW, at its new path
    depth edit (prune_depth, parallel_blocks)         moved along `layer_map`; a dropped block's LoRA is dropped
    mlp_ratio / prune_width                           fc1: B[S]; fc2: A[:, S]   (S: the kept hidden units; widening
                                                      pads B rows / A columns with zeros for the new units)
    moe                                               expert e: fc1 B[S_e], fc2 A[:, S_e] (shared expert: S_0)
    conv_mlp                                          net.0.proj → fc1, net.2 → fc2, unchanged
    anything else replacing a module                  dropped, and listed with the reason

so that, wherever every LoRA target was inherited or sliced, student + remapped LoRA equals the student
the same plan builds from teacher + merged LoRA (`apply` replays the recorded units, so importance
rankings of the merged weights do not matter). s is folded into B (and B's bias), so every written
module has scale 1 and the file reads the same with and without its metadata.

Inputs: the safetensors that diffusers' `save_lora_weights` and peft write (`transformer.<path>.lora_A.weight`,
`base_model.model.<path>...`, or bare paths), with alphas from `<path>.alpha` keys or the
`lora_adapter_metadata` (r, lora_alpha, rank_pattern, alpha_pattern); for FLUX also the kohya, XLabs and
BFL layouts (Wan: the original and kohya layouts), converted by diffusers' own `lora_state_dict`. Text-encoder keys are
copied unchanged (the student shares the teacher's text encoders). Pickles are refused.

Output: `OUT/pytorch_lora_weights.safetensors` in diffusers' layout with `lora_adapter_metadata`, loadable by the
family pipeline's `load_lora_weights` (FLUX, Wan) or `load_lora` here (peft; DiT and PixArt pipelines have no LoRA
loader), and `OUT/lora_report.json`.
"""

from __future__ import annotations

import collections
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dit_graft import __version__
from dit_graft.errors import InputError, IntegrityError

LORA_NAME = "pytorch_lora_weights.safetensors"
REPORT_NAME = "lora_report.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIXES = ("transformer.", "base_model.model.")
PASSTHROUGH = ("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")
CONVERTERS = {"flux": "FluxLoraLoaderMixin", "wan": "WanLoraLoaderMixin"}  # family → diffusers' LoRA reader
KOHYA_MARKERS = (".lora_down.weight", ".lora_up.weight", "lora_unet_", "diffusion_model.")


@dataclass
class LoraModule:
    """One adapted Linear of the teacher: ΔW = scale · B · A (+ scale · bias on the output)."""

    path: str
    A: torch.Tensor  # (r, in, ...)
    B: torch.Tensor  # (out, r, ...)
    bias: torch.Tensor | None = None  # lora_B.bias, (out,)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def update_sq_norm(self, rows: list[int] | None = None, cols: list[int] | None = None, bias: bool = True) -> float:
        """‖ΔW[rows][:, cols]‖² (+ the bias rows'), without forming ΔW: Σ (BᵀB) ⊙ (AAᵀ)."""
        a, b = self.A.flatten(1).double(), self.B.flatten(1).double()
        if cols is not None:
            a = a[:, [c for c in cols if c >= 0]]
        if rows is not None:
            b = b[[r for r in rows if r >= 0]]
        total = ((b.T @ b) * (a @ a.T)).sum().item()
        if self.bias is not None and bias:
            kept = self.bias.double() if rows is None else self.bias.double()[[r for r in rows if r >= 0]]
            total += kept.square().sum().item()
        return total * self.scale**2

    def params(self) -> int:
        return self.A.numel() + self.B.numel() + (self.bias.numel() if self.bias is not None else 0)


@dataclass
class Piece:
    """Where (part of) a teacher module's LoRA lands: a student path, and the teacher rows/columns it keeps.

    rows/cols index the teacher module's output/input units (-1: a new unit, zero update); None: all of them.
    """

    path: str
    rows: list[int] | None = None
    cols: list[int] | None = None
    keeps_bias: bool = True

    def moved(self, path: str, **changes) -> Piece:
        return Piece(path, changes.get("rows", self.rows), changes.get("cols", self.cols), self.keeps_bias)


@dataclass
class Remap:
    """The remapped LoRA and what happened to every teacher module."""

    modules: dict[str, tuple[LoraModule, list[Piece]]]  # teacher path → its LoRA and where it went
    dropped: dict[str, str] = field(default_factory=dict)  # teacher path (or part) → why it was dropped
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)  # text-encoder keys, unchanged
    metadata: dict[str, Any] = field(default_factory=dict)  # the input's non-transformer adapter metadata
    source_format: str = "diffusers"


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA safetensors file; anything else (a pickle, a truncated file) is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such LoRA file")
    with path.open("rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise IntegrityError(f"{path}: a pickle file; LoRAs are read from safetensors only (pickles can run code)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise IntegrityError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if not tensors:
        raise InputError(f"{path}: holds no tensors")
    return tensors, metadata


def _adapter_metadata(metadata: dict[str, str], where: Path) -> dict[str, Any]:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{where}: unreadable {METADATA_KEY} ({e})") from None


def _pattern_value(name: str, pattern: dict[str, Any], default):
    """peft's rule: the pattern key that matches the end of the module name (longest wins)."""
    import re

    best = None
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name) and (best is None or len(key) > len(best)):
            best = key
    return default if best is None else pattern[best]


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], family: str, where: Path) -> Remap:
    """Groups a LoRA state dict into teacher modules (paths without any prefix), scales resolved."""
    source_format = "diffusers"
    if any(marker in k for k in tensors for marker in KOHYA_MARKERS) or any(k.startswith("lora_") for k in tensors):
        if family not in CONVERTERS:
            raise InputError(
                f"{where}: kohya-style keys ({next(iter(tensors))}) are read for {' and '.join(CONVERTERS)} only "
                f"(diffusers converts them); this export is {family}"
            )
        import diffusers.loaders.lora_pipeline as lora_pipeline

        mixin = getattr(lora_pipeline, CONVERTERS[family])
        try:
            converted = mixin.lora_state_dict(dict(tensors), return_alphas=True)
        except Exception as e:  # diffusers' converters raise ValueError/KeyError on layouts they do not know
            raise InputError(f"{where}: diffusers cannot read this {family} LoRA layout ({e})") from None
        tensors, alphas = converted if isinstance(converted, tuple) else (converted, None)
        tensors = {**tensors, **(alphas or {})}
        source_format = f"kohya/original {family} layout (converted by diffusers' {CONVERTERS[family]})"
    meta = _adapter_metadata(metadata, where)
    own_meta = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("transformer.")}
    other_meta = {k: v for k, v in meta.items() if not k.startswith("transformer.")}
    if not own_meta and "r" in other_meta:  # a LoraConfig written without diffusers' component prefix
        own_meta, other_meta = other_meta, {}

    parts: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    passthrough = {}
    for key, value in tensors.items():
        if key.startswith(PASSTHROUGH):
            passthrough[key] = value
            continue
        name = key
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        for suffix, part in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_B.bias", "bias"),
            (".alpha", "alpha"),
            (".lora_magnitude_vector", "dora"),
        ):
            if name.endswith(suffix):
                parts[name[: -len(suffix)]][part] = value
                break
        else:
            if ".lora_A.default" in name or ".lora_B.default" in name:
                raise InputError(
                    f"{where}: key {key} still names the peft adapter; save get_peft_model_state_dict's keys"
                )
            raise InputError(f"{where}: key {key} is not a LoRA weight (lora_A/lora_B/alpha)")

    modules = {}
    for path, p in parts.items():
        if "dora" in p:
            raise InputError(f"{where}: {path} is a DoRA module (lora_magnitude_vector); only plain LoRA is remapped")
        if "A" not in p or "B" not in p:
            raise IntegrityError(f"{where}: {path} has {'lora_B' if 'A' not in p else 'lora_A'} without its pair")
        a, b = p["A"], p["B"]
        if a.dim() < 2 or b.dim() != a.dim() or a.shape[0] != b.shape[1]:
            raise IntegrityError(f"{where}: {path}: rank mismatch, lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
        bias = p.get("bias")
        if bias is not None and bias.shape != b.shape[:1]:
            raise IntegrityError(
                f"{where}: {path}: lora_B.bias {tuple(bias.shape)} does not fit lora_B {tuple(b.shape)}"
            )
        r = a.shape[0]
        if "alpha" in p:
            alpha = float(p["alpha"])
        elif own_meta:
            alpha = float(_pattern_value(path, own_meta.get("alpha_pattern") or {}, own_meta.get("lora_alpha", r)))
            r_meta = int(_pattern_value(path, own_meta.get("rank_pattern") or {}, own_meta.get("r", r)))
            if r_meta != r:
                raise IntegrityError(f"{where}: {path}: rank mismatch, metadata says r={r_meta}, the weights have {r}")
        else:
            alpha = float(r)  # diffusers/peft without alphas: scale 1
        modules[path] = (LoraModule(path, a, b, bias, alpha / r), [])
    if not modules:
        raise InputError(f"{where}: no transformer LoRA weights (keys: {', '.join(list(tensors)[:3])} ...)")
    return Remap(modules, passthrough=passthrough, metadata=other_meta, source_format=source_format)


def _teacher_modules(config: dict[str, Any]) -> dict[str, nn.Module]:
    from dit_graft.loading import build_from_config

    return dict(build_from_config(config, meta=True).named_modules())


def check_against_teacher(remap: Remap, teacher: dict[str, nn.Module], base_class: str, where: Path) -> None:
    """Every LoRA target is a Linear (or conv) of the teacher with the LoRA's input and output widths."""
    paths = list(remap.modules)
    missing = [p for p in paths if p not in teacher]
    if len(missing) == len(paths):
        raise InputError(
            f"{where}: a LoRA for another architecture: none of its {len(paths)} targets (e.g. {paths[0]}) "
            f"is a module of {base_class}"
        )
    if missing:
        raise InputError(f"{where}: LoRA target {missing[0]} matches no module of {base_class} ({len(missing)} such)")
    for path, (lora, _) in remap.modules.items():
        mod = teacher[path]
        weight = getattr(mod, "weight", None)
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or weight is None:
            raise InputError(f"{where}: LoRA target {path} is a {type(mod).__name__}, not a Linear or conv")
        out_f, in_f = weight.shape[0], weight.shape[1]
        if lora.B.shape[0] != out_f or lora.A.shape[1] != in_f:
            raise InputError(
                f"{where}: {path}: the LoRA maps {lora.A.shape[1]} → {lora.B.shape[0]} features, "
                f"the teacher's module {in_f} → {out_f} (a LoRA for another model size)"
            )


def _compose(old: list[int] | None, units: list[int], width: int) -> list[int]:
    """Teacher indices of a new module's units: `units` index the current module's (old) units, the rest are new."""
    picked = [u if old is None else old[u] for u in units]
    return picked + [-1] * (width - len(picked))


def _ffn_pieces(piece: Piece, module_path: str, op: str, units: dict | None, shapes: dict) -> list[Piece] | str:
    """Where a LoRA piece under a replaced FFN goes; a string says why it has no counterpart."""
    sub = piece.path[len(module_path) + 1 :]
    fc = {"net.0.proj": "fc1", "net.2": "fc2"}.get(sub)
    if fc is None:
        return f"replaced by {op}, which has no counterpart for {sub}"
    if op == "conv_mlp":
        return [piece.moved(f"{module_path}.{fc}")]
    if op in ("mlp_ratio", "prune_width", "moe") and units is None:
        return f"the plan records no kept units for {module_path} ({op}; exported before dit-graft recorded them)"
    if op in ("mlp_ratio", "prune_width"):
        new_path = f"{module_path}.{sub}"
        width = shapes[f"{module_path}.net.0.proj.weight"][0]
        if fc == "fc1":
            return [piece.moved(new_path, rows=_compose(piece.rows, units["hidden"], width))]
        return [piece.moved(new_path, cols=_compose(piece.cols, units["hidden"], width))]
    if op == "moe":
        out = []
        for part, part_units in units.items():
            if fc == "fc1":
                out.append(
                    piece.moved(f"{module_path}.{part}.fc1", rows=_compose(piece.rows, part_units, len(part_units)))
                )
            else:
                moved = piece.moved(f"{module_path}.{part}.fc2", cols=_compose(piece.cols, part_units, len(part_units)))
                moved.keeps_bias = False  # the experts' fc2 have no bias: b₂ is the MoE's own
                out.append(moved)
        return out
    return f"replaced by {op}, which has no counterpart for {sub}"


def remap_lora(remap: Remap, graft: dict[str, Any], shapes: dict[str, list[int]]) -> Remap:
    """Follows every LoRA module through the plan's edits, in order; fills `remap`'s pieces and `dropped`."""
    from dit_graft.families import FAMILIES
    from dit_graft.operators import OPERATORS
    from dit_graft.plan import GraftPlan

    graft_plan = GraftPlan.model_validate(graft["plan"])
    family = FAMILIES.get(graft_plan.family)
    for path, (lora, pieces) in remap.modules.items():
        current = [Piece(path)]
        for edit in graft_plan.edits:
            op = OPERATORS.get(edit.op)
            nxt = []
            for piece in current:
                if edit.layer_map is not None:
                    group = family.depth_group(edit.group)
                    if not group.owns(piece.path):
                        nxt.append(piece)
                        continue
                    layer = int(piece.path.split(".")[1])
                    new_path = op.structure.move_path(piece.path, layer, edit)
                    if new_path is None:
                        remap.dropped[piece.path] = f"graft.{edit.index} ({edit.op}) dropped {group.attr}.{layer}"
                    else:
                        nxt.append(piece.moved(new_path))
                    continue
                hit = next(
                    (m for m in edit.modules if op.installs == "module" and piece.path.startswith(m.path + ".")), None
                )
                if hit is None:
                    nxt.append(piece)
                    continue
                result = _ffn_pieces(piece, hit.path, edit.op, hit.units, shapes)
                if isinstance(result, str):
                    remap.dropped[piece.path] = f"graft.{edit.index}: {result}"
                else:
                    nxt.extend(result)
            current = nxt
        for piece in current:
            weight = shapes.get(f"{piece.path}.weight")
            out_f = len(piece.rows) if piece.rows is not None else lora.B.shape[0]
            in_f = len(piece.cols) if piece.cols is not None else lora.A.shape[1]
            if weight is None:
                remap.dropped[piece.path] = "no such module in the student"
            elif weight[0] != out_f or weight[1] != in_f:
                raise IntegrityError(
                    f"{piece.path}: the student's module is {weight[1]} → {weight[0]}, the remapped LoRA {in_f} → "
                    f"{out_f}: the export does not match its own plan"
                )
            else:
                pieces.append(piece)
        if not pieces and path not in remap.dropped:
            remap.dropped[path] = "no counterpart in the student"
        elif pieces and lora.bias is not None and not any(p.keeps_bias for p in pieces):
            remap.dropped[f"{path}.lora_B.bias"] = "the student's modules there have no bias (moe: b₂ is the MoE's own)"
    return remap


def _piece_tensors(lora: LoraModule, piece: Piece) -> dict[str, torch.Tensor]:
    """The student's lora_A/lora_B(/bias) for one piece, with the scale folded into B."""

    def take(t: torch.Tensor, idx: list[int] | None, dim: int) -> torch.Tensor:
        if idx is None:
            return t
        out = torch.zeros(*t.shape[:dim], len(idx), *t.shape[dim + 1 :], dtype=t.dtype)
        src = [i for i, u in enumerate(idx) if u >= 0]
        out.index_copy_(
            dim, torch.tensor(src, dtype=torch.long), t.index_select(dim, torch.tensor([idx[i] for i in src]))
        )
        return out

    a = take(lora.A, piece.cols, 1).clone().contiguous()  # a copy: pieces of one module must not share storage
    b = (take(lora.B, piece.rows, 0) * lora.scale).to(lora.B.dtype).contiguous()
    out = {f"{piece.path}.lora_A.weight": a, f"{piece.path}.lora_B.weight": b}
    if lora.bias is not None and piece.keeps_bias:
        out[f"{piece.path}.lora_B.bias"] = (
            (take(lora.bias, piece.rows, 0) * lora.scale).to(lora.bias.dtype).contiguous()
        )
    return out


def summary(remap: Remap) -> dict[str, Any]:
    """How much of the LoRA carried over exactly: parameters and the Frobenius norm of the update."""
    total_params = carried_params = 0
    total_sq = carried_sq = 0.0
    modules = {}
    for path, (lora, pieces) in remap.modules.items():
        total_params += lora.params()
        total_sq += lora.update_sq_norm()
        if not pieces:
            continue
        rows = _union([p.rows for p in pieces], lora.B.shape[0])
        cols = _union([p.cols for p in pieces], lora.A.shape[1])
        bias = lora.bias is not None and any(p.keeps_bias for p in pieces)
        carried_params += lora.rank * (len(rows) * lora.B[0, 0].numel() + len(cols) * lora.A[0, 0].numel())
        carried_params += len(rows) if bias else 0
        sq = sum(lora.update_sq_norm(p.rows, p.cols, bias=False) for p in pieces)
        if bias:  # the bias update is carried once, by the pieces that keep it (their rows)
            sq += lora.scale**2 * lora.bias.double()[rows].square().sum().item()
        carried_sq += sq
        modules[path] = [p.path for p in pieces]
    return {
        "lora_modules": len(remap.modules),
        "modules_carried": len(modules),
        "params_teacher_lora": total_params,
        "params_carried_exactly": carried_params,
        "update_norm_teacher": total_sq**0.5,
        "update_norm_carried": carried_sq**0.5,
        "update_norm_share": (carried_sq / total_sq) ** 0.5 if total_sq > 0 else 1.0,
        "dropped": dict(sorted(remap.dropped.items())),
        "placed": modules,
        "source_format": remap.source_format,
        "text_encoder_keys": len(remap.passthrough),
    }


def _union(selections: list[list[int] | None], size: int) -> list[int]:
    """Teacher units any piece keeps (None keeps all)."""
    if any(s is None for s in selections):
        return list(range(size))
    return sorted({u for s in selections for u in s if u >= 0})


def student_lora(remap: Remap) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The student's LoRA state dict (diffusers' `transformer.` layout) and its adapter metadata."""
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    lora_bias = False
    for lora, pieces in remap.modules.values():
        for piece in pieces:
            tensors = _piece_tensors(lora, piece)
            lora_bias |= any(k.endswith(".lora_B.bias") for k in tensors)
            if piece.path in ranks:
                raise IntegrityError(f"two LoRA modules land on the student's {piece.path}")
            ranks[piece.path] = lora.rank
            state.update({f"transformer.{k}": v for k, v in tensors.items()})
    if not ranks:
        return state, dict(remap.metadata)
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {p: k for p, k in ranks.items() if k != r}
    config = {
        "r": r,
        "lora_alpha": r,  # the scale is folded into lora_B: alpha = r everywhere
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_bias": lora_bias,
        "use_dora": False,
        "init_lora_weights": True,
    }
    return state, {**remap.metadata, **{f"transformer.{k}": v for k, v in config.items()}}


def remap_export(lora_path: Path, export_dir: Path) -> tuple[Remap, dict[str, Any]]:
    """Reads a teacher LoRA and a student export; returns the remapped LoRA and its summary."""
    from dit_graft.export import read_graft
    from dit_graft.loading import read_config, safetensors_files, safetensors_header

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise InputError(f"{export_dir}: no such export directory")
    graft = read_graft(export_dir)
    if graft is None:
        raise InputError(f"{export_dir}: no graft.json (not a dit-graft export)")
    shapes: dict[str, list[int]] = {}
    for f in safetensors_files(export_dir):
        shapes.update(safetensors_header(f))
    plan = graft["plan"]
    config = {**read_config(export_dir), **plan.get("base_config", {})}
    tensors, metadata = read_lora_file(lora_path)
    remap = parse_lora(tensors, metadata, plan["family"], Path(lora_path))
    check_against_teacher(remap, _teacher_modules(config), plan["base_class"], Path(lora_path))
    remap = remap_lora(remap, graft, shapes)
    report = summary(remap)
    report["teacher"] = graft.get("recipe", {}).get("model", {}).get("source")
    report["export"] = str(export_dir)
    report["lora"] = str(lora_path)
    return remap, report


def write_lora(remap: Remap, report: dict[str, Any], out: Path) -> Path:
    """Writes OUT/pytorch_lora_weights.safetensors and OUT/lora_report.json atomically."""
    from dit_graft.export import commit_dir, tmp_sibling

    state, config = student_lora(remap)
    state.update(remap.passthrough)
    if not state:
        raise InputError(f"nothing of {report['lora']} carries over to {report['export']} (see the dropped list)")
    out = Path(out)
    tmp = tmp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        metadata = {"format": "pt", "dit_graft": __version__}
        if config:
            metadata[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
        save_file(state, str(tmp / LORA_NAME), metadata=metadata)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / LORA_NAME


def load_lora(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Injects a LoRA written by `dit-graft lora` (or any diffusers-layout transformer LoRA) into `model` with peft.

    For families whose pipeline has no `load_lora_weights` (DiT, PixArt); every key must land on a module.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    path = Path(path)
    if path.is_dir():
        path = path / LORA_NAME
    tensors, metadata = read_lora_file(path)
    meta = _adapter_metadata(metadata, path)
    config = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("transformer.")}
    state = {k[len("transformer.") :]: v for k, v in tensors.items() if k.startswith("transformer.")}
    if not config:
        remap = parse_lora(tensors, metadata, "", path)
        ranks = {p: m.rank for p, (m, _) in remap.modules.items()}
        r = collections.Counter(ranks.values()).most_common(1)[0][0]
        config = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks)}
        config["rank_pattern"] = config["alpha_pattern"] = {p: k for p, k in ranks.items() if k != r}
    inject_adapter_in_model(LoraConfig(**config), model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise IntegrityError(f"{path}: LoRA key {unexpected[0]} matches no module of {type(model).__name__}")
    return model
