"""The Wan family adapter: diffusers `WanTransformer3DModel` (Wan2.1 / Wan2.2 video DiTs, flow matching).

Each block (`blocks.{i}`) is self-attention `attn1` over the video tokens (RMSNorm on q and k over the
full width, then the head split, then 3-D RoPE), cross-attention `attn2` to the umT5 caption (and, in the
I2V models, to the CLIP image tokens through `add_k_proj`/`add_v_proj`), and the MLP `ffn`. Block groups
for recipes, named as PixArt's:

- `self` (the default): `blocks.{i}.attn1` (attention sites) and `blocks.{i}.ffn` (MLP sites).
- `cross`: `blocks.{i}.attn2`, an attention site kept as softmax unless an edit names this group; there
  the caption keys can be attended by `softmax` or `linear` only (no grid on the keys). The I2V image
  branch of `attn2` always stays softmax (257 image tokens; see WanCrossAttentionAdapter).

Depth edits (`site: depth`) rewrite `blocks` (config `num_layers`); no block is pinned (the output layer
reads only the model-level time embedding and `scale_shift_table`). Blocks are called positionally as
block(hidden_states, encoder_hidden_states, temb, rotary_emb) and return the one video stream.

Samples are video latents (B, C, F, H, W): F = 1 + (frames − 1) / 4 latent frames, H, W = pixels / 8
(Wan2.1's VAE and Wan2.2-A14B's; Wan2.2-TI2V-5B's 48-channel VAE compresses 16× spatially). The patch
(1, 2, 2) makes a token grid of (F, H/2, W/2) — (21, 30, 52) = 32,760 tokens at 480p × 81 frames. The
model takes timesteps t = 1000 σ.

Objective and sampler as diffusers' `WanPipeline`: flow matching x_σ = (1 − σ) x0 + σ ε, the model
predicts v = ε − x0; sampling with diffusers' `UniPCMultistepScheduler` in the configuration of the
Wan-AI Diffusers repositories (flow_prediction, flow sigmas, order 2, bh2) at the model's flow shift,
classifier-free guidance through the negative caption (the empty caption's embedding from a cached file;
zero features for the synthetic set). The flow shift, and the A14B low-noise expert's own guidance scale,
are per model (`SAMPLING`, from the authors' configs: 3.0 for T2V-1.3B at 480p, 5.0 for T2V-14B and
TI2V-5B, 12.0 for T2V-A14B with guidance 4.0 high noise / 3.0 low noise), overridable per conversion
(`set_sampling`, the family's runtime options `flow_shift` / `guidance_2`, recorded in graft.json).
Training noise levels: σ uniform in (0, 1) mapped through the same shift, σ' = sσ / (1 + (s − 1)σ), so
distillation sees the noise levels sampling visits (Wan's training code is not released; this is
dit-graft's choice). Conditions: `prompt_embeds`
(B, 512, text_dim) umT5 features, zero-padded after the caption, no mask (Wan attends to all 512).

Checkpoints in Wan's original layout (the Wan-Video/Wan2.1 and Wan2.2 repositories' `WanModel`: keys
`patch_embedding.weight`, `blocks.{i}.self_attn.q.weight`, `head.head.weight`, ...; optionally under
ComfyUI's `model.diffusion_model.` prefix) convert one tensor to one (`convert_original_wan_state_dict`),
every key and shape checked, the config read off the shapes (`original_wan_config`; heads = width / 128,
the head width of every released Wan model, unless given).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dit_graft.errors import IntegrityError
from dit_graft.families.text import read_captions, spread, synthetic_captions
from dit_graft.model.attention import AttentionAdapter, AttnContext, bind
from dit_graft.model.checkpoints import CheckpointLayout, register_layout
from dit_graft.model.conditions import Conditions
from dit_graft.model.family import Family, register_family
from dit_graft.model.layout import TokenLayout
from dit_graft.model.site import AttentionCaps, BlockGroup, Site, Streams, TokenGrid, block_paths

TEXT_TOKENS = 512  # umT5 context length: Wan's text_len, hard-coded in diffusers' I2V split
HEAD_DIM = 128  # every released Wan model (1.3B: 12 × 128, 5B: 24 × 128, 14B: 40 × 128)
FLOW_SHIFT = 3.0  # diffusers' WanPipeline default and the Wan2.1-T2V-1.3B-Diffusers scheduler (unknown models)
GUIDANCE = 5.0  # WanPipeline's default guidance_scale
NUM_TRAIN_TIMESTEPS = 1000
# (pixel frames, height, width) the dry run costs: Wan's 480p and 720p at 81 frames (5 s at 16 fps)
VIDEO_SIZES: dict[str, tuple[int, int, int]] = {"480p×81": (81, 480, 832), "720p×81": (81, 720, 1280)}
DEFAULT_SIZE = "480p×81"
# Wan2.2-TI2V-5B's 720p is 704×1280 (its VAE × patch needs multiples of 32 px)
VIDEO_SIZES_16X: dict[str, tuple[int, int, int]] = {"480p×81": (81, 480, 832), "720p×81": (81, 704, 1280)}
DEFAULT_FRAMES = 81  # an int `resolution` (an image side) gets this many pixel frames

# The UniPC configuration of the Wan-AI/Wan2.1-T2V-*-Diffusers scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=FLOW_SHIFT,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)


@dataclass(frozen=True)
class Sampling:
    """A released model's sampler settings: UniPC's flow shift (also the shift of the training noise levels) and
    its guidance scales — `guidance` for t ≥ boundary (a single model: every step), `guidance_2` for the A14B
    low-noise expert (t < boundary); WanPipeline's guidance_scale and guidance_scale_2."""

    flow_shift: float = FLOW_SHIFT
    guidance: float = GUIDANCE
    guidance_2: float | None = None


# Bundled config → its settings, from the authors' code (Wan-Video/Wan2.1 generate.py at 9737cba, Wan-Video/Wan2.2
# wan/configs/ at 42bf4cf; the original code applies the same shift σ' = sσ / (1 + (s − 1)σ) as diffusers' flow_shift):
SAMPLING: dict[str, Sampling] = {
    # a 480p model: the Wan2.1 README's diffusers example (flow_shift "5.0 for 720P, 3.0 for 480P") and diffusers'
    # WanPipeline default; Wan2.1's own generate.py uses 5.0 for T2V at every size (3.0 only for I2V at 480p),
    # and its README suggests shift 8–12 with guidance 6 for this model
    "wan2.1-t2v-1.3b": Sampling(3.0, 5.0),
    "wan2.1-t2v-14b": Sampling(5.0, 5.0),  # generate.py's T2V default sample_shift 5.0 (720p), guide scale 5.0
    "wan2.2-ti2v-5b": Sampling(5.0, 5.0),  # wan_ti2v_5B.py: sample_shift 5.0, sample_guide_scale 5.0
    "wan2.2-t2v-a14b": Sampling(12.0, 4.0, 3.0),  # wan_t2v_A14B.py: shift 12.0, guide (3.0 low noise, 4.0 high)
}


def released_model(model: nn.Module) -> str | None:
    """The bundled config `model`'s architecture is (None for other sizes): TI2V-5B by its 48 latent channels,
    T2V-1.3B by width 1536, T2V-14B by width 5120 — A14B when linked as experts (the same architecture)."""
    cfg = model.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    if cfg.in_channels == 48 and width == 3072:
        return "wan2.2-ti2v-5b"
    if cfg.image_dim is not None or cfg.in_channels != 16:
        return None
    if width == 1536 and cfg.num_layers == 30:
        return "wan2.1-t2v-1.3b"
    if width == 5120 and cfg.num_layers == 40:
        return "wan2.2-t2v-a14b" if model in _EXPERTS else "wan2.1-t2v-14b"
    return None


def sampling(model: nn.Module) -> Sampling:
    """`model`'s sampler settings: those `set_sampling` gave it, else its released model's (`SAMPLING`), else
    diffusers' WanPipeline defaults (flow shift 3.0, guidance 5.0)."""
    own = getattr(model, "_dit_graft_sampling", None)
    if own is not None:
        return own
    return SAMPLING.get(released_model(model) or "", Sampling())


def set_sampling(model: nn.Module, flow_shift: float | None = None, guidance_2: float | None = None) -> nn.Module:
    """Overrides `model`'s flow shift (sampler and training noise) and its low-noise expert's guidance scale; the
    settings travel with deep copies (students) and are recorded in graft.json (runtime options)."""
    if flow_shift is not None and not (isinstance(flow_shift, int | float) and flow_shift > 0):
        raise ValueError(f"flow_shift is a positive number, got {flow_shift!r}")
    if guidance_2 is not None and not (isinstance(guidance_2, int | float) and guidance_2 >= 1):
        raise ValueError(f"guidance_2 is a guidance scale ≥ 1, got {guidance_2!r}")
    current = sampling(model)
    model._dit_graft_sampling = replace(
        current,
        flow_shift=float(flow_shift) if flow_shift is not None else current.flow_shift,
        guidance_2=float(guidance_2) if guidance_2 is not None else current.guidance_2,
    )
    return model


# ---------------------------------------------------------------- geometry


class VideoGrid(TokenGrid):
    """The model's token grid, (frames, h, w) for Wan, recorded by the forward pre-hook."""

    def call_tokens(self, hidden_states, encoder_hidden_states=None, attention_mask=None) -> tuple[int, int] | None:
        """(N, 0) of a self-attention call; None for cross-attention (no formula describes it)."""
        if hidden_states.ndim != 3 or encoder_hidden_states is not None or attention_mask is not None:
            return None
        return hidden_states.shape[1], 0


def latent_frames(frames: int) -> int:
    """Latent frames of a video of `frames` pixel frames: 1 + (frames − 1) / 4 (the VAE's causal 4× in time)."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"Wan videos have 4k + 1 frames (the VAE compresses time 4×, keeping the first), got {frames}")
    return 1 + (frames - 1) // 4


def vae_scale(model: nn.Module) -> int:
    """Pixels per latent pixel: 16 for Wan2.2-TI2V-5B's 48-channel VAE, else 8 (the Wan2.1 VAE)."""
    return 16 if model.config.in_channels == 48 else 8


def video_latent(model: nn.Module, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(F, H, W) latent size of a video of `frames` × `height` × `width` pixels."""
    s = vae_scale(model)
    _, ph, pw = model.config.patch_size
    if height % (s * ph) or width % (s * pw):
        raise ValueError(f"{height}×{width} px: Wan takes multiples of {s * ph}×{s * pw} px")
    return latent_frames(frames), height // s, width // s


def video_sizes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """The model's 480p and 720p sizes at 81 frames, (frames, height, width) in pixels."""
    return VIDEO_SIZES_16X if vae_scale(model) == 16 else VIDEO_SIZES


def cost_sizes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Label → (F, H, W) latents a cost report covers by default: 480p and 720p at 81 frames."""
    return {label: video_latent(model, *size) for label, size in video_sizes(model).items()}


def latent_size(model: nn.Module, resolution: Any = None) -> tuple[int, int, int]:
    """(F, H, W) latents: None → 480p × 81 frames (TINY_LATENT for a test model whose RoPE table is shorter
    than 480p's token grid); an int (a latent side) → 81 frames of resolution²; a (F, H, W) tuple → itself."""
    if resolution is None:
        f, h, w = video_latent(model, *VIDEO_SIZES[DEFAULT_SIZE])
        if max(token_grid(model, (f, h, w))) > model.config.rope_max_seq_len:
            return TINY_LATENT  # a test model whose RoPE table cannot hold 480p's token grid
        return f, h, w
    if isinstance(resolution, int):
        return latent_frames(DEFAULT_FRAMES), resolution, resolution
    f, h, w = resolution
    return int(f), int(h), int(w)


def token_grid(model: nn.Module, shape) -> tuple[int, int, int]:
    """The (frames, h, w) token grid of latents of shape (..., F, H, W)."""
    pt, ph, pw = model.config.patch_size
    f, h, w = shape[-3:]
    return f // pt, h // ph, w // pw


# ---------------------------------------------------------------- attention adapters


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs of x (B, N, H, d) with diffusers' (1, N, 1, d) cos/sin tables."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, H, d/2) each
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


_ARGS = ("hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb")


def _projections(attn: nn.Module, x: torch.Tensor, context: torch.Tensor):
    """q from x, k and v from context, through WanAttention's (possibly fused) projections."""
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(x).chunk(3, dim=-1)
        return (attn.to_q(x), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_q(x), attn.to_k(context), attn.to_v(context)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))  # (B, N, C) → (B, N, H, d)


def _write_back(attn: nn.Module, o: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """o (B, H, N, d) → (B, N, C) in the query dtype, plus the I2V image branch, through to_out."""
    o = o.transpose(1, 2).flatten(2, 3).to(ctx.dtype)
    if ctx.extra.get("image") is not None:
        o = o + ctx.extra["image"]
    return attn.to_out[1](attn.to_out[0](o))


class WanSelfAttentionAdapter(AttentionAdapter):
    """Wan's self-attention convention (`attn1`).

    WanAttention calls its processor positionally as (attn, hidden_states, None, None, rotary_emb): q and k go
    through RMSNorm over the full width (qk_norm "rms_norm_across_heads") BEFORE the head split, then the 3-D
    RoPE; v is split only. The layout is the (frames, h, w) grid the model's forward recorded; no text.
    """

    caps = AttentionCaps(keys=False, grid_dims=3, text="none")

    def check(self, attn: nn.Module, op: str) -> None:
        if getattr(attn, "is_cross_attention", False):
            raise ValueError(f"the {op} operator's self-attention adapter got a cross-attention module")

    def qkv(self, attn, args: tuple, kwargs: dict):
        call = bind(args, kwargs, _ARGS)
        x, rotary = call["hidden_states"], call.get("rotary_emb")
        if call.get("encoder_hidden_states") is not None or call.get("attention_mask") is not None:
            raise ValueError("Wan self-attention takes no context and no mask")
        q, k, v = _projections(attn, x, x)
        q, k = attn.norm_q(q), attn.norm_k(k)  # over the full width, before the head split
        q, k, v = (_heads(t, attn.heads) for t in (q, k, v))  # (B, N, H, d)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        return q, k, v, self.layout(x.shape[1]), AttnContext(dtype=q.dtype)

    def output(self, attn, o: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return _write_back(attn, o, ctx)

    def call_tokens(self, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        return bind(args, kwargs, _ARGS)["hidden_states"].shape[1], 0


class WanCrossAttentionAdapter(AttentionAdapter):
    """Wan's cross-attention convention (`attn2`): video queries over the 512 caption tokens.

    Called as (attn, hidden_states, encoder_hidden_states, None, None). In the I2V models the context is
    [image tokens; 512 caption tokens]: the image part is attended with exact softmax here in the adapter
    (257 CLIP tokens, not the core's to replace) and added to the core's caption output before the out
    projection, as WanAttnProcessor does. The core sees the caption keys only (layout `context` = 512).
    """

    caps = AttentionCaps(keys=True, grid_dims=3, text="cross")

    def check(self, attn: nn.Module, op: str) -> None:
        if not getattr(attn, "is_cross_attention", False):
            raise ValueError(f"the {op} operator's cross-attention adapter got a self-attention module")

    def qkv(self, attn, args: tuple, kwargs: dict):
        call = bind(args, kwargs, _ARGS)
        x, context = call["hidden_states"], call.get("encoder_hidden_states")
        if context is None or call.get("attention_mask") is not None or call.get("rotary_emb") is not None:
            raise ValueError("Wan cross-attention takes a context, no mask and no rotary embedding")
        image_context = None
        if attn.add_k_proj is not None:
            split = context.shape[1] - TEXT_TOKENS
            image_context, context = context[:, :split], context[:, split:]
        q, k, v = _projections(attn, x, context)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (_heads(t, attn.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, N | T, d)
        image = None
        if image_context is not None:
            if getattr(attn, "fused_projections", False):
                k_img, v_img = attn.to_added_kv(image_context).chunk(2, dim=-1)
            else:
                k_img, v_img = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
            k_img = _heads(attn.norm_added_k(k_img), attn.heads).transpose(1, 2)
            v_img = _heads(v_img, attn.heads).transpose(1, 2)
            image = F.scaled_dot_product_attention(q, k_img, v_img).transpose(1, 2).flatten(2, 3).type_as(q)
        layout = TokenLayout(grid=self.grid.find(x.shape[1]), context=k.shape[2], tokens=x.shape[1])
        return q, k, v, layout, AttnContext(dtype=q.dtype, extra={"image": image})

    def output(self, attn, o: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return _write_back(attn, o, ctx)


# ---------------------------------------------------------------- the family


CROSS_OPERATORS = ("softmax", "linear")


def scheduler(shift: float = FLOW_SHIFT):
    """diffusers' UniPCMultistepScheduler configured as the Wan-AI Diffusers repositories ship it."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**{**SCHEDULER_CONFIG, "flow_shift": shift})


def shifted_sigma(u: torch.Tensor, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """σ' = sσ / (1 + (s − 1)σ): the shift UniPC's flow sigmas apply (diffusers' flow_shift)."""
    return shift * u / (1 + (shift - 1) * u)


@lru_cache(maxsize=4)
def _captions(source: str | None, dim: int) -> Conditions:
    if source is None:
        return synthetic_captions(dim, tokens=TEXT_TOKENS)
    return read_captions(source, dim, masks=False)


class WanFamily(Family):
    """diffusers WanTransformer3DModel: Wan2.1 T2V/I2V, Wan2.2 TI2V-5B and the A14B experts."""

    name = "wan"
    classes = ("WanTransformer3DModel",)
    objective = "flow_velocity"
    groups = ("self", "cross")
    # no block is pinned: the output layer reads only model-level modules (time embedding, scale_shift_table)
    depth_groups = (BlockGroup("self", "blocks", "num_layers", Streams(("hidden_states",))),)

    def sites(self, model: nn.Module) -> list[Site]:
        grid = self.grid(model)
        cfg = model.config
        dim, heads = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_attention_heads
        own, cross = WanSelfAttentionAdapter(grid), WanCrossAttentionAdapter(grid)
        sites = []
        for i, block in enumerate(model.blocks):
            for path in block_paths(block, f"blocks.{i}"):  # a parallel_blocks pair: both branches
                sites.append(Site(f"{path}.attn1", "attention", i, dim, heads, grid, "self", own))
                sites.append(Site(f"{path}.ffn", "mlp", i, dim, None, grid, "self", grid_dims=3))
                sites.append(Site(f"{path}.attn2", "attention", i, dim, heads, grid, "cross", cross))
        return sites

    def grid(self, model: nn.Module) -> TokenGrid:
        return getattr(model, "_dit_graft_grid", None) or VideoGrid()

    def install_grid(self, model: nn.Module) -> TokenGrid:
        """Records the (F, H, W) token grid of every forward call (adapters and grid operators read it)."""
        grid = getattr(model, "_dit_graft_grid", None)
        if grid is not None:
            return grid
        grid = VideoGrid()

        def hook(module, args, kwargs):
            # the module's own grid: a deep copy shares this function, not the grid
            x = args[0] if args else kwargs["hidden_states"]
            module._dit_graft_grid.shape = token_grid(module, x.shape)

        model.register_forward_pre_hook(hook, with_kwargs=True)
        object.__setattr__(model, "_dit_graft_grid", grid)
        return grid

    def stock_processor(self, site: Site) -> Any:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        return WanAttnProcessor()

    def example_inputs(self, model: nn.Module, batch: int, resolution: Any, device: Any) -> dict[str, Any]:
        """Forward kwargs for one `resolution` (default 480p × 81 frames) with 512 caption tokens."""
        return dict(
            hidden_states=torch.zeros(batch, *self.latent_shape(model, resolution), device=device),
            timestep=torch.full((batch,), 500.0, device=device),
            encoder_hidden_states=torch.zeros(batch, TEXT_TOKENS, model.config.text_dim, device=device),
        )

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """x (B, C, F, H, W) at flow time σ = t (B,) in [0, 1] → the velocity ε − x0, (B, C, F, H, W)."""
        return model(
            hidden_states=x,
            timestep=(t * NUM_TRAIN_TIMESTEPS).to(x.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(x.dtype),
            return_dict=False,
        )[0]

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        noise: torch.Tensor,
        cond: Conditions,
        steps: int = 50,
        cfg: float = 1.0,
        null: Conditions | None = None,
        cfg_2: float | None = None,
    ) -> torch.Tensor:
        """WanPipeline's denoising loop: UniPC (flow sigmas, the model's flow shift, `sampling`) on fp32 latents,
        classifier-free guidance uncond + cfg · (cond − uncond) through the negative caption (`null`; default zero
        features). An expert linked by `link_experts` samples with its pair, switching at the boundary as
        WanPipeline does, `cfg` for the high-noise expert and `cfg_2` for the low-noise one (WanPipeline's
        guidance_scale, guidance_scale_2); `cfg_2` None: the model's `guidance_2` when guided (cfg ≠ 1), else cfg."""
        settings = sampling(model)
        if cfg_2 is None:
            cfg_2 = settings.guidance_2 if cfg != 1.0 and settings.guidance_2 is not None else cfg
        sched = scheduler(settings.flow_shift)
        sched.set_timesteps(steps, device=noise.device)
        sched.set_begin_index(0)
        high, low, boundary = _EXPERTS.get(model, (model, model, 0.0))
        text = cond["prompt_embeds"].to(noise.device)
        guided = cfg != 1.0 or cfg_2 != 1.0
        if guided:
            neg = (null or self.null_conditions(model))["prompt_embeds"].to(text)
            text = torch.cat([text, neg.expand_as(text)])
        x = noise.float()
        with _like(low if model is high else high, model, noise.device):  # the partner expert, for the loop
            for t in sched.timesteps:
                first = t >= boundary * NUM_TRAIN_TIMESTEPS  # WanPipeline's switch (A14B)
                current, scale = (high, cfg) if first else (low, cfg_2)
                dtype = next(current.parameters()).dtype
                inp = x.to(dtype)
                inp = torch.cat([inp, inp]) if guided else inp
                out = current(
                    hidden_states=inp,
                    timestep=t.expand(inp.shape[0]),
                    encoder_hidden_states=text.to(dtype),
                    return_dict=False,
                )[0]
                if guided:
                    out_c, out_u = out.chunk(2)
                    out = out_u + scale * (out_c - out_u)
                x = sched.step(out, t, x, return_dict=False)[0]
        return x

    def conditions(self, model: nn.Module, n: int, source: str | None = None) -> Conditions:
        cfg = model.config
        if cfg.image_dim is not None or cfg.in_channels != cfg.out_channels:
            raise ValueError(
                "the wan family distils text-to-video models; this one is image-conditioned (I2V: CLIP image tokens, "
                "conditioning latents concatenated to the input), and dit-graft does not make those conditions"
            )
        cond = spread(_captions(source, model.config.text_dim), n)
        cond.pop("prompt_attention_mask", None)  # Wan attends to all 512 tokens; the padding is zero features
        return cond

    def null_conditions(self, model: nn.Module, source: str | None = None) -> Conditions:
        """The negative caption: a cached file's negative_prompt_embeds, else zero features (all 512 tokens)."""
        captions = _captions(source, model.config.text_dim)
        if "negative_prompt_embeds" in captions:
            return {"prompt_embeds": captions["negative_prompt_embeds"]}
        _, t, d = captions["prompt_embeds"].shape
        return {"prompt_embeds": torch.zeros(1, t, d)}

    def noise(self, model: nn.Module, x0: torch.Tensor, gen: torch.Generator):
        """x_σ = (1 − σ) x0 + σ ε at σ = shift(u), u ~ U(0, 1), with the model's flow shift (`sampling`); target
        ε − x0. An A14B expert trains on its own σ range (`expert_sigma_range`), recorded on the model as
        `_dit_graft_sigma_range`."""
        u = torch.rand(x0.shape[0], generator=gen, dtype=torch.float64)
        lo, hi = getattr(model, "_dit_graft_sigma_range", (0.0, 1.0))
        sigma = (lo + (hi - lo) * shifted_sigma(u, sampling(model).flow_shift)).to(x0.dtype)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise, sigma, noise - x0

    def latent_shape(self, model: nn.Module, resolution: Any = None) -> tuple[int, int, int, int]:
        """(C, F, H, W) of one sample (see `latent_size` for `resolution`)."""
        f, h, w = latent_size(model, resolution)
        pt, ph, pw = model.config.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(
                f"latent (F, H, W) = {(f, h, w)} is not a multiple of the patch {tuple(model.config.patch_size)}"
            )
        return (model.config.in_channels, f, h, w)

    def vae_scale(self, model: nn.Module) -> int:
        return vae_scale(model)

    def link_experts(self, experts: list[nn.Module], boundary: float) -> None:
        """Timestep experts (Wan2.2 A14B, high noise first) made one teacher; see `link_experts`."""
        if len(experts) != 2:
            raise ValueError(f"Wan2.2 A14B has two timestep experts, not {len(experts)}")
        link_experts(*experts, boundary)

    def runtime_options(self, model: nn.Module) -> dict[str, Any]:
        """The sampler settings (`sampling`): flow shift, and the low-noise expert's guidance where it has one."""
        settings = sampling(model)
        options: dict[str, Any] = {"flow_shift": settings.flow_shift}
        if settings.guidance_2 is not None:
            options["guidance_2"] = settings.guidance_2
        return options

    def apply_runtime_options(self, model: nn.Module, options: dict[str, Any]) -> nn.Module:
        unknown = sorted(set(options) - {"flow_shift", "guidance_2"})
        if unknown:
            raise ValueError(f"the wan family has no runtime option {unknown[0]!r} (known: flow_shift, guidance_2)")
        return set_sampling(model, options.get("flow_shift"), options.get("guidance_2")) if options else model

    def cost_sizes(self, model: nn.Module) -> dict[str, tuple[int, int, int]]:
        """The sizes a dry run costs when no --resolution is given: 480p × 81 and 720p × 81 (latents)."""
        return cost_sizes(model)

    def latent_multiple(self, model: nn.Module) -> int:
        return int(model.config.patch_size[1])

    def tiny_config(self) -> dict[str, Any]:
        return {"_class_name": "WanTransformer3DModel", **TINY_WAN}

    def tiny_inputs(self, model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, Any]:
        """Seeded inputs on a (3, 2, 3) token grid (distinct sizes, so a transposed grid shows)."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *self.latent_shape(model, TINY_LATENT), generator=gen)
        _, t, _ = self.noise(model, x, gen)
        return {"x": x, "t": t, "cond": self.conditions(model, batch)}


# expert → (high-noise expert, low-noise expert, boundary): weak keys, so deep copies (students) never copy the pair
_EXPERTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def link_experts(high: nn.Module, low: nn.Module, boundary: float) -> None:
    """Makes two A14B experts one teacher: each trains on its own σ range (`noise`) and samples with the pair
    (`sample`: `high` for t ≥ boundary · 1000, `low` below, WanPipeline's `transformer` / `transformer_2`)."""
    if not 0 < boundary < 1:
        raise ValueError(f"the experts' boundary is a fraction of the 1000 timesteps in (0, 1), got {boundary}")
    for index, model in enumerate((high, low)):
        model._dit_graft_sigma_range = expert_sigma_range(index, boundary)
        _EXPERTS[model] = (high, low, boundary)
    for model in (high, low):  # pinned (A14B's settings now that they are linked): students copy them
        model._dit_graft_sampling = sampling(model)


@contextlib.contextmanager
def _like(partner: nn.Module, model: nn.Module, device: torch.device):
    """`partner` with `model`'s parameter dtypes on `device` for the block, its own tensors back after.

    A linked expert samples its pool with the pair: the partner runs where the pool is sampled, in the dtypes the
    expert being converted has (its frozen dtype), without rounding the partner's own weights (kept aside on
    their device and restored).
    """
    if partner is model:
        yield
        return
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    tensors = [(name, p) for name, p in partner.named_parameters()] + list(partner.named_buffers())
    saved = [t.data for _, t in tensors]
    for name, t in tensors:
        t.data = t.data.to(device=device, dtype=dtypes.get(name, t.dtype))  # buffers keep their dtype (RoPE)
    try:
        yield
    finally:
        for (_, t), data in zip(tensors, saved, strict=True):
            t.data = data


def expert_sigma_range(index: int, boundary: float) -> tuple[float, float]:
    """The σ range an A14B expert denoises: expert 0 (`transformer`, high noise) t ≥ boundary · 1000, i.e.
    σ ∈ [boundary, 1]; expert 1 (`transformer_2`, low noise) σ ∈ [0, boundary) (WanPipeline's switch)."""
    if index not in (0, 1):
        raise ValueError(f"Wan2.2 A14B has two experts, not {index + 1}")
    return (boundary, 1.0) if index == 0 else (0.0, boundary)


# ---------------------------------------------------------------- Wan's original checkpoint layout

# Wan's WanModel → diffusers, one tensor to one; "{i}" a block index, "{p}" weight or bias. diffusers'
# block norm2 is the cross-attention norm, Wan's norm3 (Wan's norm2, before the FFN, has no weights).
ORIGINAL_TO_DIFFUSERS: dict[str, str] = {
    "patch_embedding.{p}": "patch_embedding.{p}",
    "text_embedding.0.{p}": "condition_embedder.text_embedder.linear_1.{p}",
    "text_embedding.2.{p}": "condition_embedder.text_embedder.linear_2.{p}",
    "time_embedding.0.{p}": "condition_embedder.time_embedder.linear_1.{p}",
    "time_embedding.2.{p}": "condition_embedder.time_embedder.linear_2.{p}",
    "time_projection.1.{p}": "condition_embedder.time_proj.{p}",
    "img_emb.proj.0.{p}": "condition_embedder.image_embedder.norm1.{p}",
    "img_emb.proj.1.{p}": "condition_embedder.image_embedder.ff.net.0.proj.{p}",
    "img_emb.proj.3.{p}": "condition_embedder.image_embedder.ff.net.2.{p}",
    "img_emb.proj.4.{p}": "condition_embedder.image_embedder.norm2.{p}",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head.{p}": "proj_out.{p}",
    "head.modulation": "scale_shift_table",
    "blocks.{i}.modulation": "blocks.{i}.scale_shift_table",
    "blocks.{i}.norm3.{p}": "blocks.{i}.norm2.{p}",
    "blocks.{i}.ffn.0.{p}": "blocks.{i}.ffn.net.0.proj.{p}",
    "blocks.{i}.ffn.2.{p}": "blocks.{i}.ffn.net.2.{p}",
    **{
        f"blocks.{{i}}.{wan}.{a}.{{p}}": f"blocks.{{i}}.{ours}.{b}.{{p}}"
        for wan, ours in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
    },
    **{
        f"blocks.{{i}}.{wan}.{n}.weight": f"blocks.{{i}}.{ours}.{n}.weight"
        for wan, ours in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for n in ("norm_q", "norm_k")
    },
    "blocks.{i}.cross_attn.k_img.{p}": "blocks.{i}.attn2.add_k_proj.{p}",
    "blocks.{i}.cross_attn.v_img.{p}": "blocks.{i}.attn2.add_v_proj.{p}",
    "blocks.{i}.cross_attn.norm_k_img.weight": "blocks.{i}.attn2.norm_added_k.weight",
}

ORIGINAL_PREFIX = "model.diffusion_model."  # ComfyUI's repackaged files


def is_original_wan(keys) -> bool:
    """Whether state-dict key names are Wan's original layout (read from a safetensors header)."""
    keys = {k.removeprefix(ORIGINAL_PREFIX) for k in keys}
    return "head.modulation" in keys and "patch_embedding.weight" in keys and "blocks.0.self_attn.q.weight" in keys


def _original_pairs(num_layers: int) -> dict[str, str]:
    """Every original key → diffusers key a model of `num_layers` blocks can have."""
    pairs = {}
    for source, target in ORIGINAL_TO_DIFFUSERS.items():
        for i in range(num_layers) if "{i}" in source else [None]:
            for p in ("weight", "bias") if "{p}" in source else [None]:
                pairs[source.format(i=i, p=p)] = target.format(i=i, p=p)
    return pairs


def original_wan_config(shapes: dict[str, Any], num_heads: int | None = None) -> dict[str, Any]:
    """A diffusers WanTransformer3DModel config read off an original checkpoint's key shapes.

    Widths, channels, patch, layers, FFN, text and time widths, the cross-attention norm and the I2V image
    branch are all in the shapes; the head count is not (q/k norms span the full width), so it is width /
    HEAD_DIM unless `num_heads` is given.
    """
    shapes = {k.removeprefix(ORIGINAL_PREFIX): tuple(v) for k, v in shapes.items()}

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise IntegrityError(f"the original Wan checkpoint lacks {key!r}")
        return shapes[key]

    dim, in_channels, *patch = shape("patch_embedding.weight")
    heads = num_heads or (dim // HEAD_DIM if dim % HEAD_DIM == 0 else 0)
    if not heads:
        raise IntegrityError(f"width {dim} is no multiple of Wan's head width {HEAD_DIM}: set model.num_heads")
    if dim % heads or (dim // heads) % 2:
        raise IntegrityError(f"width {dim} does not split into {heads} heads of an even width (set model.num_heads)")
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    image = "img_emb.proj.0.weight" in shapes
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(patch),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": in_channels,
        "out_channels": shape("head.head.weight")[0] // math.prod(patch),
        "text_dim": shape("text_embedding.0.weight")[1],
        "freq_dim": shape("time_embedding.0.weight")[1],
        "ffn_dim": shape("blocks.0.ffn.0.weight")[0],
        "num_layers": layers,
        "cross_attn_norm": "blocks.0.norm3.weight" in shapes,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": shape("img_emb.proj.0.weight")[0] if image else None,
        "added_kv_proj_dim": dim if image else None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": shape("img_emb.emb_pos")[1] if "img_emb.emb_pos" in shapes else None,
    }


def convert_original_wan_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """An original-layout state dict → `model`'s (a WanTransformer3DModel) state dict; every key and shape checked.

    Works on meta tensors too: a dry run checks a checkpoint's header this way.
    """
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in state.items()}
    pairs = {s: t for s, t in _original_pairs(model.config.num_layers).items() if t in shapes}
    unknown = sorted(set(state) - set(pairs))
    if unknown:
        more = f" (+{len(unknown) - 1} more)" if unknown[1:] else ""
        raise IntegrityError(f"unknown key {unknown[0]!r}{more} for this Wan config")
    missing = [k for k in pairs if k not in state]
    if missing:
        more = f" (+{len(missing) - 1} more)" if missing[1:] else ""
        raise IntegrityError(f"the original Wan checkpoint lacks {missing[0]!r}{more}")
    out = {}
    for source, target in pairs.items():
        got, expected = tuple(state[source].shape), tuple(shapes[target])
        if got != expected:
            raise IntegrityError(f"{source!r} → {target!r}: shape {got}, the model expects {expected}")
        out[target] = state[source]
    return out


def to_original_wan_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse map: `model`'s weights under Wan's original key names (tests; exporting for Wan's own code)."""
    state = model.state_dict()
    pairs = {t: s for s, t in _original_pairs(model.config.num_layers).items() if t in state}
    unmapped = [k for k in state if k not in pairs]
    if unmapped:
        raise IntegrityError(f"diffusers key {unmapped[0]!r} has no counterpart in Wan's original layout")
    return {pairs[k]: v for k, v in state.items()}


# ---------------------------------------------------------------- tiny config (tests)

TINY_LATENT = (3, 4, 6)  # (F, H, W) latents of the tiny inputs: a (3, 2, 3) token grid

TINY_WAN: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,  # RoPE splits 12 into t 4, h 4, w 4
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)


def tiny_wan(seed: int = 0, **overrides) -> nn.Module:
    """A 2-block Wan (width 24) with non-trivial weights, for tests."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_WAN, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added_k" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


WAN = register_family(WanFamily())

register_layout(
    CheckpointLayout(
        name="original-wan",
        family="wan",
        detect=is_original_wan,
        convert=convert_original_wan_state_dict,
        infer_config=lambda shapes, hints: original_wan_config(shapes, hints.get("num_heads")),
    )
)
