"""TinyFusion's learnable depth search (Fang et al. 2024), behind `prune_depth`'s `method: learnable`.

The blocks of one block group (DiT `blocks`, PixArt `self`, FLUX `double` or `single`) fall into
consecutive groups of M; each group keeps N of its M blocks. Every group has a
categorical distribution (learnable logits, zero at the start) over its C(M, N) N:M masks — only those
that keep the family's pinned blocks. Each search step draws one mask per group with a straight-through
Gumbel-softmax (hard one-hot forward, soft gradient; temperature annealed exponentially from `tau` to
`tau_end`), runs a copy of the teacher in which every masked-out block is skipped (out = x; the kept
ones pass their residual update through the mask weight, out = x + m·(block(x) − x), so that the
logits get gradients; for blocks with several residual streams (FLUX: text, image) on each stream, in
the block's own output format), and lowers the MSE of its output to the full teacher's output on seeded
random calibration inputs. LoRA adapters (peft) on the block group's attention and FFN linear layers train
jointly with the logits: they simulate the recovery that fine-tuning brings, so that the search
prefers masks that are recoverable rather than masks that are merely good right after pruning.

After `search_steps` steps each group keeps the blocks of its most likely mask. The copy and its LoRA
weights are then discarded: the student inherits the teacher's own blocks and recovers through the
recipe's normal distillation. The global RNG is untouched (calibration inputs and Gumbel noise come
from a generator seeded by `seed`; the LoRA initialisation runs under a forked RNG seeded by it too).
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dit_graft.model.calibration import calibration_inputs, calibration_latent
from dit_graft.model.site import BlockGroup, Streams


def candidate_masks(num_blocks: int, group_size: int, keep_per_group: int, pinned: tuple[int, ...]):
    """Per group of `group_size` consecutive blocks, the kept-block tuples of its N:M masks that keep its pinned blocks.

    In lexicographic order, so the first one keeps the pinned and then the earliest blocks.
    """
    groups = []
    for start in range(0, num_blocks, group_size):
        members = range(start, start + group_size)
        need = {p for p in pinned if p in members}
        groups.append([c for c in itertools.combinations(members, keep_per_group) if need <= set(c)])
    return groups


def lora_targets(model: nn.Module, family: Any, block_group: BlockGroup) -> list[str]:
    """Names of the linear layers inside the attention and MLP sites of `block_group`'s blocks."""
    names = []
    for site in family.sites(model):
        if not block_group.owns(site.path):
            continue
        for name, module in model.get_submodule(site.path).named_modules():
            if isinstance(module, nn.Linear):
                names.append(f"{site.path}.{name}")
    return names


def gated_block_output(streams: Streams, block: nn.Module, args: tuple, kwargs: dict, out: Any, weight: torch.Tensor):
    """`block`'s output with each residual update scaled by `weight`: x + w·(out − x) per stream, in its own format.

    Where `weight` is 0 the block returns its inputs unchanged (exactly: x + 0)."""
    ins, outs = streams.inputs(block, args, kwargs), streams.outputs(out)
    return streams.pack(tuple(x + weight.to(y.dtype) * (y - x) for x, y in zip(ins, outs, strict=True)))


def learnable_search(
    model: nn.Module, family: Any, block_group: BlockGroup, options: Any, candidates: list[list[tuple[int, ...]]]
):
    """Runs the search on `block_group`'s blocks; returns the kept blocks (ascending) and each block's keep probability
    under the final logits."""
    blocks = block_group.blocks(model)
    device = next(model.parameters()).device
    resolution = calibration_latent(model, family, options.calibration_resolution)
    x, t, cond = calibration_inputs(model, family, options.calibration_samples, options.seed, resolution)
    gen = torch.Generator().manual_seed(options.seed + 1)  # Gumbel noise, apart from the calibration draws
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            target = family.forward(model, x, t, cond)
        student = copy.deepcopy(model)
    finally:
        model.train(was_training)
    student.requires_grad_(False)
    lora = _add_lora(student, family, block_group, options, device)

    # masks[g]: (candidates of group g, blocks of the model), 1 where that candidate keeps the block
    masks = [torch.zeros(len(c), len(blocks), device=device) for c in candidates]
    for m, group in zip(masks, candidates, strict=True):
        for j, kept in enumerate(group):
            m[j, list(kept)] = 1.0
    logits = [torch.zeros(len(c), device=device, requires_grad=True) for c in candidates]
    weight: list[torch.Tensor | None] = [None] * len(blocks)

    def gate(i):
        def hook(module, args, kwargs, out):
            return gated_block_output(block_group.streams, module, args, kwargs, out, weight[i])

        return hook

    param_groups = [{"params": logits, "lr": options.mask_lr}]
    if lora:
        param_groups.append({"params": lora, "lr": options.lr})
    optimizer = torch.optim.Adam(param_groups)
    handles = [b.register_forward_hook(gate(i), with_kwargs=True) for i, b in enumerate(block_group.blocks(student))]
    try:
        for step in range(options.search_steps):
            tau = options.tau * (options.tau_end / options.tau) ** (step / max(options.search_steps - 1, 1))
            per_block = sum(_straight_through(lg, tau, gen) @ m for lg, m in zip(logits, masks, strict=True))
            for i in range(len(blocks)):
                weight[i] = per_block[i]
            loss = F.mse_loss(family.forward(student, x, t, cond).float(), target.float())
            if not math.isfinite(loss.item()):
                raise ValueError(f"the learnable depth search diverged at step {step} (loss {loss.item()}); lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        kept = sorted(i for lg, group in zip(logits, candidates, strict=True) for i in group[int(lg.argmax())])
        probs = sum(torch.softmax(lg, 0) @ m for lg, m in zip(logits, masks, strict=True))
    return kept, [float(p) for p in probs.cpu()]


def _straight_through(logits: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    """A hard one-hot Gumbel-softmax sample whose gradient is the soft sample's."""
    u = torch.rand(logits.shape, generator=gen).clamp_(1e-10, 1.0 - 1e-7).to(logits.device)
    soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=0)
    hard = F.one_hot(soft.argmax(), soft.numel()).to(soft.dtype)
    return hard - soft.detach() + soft


def _add_lora(student: nn.Module, family: Any, block_group: BlockGroup, options: Any, device: torch.device):
    """Adds LoRA (rank `lora_rank`, scale 1) to the block group's attention/FFN linears; returns the LoRA weights."""
    if options.lora_rank == 0:
        return []
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(student, family, block_group)
    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_rank, lora_dropout=0.0, target_modules=targets)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(options.seed)
        inject_adapter_in_model(config, student)
    student.to(device)
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            params.append(p)
    return params
