"""Recipes: YAML → a typed, validated `Recipe` before any weight is loaded.

Unknown keys are rejected; every error names the file, the line and the key path. `--set` overrides
take dotted paths with list indices (`graft.0.options.heads=2`) and must name an existing key of the
resolved recipe (defaults included).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dit_graft.errors import RecipeError
from dit_graft.operators import OPERATORS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpertsSection(Strict):
    """A teacher made of timestep experts converted by one recipe (Wan2.2 A14B: `transformer`, `transformer_2`).

    Expert i is `model.source`'s subfolder `subfolders[i]`; the first denoises t ≥ boundary · 1000 (high noise),
    the second t < boundary · 1000, as the pipeline's `boundary_ratio` says. The graft and distill sections apply
    to each expert, each distilled on its own noise range; the export holds one folder per expert.
    """

    subfolders: list[str] = Field(min_length=2, max_length=2, description="the experts' subfolders, high noise first")
    boundary: float = Field(gt=0, lt=1, description="the pipeline's boundary_ratio (A14B T2V: 0.875, I2V: 0.9)")


class ModelSection(Strict):
    """Where the teacher comes from."""

    source: str = Field(description="bundled:NAME, a diffusers model/pipeline directory, a checkpoint file or a hub id")
    subfolder: str | None = None
    num_heads: int | None = Field(default=None, ge=1, description="heads, for original DiT checkpoints only")
    config: str | None = Field(
        default=None,
        description="config directory (or bundled:configs/NAME) of a single-file FLUX (BFL) or diffusers checkpoint",
    )
    experts: ExpertsSection | None = Field(default=None, description="timestep experts (Wan2.2 A14B)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="the family's runtime options (wan: flow_shift, guidance_2), recorded in graft.json",
    )


class AutoLayers(Strict):
    """`layers: {auto: {...}}`: choose the layers of an edit by how little grafting each alone hurts.

    For each candidate layer, the edit is applied to that layer alone, the new module gets `steps`
    steps of activation distillation (stage 1) and the relative error of the whole model's output to
    the ungrafted model is measured on `samples` seeded inputs; the `fraction` least sensitive layers
    (at least one) are chosen.
    """

    fraction: float = Field(gt=0, le=1, description="share of the candidate layers to graft")
    by: Literal["sensitivity"] = "sensitivity"
    steps: int = Field(default=40, ge=0, description="stage-1 steps given to each candidate before it is measured")
    samples: int = Field(default=32, ge=1, le=4096, description="seeded inputs the output error is measured on")


class AutoSpec(Strict):
    auto: AutoLayers


class GraftEdit(Strict):
    """One edit: put operator `op` into the `site` of the selected `layers` of one block `group`.

    `group` picks a block group where a family has several; layers are numbered within the group.
    dit: blocks. pixart: self (the self-attention and MLP of each block; the default) or cross (the
    cross-attention to the caption, `site: attention`; softmax unless an edit says otherwise). flux: double
    (the double-stream blocks `transformer_blocks.{i}`: joint attention, image-stream MLP `ff`; the default)
    or single (the single-stream blocks `single_transformer_blocks.{i}`: attention only, their MLP is fused
    into `proj_out`). Omitted: the family's first group.

    `site: depth` edits change the block list itself (`prune_depth`, `parallel_blocks`); `layers` is not used there.
    Their `group` is the block list they rewrite: dit blocks, pixart self (the blocks, cross-attention
    included), flux double or single. Later edits number layers in the pruned model.
    `layers: {auto: {fraction: 0.5}}` lets the teacher choose (see `AutoLayers`; `dit-graft plan` shows the choice).
    """

    site: Literal["attention", "mlp", "depth"]
    group: str | None = Field(default=None, description="block group (pixart: self | cross; flux: double | single)")
    layers: str | int | list[int] | AutoSpec = "all"
    op: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("group")
    @classmethod
    def _known_group(cls, group: str | None) -> str | None:
        from dit_graft.families import all_groups

        if group is not None and group not in all_groups():
            raise ValueError(f"unknown block group {group!r} (known: {', '.join(all_groups())})")
        return group

    @field_validator("layers", mode="before")
    @classmethod
    def _auto_layers(cls, layers: Any) -> Any:
        if not isinstance(layers, dict):
            return layers
        try:
            return AutoSpec.model_validate(layers)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            raise ValueError(f"{where}: {msg}") from None

    @field_validator("op")
    @classmethod
    def _known_op(cls, op: str) -> str:
        if op not in OPERATORS:
            raise ValueError(f"unknown operator {op!r} (known: {', '.join(OPERATORS)})")
        return op


class Losses(Strict):
    """Weights of the hybrid distillation loss terms (0 disables a term)."""

    eps_mse: float = Field(default=1.0, ge=0, description="noise prediction MSE to the teacher")
    sigma_mse: float = Field(default=1.0, ge=0, description="learned-variance channels MSE to the teacher")
    feature_mse: float = Field(default=0.0, ge=0, description="MSE of every block's output to the teacher's")
    task: float = Field(default=0.0, ge=0, description="ground-truth diffusion loss (student eps vs true noise)")
    load_balance: float = Field(
        default=0.0, ge=0, description="MoE load-balancing term E·Σ f_e·P_e, averaged over the moe FFNs (1 = balanced)"
    )


class ActivationSection(Strict):
    """Stage 1, activation distillation (grafting): every new module regresses its teacher counterpart.

    Each step feeds a batch of noised teacher samples through the teacher; hooks record every target's
    input and output, and each student module, run alone on the recorded input, regresses that output.
    Targets: every grafted attention/MLP module (against the same module of the teacher), and every
    block that stands in for several teacher blocks after a depth edit (against the span's output, from
    the span's input). Parameters of different targets never share a loss or a clipping norm, so the
    modules train independently, as in the paper.
    """

    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    warmup: int = Field(default=10, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    loss: Literal["l1", "l2", "huber"] = Field(default="l2", description="regression loss (huber: δ = huber_delta)")
    huber_delta: float = Field(default=1.0, gt=0)
    log_every: int = Field(default=10, ge=1)


class LoraSection(Strict):
    """`trainable: lora`: peft LoRA adapters on the linear layers of the grafted modules, merged into the export."""

    rank: int = Field(default=16, ge=1, description="LoRA rank r")
    alpha: float | None = Field(
        default=None, gt=0, description="LoRA scale numerator (update = alpha/r · BA); default: rank"
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA input")


class DistillSection(Strict):
    """The distillation run: stage 1 (`activation`), stage 2 (`end_to_end`) or both, in that order.

    Scale-out keys: `batch_size` is the global batch over all processes (torchrun / accelerate launch);
    `trainable` chooses which parameters train (the rest are frozen: no gradient, no optimizer state, and,
    where unedited, the teacher's own tensors); `parallel` chooses how the student is spread over
    processes; `gradient_checkpointing` recomputes each transformer block's activations in the backward
    pass; `frozen_dtype` is the dtype of the teacher and of the student's frozen weights (trainable
    weights stay float32, under autocast when `mixed_precision` is set).
    """

    stages: list[Literal["activation", "end_to_end"]] = Field(
        default_factory=lambda: ["end_to_end"], min_length=1, description="which stages run (in this order)"
    )
    activation: ActivationSection = Field(default_factory=ActivationSection)

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages) or stages != sorted(stages):
            raise ValueError("list each stage once, activation before end_to_end")
        return stages

    steps: int = Field(default=600, ge=0)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup: int = Field(default=50, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    grad_accum: int = Field(default=1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    data: Literal["teacher", "dataset"] = "teacher"
    dataset: str | None = Field(default=None, description="for data: dataset — 'digits' (the bundled data)")
    pool_size: int = Field(default=512, ge=1, description="teacher-generated samples to noise (data: teacher)")
    pool_steps: int = Field(default=25, ge=1, description="sampler steps for the pool (DDIM; FLUX: flow Euler)")
    resolution: int | None = Field(
        default=None, ge=1, description="image size in pixels of the pool (default: the model's native size)"
    )
    conditions: str | None = Field(
        default=None,
        description="text families: a .safetensors of cached caption embeddings (prompt_embeds and "
        "prompt_attention_mask (PixArt) or pooled_prompt_embeds (FLUX), one row per caption; optional "
        "negative_prompt_embeds/negative_prompt_attention_mask for the null caption); default: a small "
        "seeded synthetic set",
    )
    null_class_prob: float = Field(
        default=0.1, ge=0, le=1, description="share of samples trained on the null condition (class / empty caption)"
    )
    losses: Losses = Field(default_factory=Losses)
    checkpoint_every: int = Field(default=100, ge=1)
    log_every: int = Field(default=10, ge=1)
    max_bad_steps: int = Field(default=5, ge=1, description="consecutive non-finite losses before giving up")
    trainable: Literal["new", "grafted", "all", "lora"] = Field(
        default="all",
        description="parameters that train: new (only those the graft added), grafted (every parameter of the "
        "modules an edit touched), all (the whole student), lora (LoRA adapters on the grafted modules' linear "
        "layers, merged into the export)",
    )
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA settings, for trainable: lora")
    parallel: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="data parallel over processes: ddp (replicated student, averaged gradients; a no-op in one "
        "process) or fsdp (FSDP2 fully_shard, one transformer block per unit)",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="recompute each transformer block's activations in the backward pass"
    )
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype of the teacher and of the student's frozen weights"
    )


class ExportSection(Strict):
    """Where and how the student is written."""

    out: str = "runs/student"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class Recipe(Strict):
    """A graft recipe: model, graft edits, distillation and export."""

    name: str | None = None
    description: str | None = None
    model: ModelSection
    graft: list[GraftEdit] = Field(min_length=1)
    distill: DistillSection = Field(default_factory=DistillSection)
    export: ExportSection = Field(default_factory=ExportSection)


def _line_index(text: str) -> dict[tuple, int]:
    """Maps key paths (tuples of str/int) to 1-based line numbers in the YAML text."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
                lines[path + (k.value,)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _where(source: str, lines: dict[tuple, int], path: tuple) -> str:
    for i in range(len(path), -1, -1):
        if path[:i] in lines:
            return f"{source}:{lines[path[:i]]}"
    return source


def _validation_error(e: ValidationError, source: str, lines: dict[tuple, int], prefix: tuple = ()) -> RecipeError:
    err = e.errors()[0]
    loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return RecipeError(f"{_where(source, lines, loc)}: {dotted(loc) or '(top level)'}: {msg}")


def validate(data: Any, source: str = "<recipe>", lines: dict[tuple, int] | None = None) -> Recipe:
    """Validates a plain-data recipe; operator options are parsed by their operator and filled in."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with model, graft, distill and export sections")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, source, lines) from None
    for i, edit in enumerate(recipe.graft):
        op = OPERATORS.get(edit.op)
        if op.site != edit.site:
            raise RecipeError(
                f"{_where(source, lines, ('graft', i, 'op'))}: graft.{i}.op: operator {edit.op!r} "
                f"goes into {op.site} sites, not {edit.site}"
            )
        if edit.site == "depth" and edit.layers != "all":
            raise RecipeError(
                f"{_where(source, lines, ('graft', i, 'layers'))}: graft.{i}.layers: a depth edit chooses its blocks "
                "itself (from its options); remove layers"
            )
        try:
            edit.options = op.parse_options(edit.options).model_dump()
        except ValidationError as e:
            raise _validation_error(e, source, lines, ("graft", i, "options")) from None
    return recipe


def _parse_override(item: str) -> tuple[list[str | int], Any]:
    if "=" not in item:
        raise RecipeError(f"--set {item}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    path = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Returns a copy of `data` with each KEY=VALUE set; the key path must already exist."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node: Any = data
        for depth, p in enumerate(path):
            here = ".".join(str(x) for x in path[: depth + 1])
            last = depth == len(path) - 1
            if isinstance(node, dict) and p in node:
                if last:
                    node[p] = value
                else:
                    node = node[p]
            elif isinstance(node, list) and isinstance(p, int) and p < len(node):
                if last:
                    node[p] = value
                else:
                    node = node[p]
            else:
                keys = ", ".join(map(str, node)) if isinstance(node, dict) else f"0..{len(node) - 1}"
                raise RecipeError(f"--set {item}: no key {here} (there: {keys})")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads, validates and overrides a recipe file; the result is fully resolved (defaults filled)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    recipe = validate(data, str(path), _line_index(text))
    if overrides:
        recipe = validate(apply_overrides(recipe.model_dump(), overrides), f"{path} (after --set)")
    return recipe


def recipe_dir(path: str | Path) -> Path:
    return Path(path).resolve().parent


def bundled_recipes() -> list[Path]:
    """The recipes shipped in the repository's recipes/ directory."""
    root = Path(__file__).resolve().parent.parent / "recipes"
    return sorted(root.glob("*.yaml")) if root.is_dir() else []
