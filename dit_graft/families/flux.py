"""The FLUX family adapter: diffusers `FluxTransformer2DModel` (FLUX.1: MMDiT, flow matching).

Block groups for recipes:

- `double` (the default): the double-stream blocks `transformer_blocks.{i}`, i < num_layers. Attention
  site `transformer_blocks.{i}.attn` (joint attention: text and image tokens with their own projections);
  MLP site `transformer_blocks.{i}.ff` (the image stream's FFN; the text stream's `ff_context` stays).
- `single`: the single-stream blocks `single_transformer_blocks.{i}`, i < num_single_layers. Attention site
  `single_transformer_blocks.{i}.attn` over the joint sequence; their MLP is fused into `proj_out`, so there
  is no MLP site.

Layers are numbered within a group. Depth edits (`site: depth`) rewrite one group's block list: `group:
double` (the default; config `num_layers`) or `group: single` (`num_single_layers`); no block is pinned (the
output layer reads only the image stream and the model-level time embedding). FLUX blocks carry two
residual streams, text and image, and return them as (text, image): block importance compares the joint
sequence [text; image] before and after a block (what the single blocks carry; a double block that only
turns the text stream still changes every later block's attention), a skipped block returns both streams
unchanged and a parallel pair sums both streams' residual updates.

Attention: one adapter (`JointAttentionAdapter`) gives every operator's core the joint [text; image] sequence
with a text prefix in its TokenLayout, so each core applies the CLEAR rule (text rows and columns dense):
`softmax`, `linear`, `local`, `swa`, `sparse` and `sla` run; `gated_conv` is refused at plan time with the
reason (no keys: image tokens would lose the text). MLP operators apply to `ff` as on DiT.

Samples live in the unpacked latent layout (B, C, H, W) with C = in_channels / 4 (16 for FLUX.1); the
adapter packs 2×2 latent patches into tokens (B, H/2 · W/2, 4C) around each model call and builds the
position ids (text ids 0; image ids (0, row, col)). Objective: flow matching, x_σ = (1 − σ) x0 + σ ε, the
model predicts v = ε − x0 (training σ ~ logit-normal); sampler: flow-match Euler with FLUX's
resolution-dependent time shift. FLUX.1-dev is guidance-distilled: the guidance scale (3.5) is part of the
conditions, and there is no null condition (no classifier-free guidance; `null_class_prob` has no effect).

Checkpoints in Black Forest Labs' original layout (the single `flux1-dev.safetensors` of the FLUX.1
release; keys `img_in.weight`, `double_blocks.{i}.img_attn.qkv.weight`, `single_blocks.{i}.linear1.weight`,
..., optionally under ComfyUI's `model.diffusion_model.` prefix) load through `load_bfl_flux`: templated
key maps to diffusers' names (the mapping of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`),
fused tensors split by the diffusers model's own widths, every key and shape checked before the model is
touched. diffusers' single-file loader (`FluxTransformer2DModel.from_single_file`) is not used: its converter
hard-codes FLUX.1's width (3072) when it splits the single-stream `linear1`, so it loads no other size (no
tiny model, so nothing testable here), and it skips unknown keys silently. The config is read off the
checkpoint's keys and shapes (`bfl_config`: widths, heads from the per-head norm scales, block counts, text
and pooled widths, the guidance embedder), so a BFL file of any width loads without `model.config`. The one
thing the weights do not hold is RoPE's split of the head dimension over the (index, row, column) axes: it is
FLUX.1's (16, 56, 56) at head dim 128, and the same proportions (an eighth for the index axis, the rest halved
between rows and columns, every part even) at other head dims; a checkpoint trained with another split takes
`model.config`.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxSingleTransformerBlock
from torch import nn

from dit_graft.diffusion import flow_euler_sample, flow_mu, flow_noise
from dit_graft.errors import InputError, IntegrityError
from dit_graft.families.text import read_captions, spread, synthetic_captions
from dit_graft.model.attention import AttentionAdapter, AttnContext, bind
from dit_graft.model.checkpoints import CheckpointLayout, register_layout
from dit_graft.model.conditions import Conditions
from dit_graft.model.family import Family, register_family
from dit_graft.model.io import assign_state, build_without_weights, meta_state
from dit_graft.model.site import AttentionCaps, BlockGroup, Site, Streams, TokenGrid, block_paths

# FLUX.1-dev's defaults: 1024 px images (128×128 latents), 512 T5 tokens, guidance 3.5.
DEFAULT_LATENT = 128
EXAMPLE_TEXT_TOKENS = 512
GUIDANCE = 3.5

JOINT_ARGS = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")


class JointAttentionAdapter(AttentionAdapter):
    """FLUX's joint attention: one sequence [text; image], RoPE on q and k, the cores see T text tokens in front.

    Double-stream blocks (`encoder_hidden_states` given): text and image tokens have their own projections and
    per-head RMS norms (`add_q_proj`/`to_q`, `norm_added_q`/`norm_q`, ...) and output projections (`to_add_out`,
    `to_out`); the output is (image, text). Single-stream blocks hold the joint sequence already (its text length
    is the one the model's forward recorded) and return it without projection (`proj_out` mixes attention and
    MLP). RoPE (`image_rotary_emb`, text ids first) is applied as the teacher's processor applies it, after the
    norms, so a core's softmax parts see the teacher's q·k.
    """

    caps = AttentionCaps(keys=True, grid_dims=2, text="prefix")

    def check(self, attn: nn.Module, op: str) -> None:
        if not all(hasattr(attn, a) for a in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "head_dim")):
            raise ValueError(f"the FLUX {op} processor needs a FluxAttention (got {type(attn).__name__})")
        if getattr(attn, "fused_projections", False):
            raise ValueError(f"the FLUX {op} processor needs unfused projections (call unfuse_qkv_projections first)")

    def qkv(self, attn, args, kwargs):
        a = bind(args, kwargs, JOINT_ARGS)
        x, context, rotary = a["hidden_states"], a.get("encoder_hidden_states"), a.get("image_rotary_emb")
        if a.get("attention_mask") is not None:
            raise ValueError("FLUX's grafted attention takes no attention mask")
        heads = (attn.to_q.out_features // attn.head_dim, attn.head_dim)
        q = attn.norm_q(attn.to_q(x).unflatten(-1, heads))  # (B, N, H, d)
        k = attn.norm_k(attn.to_k(x).unflatten(-1, heads))
        v = attn.to_v(x).unflatten(-1, heads)
        if context is not None:
            text = context.shape[1]
            tq = attn.norm_added_q(attn.add_q_proj(context).unflatten(-1, heads))  # (B, T, H, d)
            tk = attn.norm_added_k(attn.add_k_proj(context).unflatten(-1, heads))
            tv = attn.add_v_proj(context).unflatten(-1, heads)
            q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)  # (B, L, H, d)
        else:
            if self.grid.text is None:
                raise ValueError("FLUX's single-stream attention needs the text length (run it inside the FLUX model)")
            text = self.grid.text
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        layout = self.layout(q.shape[1] - text, text=text)
        ctx = AttnContext(dtype=q.dtype, extra={"double": context is not None, "text": text})
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, ctx  # (B, H, L, d)

    def output(self, attn, o, ctx):
        o = o.transpose(1, 2).flatten(2).to(ctx.dtype)  # (B, L, C)
        if not ctx.extra["double"]:
            return o  # single-stream block: its proj_out mixes attention and MLP
        text = ctx.extra["text"]
        o_text, o_image = o.split([text, o.shape[1] - text], dim=1)
        return attn.to_out[1](attn.to_out[0](o_image.contiguous())), attn.to_add_out(o_text.contiguous())

    def call_tokens(self, args, kwargs):
        """(N, T): a double-stream block's image tokens and the text beside them, or a single-stream block's joint
        sequence split by the recorded text length."""
        a = bind(args, kwargs, JOINT_ARGS)
        x, context = a["hidden_states"], a.get("encoder_hidden_states")
        if x.ndim != 3 or a.get("attention_mask") is not None:
            return None
        if context is not None:
            return x.shape[1], context.shape[1]
        if self.grid.text is None:
            return None
        return x.shape[1] - self.grid.text, self.grid.text


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents → (B, H/2 · W/2, 4C) tokens of 2×2 patches, row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for (H, W) latents."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: Any, dtype=torch.float32) -> torch.Tensor:
    """(h·w, 3) position ids (0, row, col) of an h×w token grid."""
    rows = torch.arange(h, device=device, dtype=dtype)[:, None].expand(h, w)
    cols = torch.arange(w, device=device, dtype=dtype)[None, :].expand(h, w)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)


def _forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
    """x (B, C, H, W) at flow time t (B,) in [0, 1] → the velocity, (B, C, H, W)."""
    _, _, h, w = x.shape
    text = cond["prompt_embeds"]
    guidance = cond.get("guidance") if model.config.guidance_embeds else None
    out = model(
        hidden_states=pack(x),
        encoder_hidden_states=text.to(x.dtype),
        pooled_projections=cond["pooled_prompt_embeds"].to(x.dtype),
        timestep=t.to(x.dtype),
        img_ids=image_ids(h // 2, w // 2, x.device, x.dtype),
        txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
        guidance=guidance.to(x.dtype) if guidance is not None else None,
    ).sample
    return unpack(out, h, w)


def _example_inputs(model: nn.Module, batch: int, resolution: int | None, device: Any) -> dict[str, Any]:
    """Packed forward kwargs for `resolution`×`resolution` latents (default 128: 1024 px) and 512 text tokens."""
    cfg = model.config
    side = (resolution or DEFAULT_LATENT) // 2
    return dict(
        hidden_states=torch.zeros(batch, side * side, cfg.in_channels, device=device),
        encoder_hidden_states=torch.zeros(batch, EXAMPLE_TEXT_TOKENS, cfg.joint_attention_dim, device=device),
        pooled_projections=torch.zeros(batch, cfg.pooled_projection_dim, device=device),
        timestep=torch.ones(batch, device=device),
        img_ids=image_ids(side, side, "cpu").to(device),
        txt_ids=torch.zeros(EXAMPLE_TEXT_TOKENS, 3, device=device),
        guidance=torch.full((batch,), GUIDANCE, device=device) if cfg.guidance_embeds else None,
    )


@lru_cache(maxsize=4)
def _captions(source: str | None, dim: int, pooled: int) -> Conditions:
    if source is None:
        return synthetic_captions(dim, pooled)
    return read_captions(source, dim, pooled, masks=False)


def _conditions(model: nn.Module, n: int, source: str | None = None) -> Conditions:
    cfg = model.config
    cond = spread(_captions(source, cfg.joint_attention_dim, cfg.pooled_projection_dim), n)
    cond.pop("prompt_attention_mask", None)  # FLUX attends to every T5 token, padding included
    if cfg.guidance_embeds:
        cond["guidance"] = torch.full((n,), GUIDANCE)
    return cond


def _sample(
    model: nn.Module, noise: torch.Tensor, cond: Conditions, steps: int = 28, cfg: float = 1.0, null=None
) -> torch.Tensor:
    """Flow-match Euler with FLUX's time shift for the image token count; `cfg` is unused (see the module doc)."""
    tokens = noise.shape[-2] * noise.shape[-1] // 4
    return flow_euler_sample(lambda x, t: _forward(model, x, t, cond), noise, steps, mu=flow_mu(tokens))


def _latent_shape(model: nn.Module, resolution: int | None = None) -> tuple[int, int, int]:
    size = resolution or DEFAULT_LATENT
    if size % 2:
        raise ValueError(f"FLUX latents pack 2×2: the latent size must be even, got {size}")
    return (model.config.in_channels // 4, size, size)


# Black Forest Labs' layout → diffusers, one tensor to one; "{i}" a block index, "{p}" weight or bias.
BFL_TO_DIFFUSERS: dict[str, str] = {
    "img_in.{p}": "x_embedder.{p}",
    "txt_in.{p}": "context_embedder.{p}",
    "time_in.in_layer.{p}": "time_text_embed.timestep_embedder.linear_1.{p}",
    "time_in.out_layer.{p}": "time_text_embed.timestep_embedder.linear_2.{p}",
    "vector_in.in_layer.{p}": "time_text_embed.text_embedder.linear_1.{p}",
    "vector_in.out_layer.{p}": "time_text_embed.text_embedder.linear_2.{p}",
    "guidance_in.in_layer.{p}": "time_text_embed.guidance_embedder.linear_1.{p}",
    "guidance_in.out_layer.{p}": "time_text_embed.guidance_embedder.linear_2.{p}",
    "final_layer.linear.{p}": "proj_out.{p}",
    "double_blocks.{i}.img_mod.lin.{p}": "transformer_blocks.{i}.norm1.linear.{p}",
    "double_blocks.{i}.txt_mod.lin.{p}": "transformer_blocks.{i}.norm1_context.linear.{p}",
    "double_blocks.{i}.img_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_q.weight",
    "double_blocks.{i}.img_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_k.weight",
    "double_blocks.{i}.txt_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_added_q.weight",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_added_k.weight",
    "double_blocks.{i}.img_attn.proj.{p}": "transformer_blocks.{i}.attn.to_out.0.{p}",
    "double_blocks.{i}.txt_attn.proj.{p}": "transformer_blocks.{i}.attn.to_add_out.{p}",
    "double_blocks.{i}.img_mlp.0.{p}": "transformer_blocks.{i}.ff.net.0.proj.{p}",
    "double_blocks.{i}.img_mlp.2.{p}": "transformer_blocks.{i}.ff.net.2.{p}",
    "double_blocks.{i}.txt_mlp.0.{p}": "transformer_blocks.{i}.ff_context.net.0.proj.{p}",
    "double_blocks.{i}.txt_mlp.2.{p}": "transformer_blocks.{i}.ff_context.net.2.{p}",
    "single_blocks.{i}.modulation.lin.{p}": "single_transformer_blocks.{i}.norm.linear.{p}",
    "single_blocks.{i}.norm.query_norm.scale": "single_transformer_blocks.{i}.attn.norm_q.weight",
    "single_blocks.{i}.norm.key_norm.scale": "single_transformer_blocks.{i}.attn.norm_k.weight",
    "single_blocks.{i}.linear2.{p}": "single_transformer_blocks.{i}.proj_out.{p}",
}

# Fused tensors → consecutive row blocks, one per diffusers tensor (row counts from the diffusers model).
BFL_SPLITS: dict[str, tuple[str, ...]] = {
    "double_blocks.{i}.img_attn.qkv.{p}": tuple(f"transformer_blocks.{{i}}.attn.to_{n}.{{p}}" for n in "qkv"),
    "double_blocks.{i}.txt_attn.qkv.{p}": tuple(f"transformer_blocks.{{i}}.attn.add_{n}_proj.{{p}}" for n in "qkv"),
    "single_blocks.{i}.linear1.{p}": (
        *(f"single_transformer_blocks.{{i}}.attn.to_{n}.{{p}}" for n in "qkv"),
        "single_transformer_blocks.{i}.proj_mlp.{p}",
    ),
}

# BFL's final modulation rows are (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift).
BFL_SWAPPED_HALVES: dict[str, str] = {"final_layer.adaLN_modulation.1.{p}": "norm_out.linear.{p}"}

# ComfyUI saves the same tensors under this prefix.
BFL_PREFIX = "model.diffusion_model."


def is_bfl_flux(keys) -> bool:
    """Whether state-dict key names are Black Forest Labs' FLUX layout (read from a safetensors header)."""
    keys = {k.removeprefix(BFL_PREFIX) for k in keys}
    return "img_in.weight" in keys and any(k.startswith("double_blocks.") for k in keys)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX.1's RoPE split (16, 56, 56) of head dim 128, in the same proportions for other head dims (parts even)."""
    first = max(2, 2 * round(head_dim / 16))
    rows = 2 * ((head_dim - first) // 4)
    cols = head_dim - first - rows
    if min(rows, cols) <= 0 or cols % 2:
        raise InputError(f"cannot split head dim {head_dim} into FLUX's three even RoPE axes: set model.config")
    return first, rows, cols


def bfl_config(shapes: dict[str, Any], hints: dict[str, Any] | None = None) -> dict[str, Any]:
    """The FluxTransformer2DModel config of a BFL checkpoint, read off its keys and shapes (module doc)."""
    shapes = {k.removeprefix(BFL_PREFIX): tuple(v) for k, v in shapes.items()}

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in shapes:
            raise IntegrityError(f"the BFL FLUX checkpoint lacks {key!r}")
        if len(shapes[key]) != ndim:
            raise IntegrityError(f"{key!r} has shape {shapes[key]}, expected {ndim} dimensions")
        return shapes[key]

    count = lambda prefix: 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith(prefix)), default=-1)
    hidden, in_channels = shape("img_in.weight", 2)
    norm = "double_blocks.0.img_attn.norm.query_norm.scale"
    head_dim = shape(norm if norm in shapes else "single_blocks.0.norm.query_norm.scale", 1)[0]
    if hidden % head_dim:
        raise IntegrityError(f"the width {hidden} is not a multiple of the head dim {head_dim} (the norm scales)")
    out_channels = shape("final_layer.linear.weight", 2)[0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": count("double_blocks."),
        "num_single_layers": count("single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shape("txt_in.weight", 2)[1],
        "pooled_projection_dim": shape("vector_in.in_layer.weight", 2)[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": list(rope_axes(head_dim)),
    }


def _bfl_entries(shapes: dict[str, torch.Size], config) -> dict[str, tuple[str, tuple[str, ...]]]:
    """BFL key → (copy | split | swap, diffusers keys) for this config, skipping targets the model lacks."""
    blocks = {"double_blocks": config["num_layers"], "single_blocks": config["num_single_layers"]}
    entries = {}
    for kind, table in (("copy", BFL_TO_DIFFUSERS), ("split", BFL_SPLITS), ("swap", BFL_SWAPPED_HALVES)):
        for source, targets in table.items():
            targets = (targets,) if isinstance(targets, str) else targets
            layers = range(blocks[source.split(".")[0]]) if "{i}" in source else [None]
            params = ("weight", "bias") if "{p}" in source else [None]
            for i in layers:
                for p in params:
                    names = tuple(t.format(i=i, p=p) for t in targets)
                    if all(n in shapes for n in names):
                        entries[source.format(i=i, p=p)] = (kind, names)
    return entries


def convert_bfl_flux_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A BFL-layout state dict → `model`'s (a FluxTransformer2DModel) state dict; every key and shape checked.

    Works on meta tensors too: a dry run checks a checkpoint's header this way.
    """
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = {k.removeprefix(BFL_PREFIX): v for k, v in state.items()}
    entries = _bfl_entries(shapes, model.config)
    unknown = sorted(set(state) - set(entries))
    if unknown:
        more = f" (+{len(unknown) - 1} more)" if unknown[1:] else ""
        raise IntegrityError(f"unknown key {unknown[0]!r}{more} for this FLUX config (model.config sets it)")
    missing = [k for k in entries if k not in state]
    if missing:
        more = f" (+{len(missing) - 1} more)" if missing[1:] else ""
        raise IntegrityError(f"the BFL FLUX checkpoint lacks {missing[0]!r}{more}")
    out: dict[str, torch.Tensor] = {}
    for source, (kind, targets) in entries.items():
        tensor = state[source]
        if kind == "split":
            rows = [shapes[t][0] for t in targets]
            expected = (sum(rows), *shapes[targets[0]][1:])
            if tuple(tensor.shape) != expected:
                raise IntegrityError(f"{source!r}: shape {tuple(tensor.shape)}, expected {expected} to split {rows}")
            parts = tensor.split(rows, dim=0)
        elif kind == "swap":
            shift, scale = tensor.chunk(2, dim=0)
            parts = (torch.cat([scale, shift], dim=0),)
        else:
            parts = (tensor,)
        for target, part in zip(targets, parts, strict=True):
            if part.shape != shapes[target]:
                raise IntegrityError(
                    f"{source!r} → {target!r}: shape {tuple(part.shape)}, the model expects {tuple(shapes[target])}"
                )
            out[target] = part
    unfilled = [k for k in shapes if k not in out]
    if unfilled:
        raise IntegrityError(f"diffusers key {unfilled[0]!r} has no source in the BFL FLUX checkpoint")
    return out


def load_bfl_flux(header: dict[str, list[int]], config: dict[str, Any], read, meta: bool = False) -> nn.Module:
    """A FluxTransformer2DModel from a BFL-layout checkpoint: `header` maps its keys to shapes, `read()` loads it.

    The model is built without weights and the keys and shapes are checked from the header alone (all a dry run
    does); then `read()` loads the tensors, which are converted and assigned in the model's dtype.
    """
    model = build_without_weights(config, meta=meta)
    convert_bfl_flux_state_dict(meta_state(header), model)
    if meta:
        return model.eval()
    return assign_state(model, convert_bfl_flux_state_dict(read(), model)).eval()


register_layout(
    CheckpointLayout(
        name="bfl-flux",
        family="flux",
        detect=is_bfl_flux,
        convert=convert_bfl_flux_state_dict,
        infer_config=lambda shapes, hints: bfl_config(shapes, hints),
        priority=10,
    )
)


# Double blocks take and return (text, image). Single blocks do too in current diffusers; older releases pass
# them the joint sequence [text; image] and get it back, one stream.
TEXT_IMAGE = Streams(("encoder_hidden_states", "hidden_states"))
_SINGLE_ARGS = inspect.signature(FluxSingleTransformerBlock.forward).parameters
SINGLE_STREAMS = TEXT_IMAGE if "encoder_hidden_states" in _SINGLE_ARGS else Streams()


class FluxFamily(Family):
    name = "flux"
    classes = ("FluxTransformer2DModel",)
    objective = "flow_velocity"
    groups = ("double", "single")
    depth_groups = (
        BlockGroup("double", "transformer_blocks", "num_layers", TEXT_IMAGE),
        BlockGroup("single", "single_transformer_blocks", "num_single_layers", SINGLE_STREAMS),
    )

    def sites(self, model: nn.Module) -> list[Site]:
        grid = self.grid(model)
        adapter = JointAttentionAdapter(grid)
        cfg = model.config
        dim, heads = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_attention_heads
        sites = []
        for i, block in enumerate(model.transformer_blocks):
            for path in block_paths(block, f"transformer_blocks.{i}"):  # a parallel_blocks pair: both branches
                sites.append(Site(f"{path}.attn", "attention", i, dim, heads, grid, "double", adapter))
                sites.append(Site(f"{path}.ff", "mlp", i, dim, None, grid, "double"))
        for i, block in enumerate(model.single_transformer_blocks):
            for path in block_paths(block, f"single_transformer_blocks.{i}"):
                sites.append(Site(f"{path}.attn", "attention", i, dim, heads, grid, "single", adapter))
        return sites

    def install_grid(self, model: nn.Module) -> TokenGrid:
        """Records the image grid (from img_ids) and the text length of every forward call."""
        grid = getattr(model, "_dit_graft_grid", None)
        if grid is not None:
            return grid
        grid = TokenGrid()

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            text = kwargs.get("encoder_hidden_states")
            ids = kwargs.get("img_ids")
            g = module._dit_graft_grid  # the module's own grid: a deep copy shares this function, not the grid
            g.text = text.shape[1] if text is not None else None
            g.shape = None  # unknown (meta tensors, no ids): operators fall back to a square grid
            if ids is not None and not ids.is_meta:
                ids = ids[0] if ids.ndim == 3 else ids
                hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
                g.shape = hw if hw[0] * hw[1] == x.shape[1] else None

        model.register_forward_pre_hook(hook, with_kwargs=True)
        object.__setattr__(model, "_dit_graft_grid", grid)
        return grid

    def stock_processor(self, site: Site) -> Any:
        return FluxAttnProcessor()

    def example_inputs(self, model, batch, resolution, device):
        return _example_inputs(model, batch, resolution, device)

    def forward(self, model, x, t, cond):
        return _forward(model, x, t, cond)

    def sample(self, model, noise, cond, steps=28, cfg=1.0, null=None):
        return _sample(model, noise, cond, steps, cfg, null)

    def conditions(self, model, n, source=None):
        return _conditions(model, n, source)

    def noise(self, model, x0, gen):
        return flow_noise(x0, gen)

    def latent_shape(self, model, resolution=None):
        return _latent_shape(model, resolution)

    def latent_multiple(self, model) -> int:
        return 2  # the 2×2 packing

    def tiny_config(self) -> dict[str, Any]:
        return dict(
            _class_name="FluxTransformer2DModel",
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=24,
            pooled_projection_dim=12,
            guidance_embeds=True,
            axes_dims_rope=[2, 2, 4],
        )

    def tiny_inputs(self, model, batch=2, seed=0):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *self.latent_shape(model, 8), generator=gen)
        _, t, _ = self.noise(model, x, gen)
        return {"x": x, "t": t, "cond": self.conditions(model, batch)}


FLUX = register_family(FluxFamily())
