"""`Family`: what dit-graft needs to know about one diffusers transformer architecture.

A family is a subclass of `Family` in one file under `dit_graft/families/`, registered with `register_family`.
It fills in the abstract hooks (sites, inputs, forward, sampler, conditions, objective) and may override the
defaults (token grid, VAE factor, depth groups, attention adapters, training preparation, tiny test config,
runtime options). Nothing outside `dit_graft/families/` asks which family a model belongs to: generic code
calls these hooks.

Conditions are opaque to everything but the family: a batch of them is a dict of tensors whose first dimension
is the sample (see `dit_graft.model.conditions`).
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from dit_graft.model.conditions import Conditions
from dit_graft.model.site import BlockGroup, Site, TokenGrid
from dit_graft.registry import Registry


class Family(abc.ABC):
    """One architecture family. Hooks take the model first.

    Class attributes: `name` (recipes and graft.json name it), `classes` (the diffusers class names it adapts),
    `objective` ("eps_sigma": eps and learned-variance channels; "flow_velocity": the flow-matching velocity
    noise − x0), `groups` (block groups of its sites; the first is what an edit without `group:` addresses),
    `depth_groups` (the block lists depth edits rewrite, the first one the default; empty: no depth edits).
    """

    name: ClassVar[str]
    classes: ClassVar[tuple[str, ...]]
    objective: ClassVar[Literal["eps_sigma", "flow_velocity"]]
    groups: ClassVar[tuple[str, ...]] = ("blocks",)
    depth_groups: ClassVar[tuple[BlockGroup, ...]] = ()

    # ---- what every family says

    @abc.abstractmethod
    def sites(self, model: nn.Module) -> list[Site]:
        """Every graftable Site, in layer order; attention sites carry the family's adapter."""

    @abc.abstractmethod
    def example_inputs(self, model: nn.Module, batch: int, resolution: int | None, device: Any) -> dict[str, Any]:
        """Forward kwargs (FLOP counts, tests); `resolution` is the latent size, default the model's own."""

    @abc.abstractmethod
    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """Raw model output, laid out like x (plus learned-σ channels for eps_sigma)."""

    @abc.abstractmethod
    def sample(
        self, model: nn.Module, noise: torch.Tensor, cond: Conditions, steps: int = 50, cfg: float = 1.0, null=None
    ) -> torch.Tensor:
        """Samples, with the family's sampler."""

    @abc.abstractmethod
    def conditions(self, model: nn.Module, n: int, source: str | None = None) -> Conditions:
        """n evenly spread conditions (`source`: a cached-embeddings file or None)."""

    @abc.abstractmethod
    def noise(self, model: nn.Module, x0: torch.Tensor, gen: torch.Generator):
        """(x_t, t, target): a training input, its timestep and the target the output's first channels regress."""

    @abc.abstractmethod
    def latent_shape(self, model: nn.Module, resolution: int | None = None) -> tuple[int, ...]:
        """The shape of one sample that `forward`/`sample` take."""

    # ---- defaults

    def null_conditions(self, model: nn.Module, source: str | None = None) -> Conditions | None:
        """The one-row null condition, or None for a family trained without one (no classifier-free guidance)."""
        return None

    def vae_scale(self, model: nn.Module) -> int:
        """Image pixels per latent pixel (1 for a pixel-space model)."""
        return 8

    def latent_multiple(self, model: nn.Module) -> int:
        """What a latent side must be a multiple of (the patch size)."""
        return int(model.config.patch_size)

    def num_classes(self, model: nn.Module) -> int | None:
        """Classes of a class-conditional model; None for a text-conditioned one."""
        return None

    def install_grid(self, model: nn.Module) -> TokenGrid:
        """A TokenGrid kept up to date by a forward pre-hook: (H/p, W/p) of a (B, C, H, W) input by default."""
        grid = getattr(model, "_dit_graft_grid", None)
        if grid is not None:
            return grid
        grid = TokenGrid()
        p = model.config.patch_size

        def hook(module, args, kwargs):
            # read the grid from the module, not the closure: a deep copy shares this function but not the grid
            x = args[0] if args else kwargs["hidden_states"]
            module._dit_graft_grid.shape = (x.shape[-2] // p, x.shape[-1] // p)

        model.register_forward_pre_hook(hook, with_kwargs=True)
        object.__setattr__(model, "_dit_graft_grid", grid)
        return grid

    def grid(self, model: nn.Module) -> TokenGrid:
        """The model's TokenGrid: the installed one, else a fresh one (sites of a model without the hook)."""
        return getattr(model, "_dit_graft_grid", None) or TokenGrid()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks, in order (the depth groups', one after the other)."""
        return [b for g in self.depth_groups for b in g.blocks(model)]

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def stock_processor(self, site: Site) -> Any:
        """The processor that computes the teacher's attention at `site` (the `softmax` operator installs it)."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()

    def prepare_for_training(self, model: nn.Module) -> nn.Module:
        """Puts `model` in the state distillation trains it in (e.g. label dropout off); default: unchanged."""
        return model

    def runtime_options(self, model: nn.Module) -> dict[str, Any]:
        """Computation choices the diffusers config cannot hold (recorded in graft.json, re-applied on load)."""
        return {}

    def apply_runtime_options(self, model: nn.Module, options: dict[str, Any]) -> nn.Module:
        """Re-applies `runtime_options` to a model built from its config."""
        if options:
            raise ValueError(f"the {self.name} family has no runtime options (got {sorted(options)})")
        return model

    def cost_sizes(self, model: nn.Module) -> dict[str, Any]:
        """Label → latent size a dry run costs when no --resolution is given (Wan: 480p and 720p × 81 frames);
        empty: the model's own size."""
        return {}

    def link_experts(self, experts: list[nn.Module], boundary: float) -> None:
        """Makes timestep experts (high noise first) one teacher, split at `boundary` (`model.experts`); a family
        without timestep experts refuses with ValueError."""
        raise ValueError(f"the {self.name} family has no timestep experts")

    def runtime_note(self, options: dict[str, Any]) -> str | None:
        """A model-card line on what the stock diffusers class cannot express; None: nothing to say."""
        return None

    @abc.abstractmethod
    def tiny_config(self) -> dict[str, Any]:
        """The config of a tiny model of this family (contract tests; runs on a CPU in milliseconds)."""

    def tiny_inputs(self, model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, Any]:
        """Seeded random forward kwargs for a tiny model (contract tests): noise, timesteps and conditions."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *self.latent_shape(model), generator=gen)
        _, t, _ = self.noise(model, x, gen)
        return {"x": x, "t": t, "cond": self.conditions(model, batch)}

    # ---- helpers

    def depth_group(self, name: str | None) -> BlockGroup:
        """The block group a depth edit with `group: name` rewrites (None: the first); ValueError names the others."""
        if not self.depth_groups:
            raise ValueError(f"the {self.name} family does not support depth edits")
        if name is None:
            return self.depth_groups[0]
        for group in self.depth_groups:
            if group.name == name:
                return group
        valid = ", ".join(g.name for g in self.depth_groups)
        raise ValueError(f"depth edits on the {self.name} family act on block group(s) {valid}, not {name!r}")

    def site_map(self, model: nn.Module) -> dict[str, Site]:
        return {s.path: s for s in self.sites(model)}

    def __repr__(self) -> str:
        return f"<family {self.name}>"


FAMILIES: Registry[Family] = Registry("family")


def register_family(family: Family) -> Family:
    """Registers a family instance under its name."""
    return FAMILIES.register(family.name)(family)


def family_for(model: nn.Module) -> Family:
    """The family adapter for a model instance, by its class name."""
    cls = type(model).__name__
    for _, fam in FAMILIES.items():
        if cls in fam.classes:
            return fam
    supported = sorted(c for _, f in FAMILIES.items() for c in f.classes)
    raise KeyError(f"unsupported model class {cls} (supported: {', '.join(supported)})")


def family_for_class(class_name: str) -> Family | None:
    for _, fam in FAMILIES.items():
        if class_name in fam.classes:
            return fam
    return None


def all_groups() -> list[str]:
    """Every block-group name some registered family has."""
    return sorted({g for _, fam in FAMILIES.items() for g in fam.groups})


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """Total forward FLOPs and FLOPs per module path, measured by torch's FlopCounterMode.

    Counts matmuls, convolutions and attention kernels (2 FLOPs per multiply-add); works on the meta
    device, so full-size models are counted without weights. On the CPU, SDPA runs its math backend while
    counting (its fused CPU kernel is invisible to FlopCounterMode), so attention is counted there too.

    This is a pure measurement of what the PyTorch paths compute. Where an attention kernel skips work
    that its PyTorch path does densely (masked, sparse attention), cost reports replace the attention core
    by the operator's formula (`dit_graft.operators.base.attention_core_flops`): that is the one correction
    mechanism, kept because formulas need no forward pass and are tested against this measurement on the
    dense paths.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cpu = any(p.device.type == "cpu" for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH) if cpu else contextlib.nullcontext():
        model(**inputs)
    root_name = type(model).__name__
    per_module = {k.removeprefix(root_name + "."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module
