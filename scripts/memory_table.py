"""The memory plan of every full-size recipe on 1×80 GB, 1×141 GB and 8×80 GB (meta device, no weights).

    python scripts/memory_table.py               # writes the "memory" section of docs/memory.md
    python scripts/memory_table.py --calibrate   # also the "calibration" section: estimate vs measured on CPU

For each recipe: its shipped settings on one GPU of each size; on 8 GPUs, the shipped settings with the
global batch split over them (rounded up to a multiple of 8: FLUX's batch of 1 becomes 8, one per
GPU), the same without activation checkpointing and with `parallel: fsdp`, and what 8 GPUs make
possible — `parallel: fsdp` training the whole student (`trainable: all`). Where a setting does not
fit, the cheapest changes that make it fit are listed (`dit_graft.memory.search`).

`--calibrate` trains the small DiTs of tests/test_memory.py for two AdamW steps each, in a fresh process
per configuration, and puts the plan's estimate beside the measured peak RSS (minus the process's RSS
before any model was built).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from _docs import write_section

from dit_graft.loading import load_model, resolve_source
from dit_graft.memory import GIB, gib, plan_memory, profile, settings_from
from dit_graft.plan import plan
from dit_graft.recipe import load_recipe, recipe_dir

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["flux-lit", "flux-clear", "pixart-sigma-lit", "dit-xl-2-lit"]
GPUS = {"1×80 GB": (1, 80 * 10**9), "1×141 GB": (1, 141 * 10**9), "8×80 GB": (8, 80 * 10**9)}


def _describe(s) -> str:
    return (
        f"{s.trainable}, frozen {s.frozen_dtype}, ckpt {'on' if s.gradient_checkpointing else 'off'}, "
        f"{s.parallel}, batch {s.batch_size} ({s.per_device_batch}/GPU)"
    )


def rows_for(name: str) -> list[list[str]]:
    path = ROOT / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path)
    model = load_model(resolve_source(recipe.model.source, recipe_dir(path)), meta=True)
    prof = profile(model, plan(model, recipe), recipe)
    shipped = settings_from(recipe)
    feature_mse = recipe.distill.losses.feature_mse > 0
    out = []
    for setup, (n, size) in GPUS.items():
        batch = -(-shipped.batch_size // n) * n  # the shipped global batch, made a multiple of the GPUs
        variants = [("shipped", replace(shipped, processes=n, batch_size=batch))]
        if n > 1:
            if shipped.gradient_checkpointing:
                variants.append(("no checkpointing", replace(variants[0][1], gradient_checkpointing=False)))
            if shipped.trainable != "all":
                variants.append(("fsdp", replace(variants[0][1], parallel="fsdp")))
            variants.append(("fsdp, whole student", replace(variants[0][1], parallel="fsdp", trainable="all")))
        for label, s in variants:
            result = plan_memory(prof, s, size, setup, recipe.distill.pool_size, feature_mse=feature_mse)
            fit = "fits" if result.fits else "does not fit"
            if not result.fits and result.suggestions:
                alt, total = result.suggestions[0]
                fit += f"; fits with {', '.join(alt.overrides(s))} ({gib(total)})"
            parts = result.rows
            out.append(
                [
                    name,
                    setup,
                    f"{label}: {_describe(s)}",
                    gib(parts["teacher weights"]),
                    gib(parts["student weights (own)"] + parts["gradients"] + parts["optimizer state (AdamW)"]),
                    gib(parts["activations"]),
                    f"**{gib(result.total)}**",
                    fit,
                ]
            )
    return out


def calibration() -> str:
    """The plan's estimate against the measured peak RSS of each probe of tests/test_memory.py."""
    spec = importlib.util.spec_from_file_location("test_memory", ROOT / "tests" / "test_memory.py")
    probes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probes)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    lines = ["| configuration | settings | estimate | measured | estimate / measured |", "|---|---|---|---|---|"]
    for name, probe in probes.PROBES.items():
        run = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "test_memory.py"), name],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        measured = json.loads(run.stdout.strip().splitlines()[-1])["measured"]
        est = probes._estimate(name)["estimate"]
        cfg = probe["config"]
        tokens = (cfg["sample_size"] // 2) ** 2
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        settings = (
            f"DiT C={width}, {cfg['num_layers']} blocks, {tokens} tokens, batch {probe['distill']['batch_size']}; "
            f"trainable {probe['distill']['trainable']}, checkpointing "
            f"{'on' if probe['distill']['gradient_checkpointing'] else 'off'}, "
            f"attention {probe.get('attention', 'flash')}"
        )
        lines.append(
            f"| {name} | {settings} | {est / 2**20:.0f} MiB | {measured / 2**20:.0f} MiB | {est / measured:.2f} |"
        )
    return "\n".join(
        [
            "## Calibration on the CPU",
            "",
            f"`python scripts/memory_table.py --calibrate` ({platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, fp32, no GPU reserve): each configuration trains two AdamW steps in a "
            "fresh process (teacher forward under no_grad, student forward and backward, frozen unedited "
            "weights shared with the teacher, per-block checkpointing where set); measured = peak RSS minus "
            "the RSS before any model was built. `tests/test_memory.py` asserts the ratio is within 1.5× "
            "either way.",
            "",
            *lines,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true", help="also measure the CPU calibration table")
    args = parser.parse_args()
    t0 = time.perf_counter()
    header = ["recipe", "GPUs", "settings", "teacher", "student + grads + AdamW", "activations", "total/GPU", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in RECIPES:
        for row in rows_for(name):
            lines.append("| " + " | ".join(row) + " |")
    body = "\n".join(
        [
            "## Full-size recipes per GPU",
            "",
            f"`python scripts/memory_table.py` (dit-graft's memory plan, on the meta device: no weights; "
            f"{platform.machine()}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s). "
            "Sizes are GiB (2³⁰ bytes); a GPU sold as 80 GB is taken as 80×10⁹ bytes = 74.5 GiB, 141 GB as "
            f"{141 * 10**9 / GIB:.1f} GiB. Totals include the CUDA-context and allocator reserve "
            "(1 GiB + 5 %) and the working memory of the backward pass; activations are for the batch per "
            "GPU at the recipe's resolution, with fused attention (flash / the operators' kernels). On 8 GPUs "
            "the shipped global batch is split over them (FLUX's batch of 1 becomes 8: one per GPU).",
            "",
            *lines,
        ]
    )
    write_section(ROOT / "docs" / "memory.md", "memory", body, title="# Memory")
    print(body)
    if args.calibrate:
        body = calibration()
        write_section(ROOT / "docs" / "memory.md", "calibration", body, title="# Memory")
        print(body)


if __name__ == "__main__":
    sys.exit(main())
