"""The memory plan: what one device holds while a recipe distils, computed on the meta device (no weights).

Per device, for the recipe's resolution, per-device batch (global batch / processes), trainable scope,
dtypes, activation checkpointing, process count and strategy (ddp | fsdp):

- teacher weights: every teacher parameter in `frozen_dtype`, a full copy on every device;
- student weights: trainable parameters in float32, frozen parameters the graft edited or added in
  `frozen_dtype`; frozen parameters the graft left as they were (same name, same values) are the
  teacher's own tensors (shared, no extra bytes; counted for information). fsdp gives the student its
  own copy of every tensor and shards it over the processes;
- gradients (float32) and AdamW's two float32 states, for trainable parameters only (fsdp: sharded);
  ddp over several processes averages the gradients through one flat float32 buffer after backward
  (counted beyond what the freed activations leave);
- fsdp: block 0 (kept gathered), the block being computed and the one prefetched, unsharded, and one
  block's gradients before the reduce-scatter;
- activations saved for the student's backward, measured (see `measure_activations`): the student runs
  one forward on the meta device at batch 1 and the recipe's resolution with each parameter's
  `requires_grad` set as the scope says (the trainer's scopes: `touched_modules`), and every tensor
  autograd saves is counted once (by storage; parameters excluded), attributed to the transformer
  block running when it was saved (attention cores as their kernels save: `_guarded_cores`). Without
  checkpointing a device holds all of them × the batch; with it, every block's inputs (what a checkpoint
  keeps) plus one block's own activations while that block is recomputed. Attention goes through a shim of
  `F.scaled_dot_product_attention` that saves what a fused kernel saves (q, k, v, the output and the
  float32 log-sum-exp: flash attention on GPUs, the grid operators' Triton kernels, PyTorch's CPU flash
  path); the math path, which materialises the B·H·N·M probabilities, adds them (`Settings.attention = "math"`);
- activations are in the autocast dtype (mixed precision's, else a non-float32 frozen dtype's); under
  autocast, its low-precision copies of float32 weights that backward needs (trainable ones and float32
  frozen ones) are held from forward to backward (one block's worth with checkpointing; fsdp
  runs without a mixed-precision policy, so the same);
- working memory: the transient peak beyond the saved tensors — a few activation-sized gradient buffers
  during backward, or the probabilities and their gradient on the math path (also what the teacher's
  no_grad forward peaks at); with `feature_mse`, every teacher block output is held for the loss;
- on a GPU, a reserve for the CUDA context and the caching allocator's fragmentation (an allowance:
  1 GiB + 5 % of the rest; not measured).

The pool of teacher samples is reported by its size on disk (it is also read into host memory, not the
device's). `tests/test_memory.py` checks the estimate against the measured peak RSS of tiny models trained
on the CPU (fresh process, a few AdamW steps): within 1.5× either way.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dit_graft.errors import InputError

SCOPES = ("new", "grafted", "all", "lora")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
COMPUTE_DTYPE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 1024**3
DEFAULT_DEVICE_BYTES = 80 * 10**9  # "80 GB" (SI; an 80 GB H100 reports 85.0e9 bytes to torch)
# Working memory during backward, in units of the largest per-sample activation a block saves: the
# incoming and outgoing gradient of a block and the gradients of the op being differentiated.
BACKWARD_BUFFERS = 4
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB|K|M|G|T)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str, where: str = "--device-memory") -> int:
    """'80GB', '141 GB', '79.6GiB' → bytes (GB = 10⁹, GiB = 2³⁰; a bare number is GB; else an InputError)."""
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"{where} {text}: expected a positive size such as 80GB, 141GB or 79.6GiB")
    unit = (m.group(2) or "GB").upper()
    return int(float(m.group(1)) * _UNITS[unit])


def default_device_bytes() -> tuple[int, str]:
    """The local GPU's memory when torch sees one, else 80 GB; with a description."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.name} (local GPU)"
    return DEFAULT_DEVICE_BYTES, "80 GB (default; no local GPU)"


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if abs(n) >= 0.095 * GIB else f"{n / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------------
# What the model is made of: parameters per scope, measured activations per scope


@dataclass
class ScopeParams:
    """Parameter counts of the student under one trainable scope."""

    trainable: int  # float32, with gradients and AdamW states
    frozen_own: int  # frozen, not the teacher's tensor (edited or added by the graft): frozen_dtype
    shared: int  # frozen, the teacher's own tensor: no extra bytes
    trainable_matmul: int  # trainable weights of Linear/Conv layers (autocast copies them)
    frozen_matmul: int  # frozen weights of Linear/Conv layers (autocast copies them when stored in float32)
    largest_block_trainable: int  # the most trainable parameters in one block
    largest_block_trainable_matmul: int


@dataclass
class Activations:
    """Bytes autograd saves for the student's backward, per sample, in the compute dtype."""

    outside: int  # saved outside the transformer blocks (embeddings, final layer)
    blocks: list[int]  # saved inside each block
    block_inputs: int  # the blocks' tensor inputs, each counted once (what per-block checkpoints keep)
    largest: int  # the largest single saved tensor
    math_extra_outside: int = 0  # the attention probabilities the math SDPA path would also save
    math_extra_blocks: list[int] = field(default_factory=list)
    largest_probs: int = 0  # one attention call's probabilities (the math path's working memory)
    block_outputs: int = 0  # every block's output (held for feature_mse)

    def saved(self, checkpointing: bool, math_attention: bool) -> int:
        blocks = [b + (m if math_attention else 0) for b, m in zip(self.blocks, self.math_extra_blocks, strict=True)]
        outside = self.outside + (self.math_extra_outside if math_attention else 0)
        if not checkpointing:
            return outside + sum(blocks)
        return outside + self.block_inputs + max(blocks, default=0)


@dataclass
class ModelProfile:
    """Everything the plan needs, measured once on the meta device."""

    family: str
    resolution_px: int | None
    teacher_params: int
    student_params: int
    largest_teacher_block: int
    largest_student_block: int
    scopes: dict[str, ScopeParams]
    activations: dict[str, Activations]  # by scope (lora: the grafted scope's)
    pool_bytes_per_sample: int
    compute_dtype: str


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` on the meta device; its weights are never copied (full-size models cost nothing)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _inherited_apply(teacher: nn.Module, graft_plan) -> tuple[nn.Module, nn.Module]:
    """A meta copy of the teacher and the student built from it in place, so inherited tensors stay identical."""
    from dit_graft.plan import apply

    base = meta_copy(teacher)
    originals = list(base.named_parameters())  # kept alive: their ids must not be reused by new parameters
    student = apply(base, graft_plan, inplace=True)
    fresh = meta_copy(teacher)  # `base` was consumed by the in-place apply
    object.__setattr__(student, "_dit_graft_teacher_params", originals)
    return fresh, student


@dataclass
class Touched:
    """The modules the edits touched, as the trainer's scopes see them (`dit_graft.training.scope`)."""

    paths: list[str]  # student paths of the stage-1 targets (grafted sites, merged blocks)
    new: set[str]  # parameters of those modules with no same-named parameter in the teacher module they replace
    lora_modules: list[str]  # the Linear layers inside them


_BRANCH = re.compile(r"branches\.\d+\.")


def touched_modules(teacher: nn.Module, student: nn.Module, graft_plan) -> Touched:
    """The stage-1 targets of the plan (`dit_graft.training.stages.targets`) and what each scope trains in them."""
    from dit_graft.training.stages import targets

    paths, new, lora = [], set(), []
    for tgt in targets(teacher, student, graft_plan):
        paths.append(tgt.student)
        try:
            known = {n for n, _ in teacher.get_submodule(tgt.first).named_parameters()}
        except AttributeError:
            known = set()
        module = student.get_submodule(tgt.student)
        for name, _ in module.named_parameters():
            if _BRANCH.sub("", name) not in known and name not in known:
                new.add(f"{tgt.student}.{name}")
        lora += [f"{tgt.student}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]
    return Touched(paths, new, list(dict.fromkeys(lora)))


def _under(name: str, paths: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in paths)


def scope_of(student: nn.Module, touched: Touched, scope: str, teacher_ids: dict[int, str]) -> dict[str, str]:
    """name → 'trainable' | 'frozen_own' | 'shared' for every student parameter under `scope`.

    As the trainer selects them: `new`: the touched modules' parameters the teacher module they replace
    does not have; `grafted`: every parameter of the touched modules; `all`: everything; `lora`: the `new`
    parameters outside the adapted Linear layers (the adapters are counted apart). A frozen parameter that
    is the teacher's own tensor under the same name (inherited unedited), or a builder's copy with the name
    and shape of a teacher parameter (the trainer shares those when their values are equal: a sliced MLP's
    output bias, say), is shared; other frozen ones are the student's own. `teacher_ids` maps id → (name,
    shape) of the teacher's parameters.
    """
    shapes = {name: shape for name, shape in teacher_ids.values()}
    out = {}
    for name, p in student.named_parameters():
        if scope == "all":
            train = True
        elif scope == "grafted":
            train = _under(name, touched.paths)
        elif scope == "new":
            train = name in touched.new
        else:
            train = name in touched.new and name.rsplit(".", 1)[0] not in touched.lora_modules
        if id(p) in teacher_ids:  # the teacher's tensor itself: shared where its name is unchanged
            shared = teacher_ids[id(p)][0] == name
        else:  # a builder's copy: the trainer shares it when it equals the teacher's (same name, same shape)
            shared = shapes.get(name) == tuple(p.shape)
        out[name] = "trainable" if train else "shared" if shared else "frozen_own"
    return out


def lora_params(student: nn.Module, touched: Touched, rank: int) -> tuple[int, int]:
    """(LoRA parameters, the most on one layer) for rank-r adapters on the touched modules' Linear layers."""
    per_module = [rank * (m.in_features + m.out_features) for m in map(student.get_submodule, touched.lora_modules)]
    return sum(per_module), max(per_module, default=0)


def _block_of(name: str, block_paths: list[str]) -> str | None:
    for b in block_paths:
        if name.startswith(b + "."):
            return b
    return None


def _scope_params(student, touched, scope, teacher_ids, block_paths, lora_rank) -> ScopeParams:
    kinds = scope_of(student, touched, scope, teacher_ids)
    matmul = {f"{n}.weight" for n, m in student.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    counts = {"trainable": 0, "frozen_own": 0, "shared": 0}
    t_mm = f_mm = 0
    per_block: dict[str, list[int]] = {}
    for name, p in student.named_parameters():
        kind = kinds[name]
        counts[kind] += p.numel()
        if name in matmul:
            if kind == "trainable":
                t_mm += p.numel()
            else:
                f_mm += p.numel()
        if kind == "trainable" and (b := _block_of(name, block_paths)) is not None:
            acc = per_block.setdefault(b, [0, 0])
            acc[0] += p.numel()
            acc[1] += p.numel() if name in matmul else 0
    largest, largest_mm = max(per_block.values(), default=[0, 0], key=lambda v: v[0])
    if scope == "lora":
        total, per_module = lora_params(student, touched, lora_rank)
        counts["trainable"] += total
        t_mm += total
        largest += per_module  # a block's adapters are a few of these; small either way
        largest_mm += per_module
    return ScopeParams(counts["trainable"], counts["frozen_own"], counts["shared"], t_mm, f_mm, largest, largest_mm)


class _SdpaShim(torch.autograd.Function):
    """On meta tensors: the output of SDPA, saving what a fused kernel saves (q, k, v, out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the measurement does no backward
        raise RuntimeError("the SDPA shim only measures saved tensors")


class _Recorder:
    """Counts saved tensors once per storage, per block; parameters excluded."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.seen: set[int] = set()
        self.keep: list[torch.Tensor] = []  # keeps storages alive so their ids stay unique
        self.current: int | None = None
        self.outside = 0
        self.blocks = [0] * len(blocks)
        self.math_outside = 0
        self.math_blocks = [0] * len(blocks)
        self.largest = 0
        self.largest_probs = 0
        self.input_bytes = 0
        self.output_bytes = 0
        self.handles = []
        for i, b in enumerate(blocks):
            self.handles.append(b.register_forward_pre_hook(self._enter(i), with_kwargs=True))
            self.handles.append(b.register_forward_hook(self._leave))

    def _enter(self, i: int):
        def hook(module, args, kwargs):
            self.current = i
            for t in _tensors((args, kwargs)):
                key = t.untyped_storage()._cdata
                if key not in self.seen and key not in self.params:
                    self.seen.add(key)
                    self.keep.append(t)
                    self.input_bytes += t.untyped_storage().nbytes()

        return hook

    def _leave(self, module, args, out):
        self.current = None
        self.output_bytes += sum(t.numel() * t.element_size() for t in _tensors(out))

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key in self.params or key in self.seen:
            return t
        self.seen.add(key)
        self.keep.append(t)
        n = t.untyped_storage().nbytes()
        self.largest = max(self.largest, n)
        if self.current is None:
            self.outside += n
        else:
            self.blocks[self.current] += n
        return t

    def state(self) -> tuple:
        return (
            set(self.seen),
            len(self.keep),
            self.outside,
            list(self.blocks),
            self.math_outside,
            list(self.math_blocks),
            self.largest,
            self.largest_probs,
        )

    def restore(self, state: tuple) -> None:
        seen, keep, self.outside, self.blocks, self.math_outside, self.math_blocks, self.largest, self.largest_probs = (
            state
        )
        self.seen = seen
        del self.keep[keep:]

    def math_probs(self, n: int) -> None:
        self.largest_probs = max(self.largest_probs, n)
        if self.current is None:
            self.math_outside += n
        else:
            self.math_blocks[self.current] += n

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return [t for v in getattr(obj, "__dict__", {}).values() if isinstance(v, torch.Tensor) for t in [v]]


@contextlib.contextmanager
def _sdpa_shim(recorder: _Recorder):
    """Replaces F.scaled_dot_product_attention for the measurement (every caller looks it up on F)."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value  # F's own argument names: diffusers' attention dispatch passes them by keyword
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            batch = math.prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
            recorder.math_probs(batch * q.shape[-2] * k.shape[-2] * q.element_size())
            return _SdpaShim.apply(q, k, v)
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def _guarded_cores(model: nn.Module, recorder: _Recorder):
    """Attention cores are counted as their kernels save, not as a dense PyTorch fallback would.

    A core runs on the meta device as it is (SDPA inside it goes through the shim above). If it cannot
    run there (a path that needs real values, `.item()` on a mask) or if it saves a materialised
    Nq × Nk score matrix (a dense reference path; the GPU runs a fused or blockwise kernel instead), what
    it saved is forgotten and it is counted as a fused kernel: q, k, v, output and log-sum-exp, with the
    probabilities as the math-path extra.
    """
    from dit_graft.model.attention import AttentionCore

    cores = [m for m in model.modules() if isinstance(m, AttentionCore)]

    def guard(core):
        original = core.forward

        def forward(q, k, v, layout, key_mask=None):
            state = recorder.state()
            pairs = math.prod(q.shape[:-1]) * k.shape[-2]  # B·H·Nq·Nk
            try:
                out = original(q, k, v, layout, key_mask)
                if all(t.numel() < pairs for t in recorder.keep[state[1] :]):
                    return out
            except (RuntimeError, NotImplementedError):
                pass
            recorder.restore(state)
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                recorder.math_probs(pairs * q.element_size())
                return _SdpaShim.apply(q, k, v)
            return q.new_empty((*q.shape[:-1], v.shape[-1]))

        return forward

    for core in cores:
        core.forward = guard(core)
    try:
        yield
    finally:
        for core in cores:
            del core.forward


def measure_activations(
    student: nn.Module,
    family,
    trainable: set[str],
    resolution: int | None,
    dtype: torch.dtype,
) -> Activations:
    """Saved-for-backward bytes of one sample through `student` (on the meta device), with only `trainable` training.

    `resolution` is the latent size (None: the model's own); inputs and parameters are taken in `dtype`
    (the autocast dtype: what most activations are under mixed precision).
    """
    device = torch.device("meta")
    model = nn.Module.to(student, device=device, dtype=dtype)  # diffusers' own .to() warns about dtypes
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    inputs = {
        k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in family.example_inputs(model, 1, resolution, device).items()
    }
    blocks = family.blocks(model)
    rec = _Recorder(model, blocks)
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t),
            _sdpa_shim(rec),
            _guarded_cores(model, rec),
        ):
            model(**inputs)
    finally:
        rec.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return Activations(
        outside=rec.outside,
        blocks=rec.blocks,
        block_inputs=rec.input_bytes,
        largest=rec.largest,
        math_extra_outside=rec.math_outside,
        math_extra_blocks=rec.math_blocks,
        largest_probs=rec.largest_probs,
        block_outputs=rec.output_bytes,
    )


def _pool_bytes_per_sample(teacher, family, latent: int | None, conditions: str | None) -> int:
    """Bytes one pool row takes on disk: the float32 latent and its conditions (as `teacher_pool` stores them)."""
    image = math.prod(family.latent_shape(teacher, latent)) * 4
    try:
        cond = family.conditions(teacher, 1, conditions)
    except Exception:  # noqa: BLE001 - an unreadable conditions file: the synthetic set's size stands in
        cond = family.conditions(teacher, 1, None)
    return image + sum(v[:1].numel() * v.element_size() for v in cond.values())


def profile(teacher: nn.Module, graft_plan, recipe) -> ModelProfile:
    """Measures a recipe's teacher and student on the meta device (`teacher` itself is not touched)."""
    from dit_graft.families import family_for

    family = family_for(teacher)
    cfg = recipe.distill
    scale = family.vae_scale(teacher)
    if cfg.resolution is not None and cfg.resolution % scale:
        raise InputError(f"distill.resolution: {cfg.resolution} px is not a multiple of the VAE factor {scale}")
    latent = cfg.resolution // scale if cfg.resolution is not None else None
    fresh, student = _inherited_apply(teacher, graft_plan)
    teacher_ids = {id(p): (n, tuple(p.shape)) for n, p in student._dit_graft_teacher_params}
    block_paths = _block_paths(student, family)
    touched = touched_modules(fresh, student, graft_plan)
    scopes = {s: _scope_params(student, touched, s, teacher_ids, block_paths, cfg.lora.rank) for s in SCOPES}
    t_blocks = family.blocks(fresh)
    s_blocks = family.blocks(student)
    largest_t = max((sum(p.numel() for p in b.parameters()) for b in t_blocks), default=0)
    largest_s = max((sum(p.numel() for p in b.parameters()) for b in s_blocks), default=0)
    pool = _pool_bytes_per_sample(fresh, family, latent, cfg.conditions)
    dtype = COMPUTE_DTYPE[cfg.mixed_precision]
    acts = {}
    for s in ("all", "grafted", "new"):
        kinds = scope_of(student, touched, s, teacher_ids)
        acts[s] = measure_activations(student, family, {n for n, k in kinds.items() if k == "trainable"}, latent, dtype)
    acts["lora"] = acts["grafted"]  # adapters on the grafted Linear layers save what training them saves
    px = latent * family.vae_scale(teacher) if latent else None
    if px is None:
        with contextlib.suppress(Exception):
            px = family.latent_shape(teacher)[-1] * family.vae_scale(teacher)
    return ModelProfile(
        family=family.name,
        resolution_px=px,
        teacher_params=sum(p.numel() for p in fresh.parameters()),
        student_params=sum(p.numel() for p in student.parameters()),
        largest_teacher_block=largest_t,
        largest_student_block=largest_s,
        scopes=scopes,
        activations=acts,
        pool_bytes_per_sample=pool,
        compute_dtype=str(dtype).removeprefix("torch."),
    )


def _block_paths(model: nn.Module, family) -> list[str]:
    ids = {id(b) for b in family.blocks(model)}
    return [n for n, m in model.named_modules() if id(m) in ids]


# ---------------------------------------------------------------------------------------------------
# The plan: bytes per device for one set of settings, and the search for settings that fit


@dataclass(frozen=True)
class Settings:
    """The knobs the plan depends on (the recipe's values, or a suggestion)."""

    trainable: str
    frozen_dtype: str
    gradient_checkpointing: bool
    parallel: str
    processes: int
    batch_size: int  # global
    grad_accum: int
    mixed_precision: str
    attention: str = "flash"  # flash (fused kernels) | math (SDPA's math path: scores materialised)
    gpu: bool = True  # reserve for the CUDA context and allocator

    @property
    def per_device_batch(self) -> int:
        return max(1, self.batch_size // self.processes)

    def overrides(self, base: Settings) -> list[str]:
        """The --set overrides (and launch change) turning `base` into these settings."""
        out = []
        for key in ("trainable", "frozen_dtype", "gradient_checkpointing", "parallel", "batch_size", "grad_accum"):
            if getattr(self, key) != getattr(base, key):
                value = getattr(self, key)
                out.append(f"distill.{key}={str(value).lower() if isinstance(value, bool) else value}")
        if self.processes != base.processes:
            out.append(f"{self.processes} processes")
        return out


@dataclass
class MemoryPlan:
    """Bytes per device, by part, against a device size."""

    settings: Settings
    rows: dict[str, int]
    shared_params: int
    total: int
    device_bytes: int
    device_name: str
    fits: bool
    pool_disk: int
    per_device_batch: int
    suggestions: list[tuple[Settings, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self, base: Settings | None = None) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "per_device_batch": self.per_device_batch,
            "bytes": self.rows,
            "total_bytes": self.total,
            "device_bytes": self.device_bytes,
            "device": self.device_name,
            "fits": self.fits,
            "shared_params": self.shared_params,
            "pool_disk_bytes": self.pool_disk,
            "suggestions": [{"set": s.overrides(base or self.settings), "total_bytes": t} for s, t in self.suggestions],
            "notes": self.notes,
        }


def settings_from(recipe, processes: int = 1, attention: str = "flash", gpu: bool = True) -> Settings:
    cfg = recipe.distill
    return Settings(
        trainable=cfg.trainable,
        frozen_dtype=cfg.frozen_dtype,
        gradient_checkpointing=cfg.gradient_checkpointing,
        parallel=cfg.parallel,
        processes=processes,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
        attention=attention,
        gpu=gpu,
    )


def compute_bytes(s: Settings) -> int:
    """Bytes per activation element: the autocast dtype — mixed precision's, else a non-float32 frozen dtype's."""
    if s.mixed_precision != "no":
        return DTYPE_BYTES[str(COMPUTE_DTYPE[s.mixed_precision]).removeprefix("torch.")]
    return DTYPE_BYTES[s.frozen_dtype]


def estimate(prof: ModelProfile, s: Settings, feature_mse: bool = False) -> dict[str, int]:
    """Bytes per device, by part, for settings `s` (see the module docstring).

    As the trainer runs (`dit_graft.pipeline`): the teacher is a full copy in `frozen_dtype` on every
    device; ddp keeps the whole student per device and averages gradients through one flat buffer per
    dtype after backward; fsdp gives the student its own copy of every tensor (none shared) and shards
    it, its gradients and AdamW states, one unit per block (block 0 stays gathered), without a
    mixed-precision policy (autocast casts as under ddp).
    """
    f = DTYPE_BYTES[s.frozen_dtype]
    c = compute_bytes(s)
    scale = c / DTYPE_BYTES[prof.compute_dtype]  # activations were measured in the profile's compute dtype
    sp = prof.scopes[s.trainable]
    n = s.processes
    fsdp = s.parallel == "fsdp" and n > 1
    b = s.per_device_batch
    acts = prof.activations[s.trainable]
    rows = {"teacher weights": prof.teacher_params * f}
    if fsdp:
        rows["student weights (own)"] = (sp.trainable * 4 + (sp.frozen_own + sp.shared) * f) // n
    else:
        rows["student weights (own)"] = sp.trainable * 4 + sp.frozen_own * f
    rows["gradients"] = sp.trainable * 4 // (n if fsdp else 1)
    rows["optimizer state (AdamW)"] = sp.trainable * 8 // (n if fsdp else 1)
    if fsdp:  # block 0 kept gathered, the block computed and the one prefetched; one block's full gradients
        rows["FSDP unsharded blocks"] = 3 * prof.largest_student_block * 4 + sp.largest_block_trainable * 4
    math_attention = s.attention == "math"
    saved = int(b * acts.saved(s.gradient_checkpointing, math_attention) * scale)
    rows["activations"] = saved
    if c < 4:  # autocast: mixed precision, or the frozen dtype without it
        copies = sp.largest_block_trainable_matmul if s.gradient_checkpointing else sp.trainable_matmul
        if s.frozen_dtype == "float32":
            per_block = sp.frozen_matmul // max(len(acts.blocks), 1)
            copies += per_block if s.gradient_checkpointing else sp.frozen_matmul
        rows["autocast weight copies"] = copies * c
    work = BACKWARD_BUFFERS * acts.largest
    if math_attention:
        work = max(work, 2 * acts.largest_probs)
    rows["working memory"] = int(b * work * scale)
    if feature_mse:
        rows["teacher block outputs (feature_mse)"] = int(b * acts.block_outputs * scale)
    if s.parallel == "ddp" and n > 1:  # allocated after backward, when the activations are gone
        rows["gradient all-reduce buffer (beyond activations)"] = max(0, sp.trainable * 4 - saved - b * work)
    if s.gpu:
        rows["CUDA context + allocator reserve"] = GIB + sum(rows.values()) // 20
    return rows


def plan_memory(
    prof: ModelProfile,
    settings: Settings,
    device_bytes: int,
    device_name: str,
    pool_size: int,
    feature_mse: bool = False,
    suggest: int = 3,
) -> MemoryPlan:
    rows = estimate(prof, settings, feature_mse)
    total = sum(rows.values())
    plan = MemoryPlan(
        settings=settings,
        rows=rows,
        shared_params=prof.scopes[settings.trainable].shared,
        total=total,
        device_bytes=device_bytes,
        device_name=device_name,
        fits=total <= device_bytes,
        pool_disk=pool_size * prof.pool_bytes_per_sample,
        per_device_batch=settings.per_device_batch,
    )
    if not prof.scopes[settings.trainable].trainable:
        plan.notes.append(f"distill.trainable: {settings.trainable} matches no parameter of this student")
    if settings.batch_size % settings.processes:
        plan.notes.append(
            f"distill.batch_size {settings.batch_size} is not divisible by {settings.processes} processes"
        )
    if not plan.fits and suggest:
        plan.suggestions = search(prof, settings, device_bytes, feature_mse)[:suggest]
    return plan


# how much a change of each knob costs the user (cheapest first)
_CHANGE_COST = {
    "gradient_checkpointing": 1,
    "frozen_dtype": 1,
    "batch": 2,
    "parallel": 2,
    "trainable": 3,
    "processes": 4,
}


def search(
    prof: ModelProfile, base: Settings, device_bytes: int, feature_mse: bool = False
) -> list[tuple[Settings, int]]:
    """Settings that fit, fewest and cheapest changes first: scope, frozen dtype, checkpointing, fsdp over N, batch.

    The global batch is kept: a smaller batch per step is made up by gradient accumulation.
    """
    effective = base.batch_size * base.grad_accum
    batches = sorted({base.batch_size, *(b for b in (1, 2, 4, 8, 16, 32, 64) if b < base.batch_size)}, reverse=True)
    found = []
    for scope, fdt, ckpt, (par, n), batch in itertools.product(
        SCOPES,
        ("float32", "bfloat16"),
        (False, True),
        [("ddp", base.processes), ("fsdp", base.processes), *(("fsdp", n) for n in (2, 4, 8) if n > base.processes)],
        batches,
    ):
        if batch % n or effective % batch or not prof.scopes[scope].trainable:
            continue
        if par == "ddp" and base.parallel == "fsdp" and n == base.processes:
            par = "fsdp"
        s = replace(
            base,
            trainable=scope,
            frozen_dtype=fdt,
            gradient_checkpointing=ckpt,
            parallel=par,
            processes=n,
            batch_size=batch,
            grad_accum=effective // batch,
        )
        if s == base:
            continue
        total = sum(estimate(prof, s, feature_mse).values())
        if total > device_bytes:
            continue
        cost = sum(
            _CHANGE_COST[k]
            for k, changed in (
                ("gradient_checkpointing", ckpt != base.gradient_checkpointing),
                ("frozen_dtype", fdt != base.frozen_dtype),
                ("batch", batch != base.batch_size),
                ("parallel", par != base.parallel),
                ("trainable", scope != base.trainable),
                ("processes", n != base.processes),
            )
            if changed
        )
        found.append((cost, total, s))
    found.sort(key=lambda x: (x[0], x[1]))
    unique, seen = [], set()
    for _, total, s in found:
        if s not in seen:
            seen.add(s)
            unique.append((s, total))
    return unique


def device_from(text: str | None) -> tuple[int, str]:
    """`--device-memory` → (bytes, description); None: the local GPU's memory, else 80 GB."""
    if text is None:
        return default_device_bytes()
    return parse_size(text), f"{text} (--device-memory)"


def processes_from(n: int | None) -> int:
    """Processes to plan for: the option, else the launcher's WORLD_SIZE, else 1."""
    import os

    if n is not None:
        return n
    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) if world.isdigit() and int(world) > 0 else 1


def plan_for(teacher: nn.Module, graft_plan, recipe, device: tuple[int, str], processes: int) -> MemoryPlan:
    """The recipe's memory plan per device on `processes` GPUs of `device` size, with suggestions if it does not fit."""
    prof = profile(teacher, graft_plan, recipe)
    settings = settings_from(recipe, processes)
    return plan_memory(
        prof,
        settings,
        device[0],
        device[1],
        recipe.distill.pool_size,
        feature_mse=recipe.distill.losses.feature_mse > 0,
    )
