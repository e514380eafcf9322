"""How much of a teacher LoRA `dit-graft lora` carries onto students of the digits teacher, per kind of edit.

    python scripts/lora_carryover.py        # writes the "lora-carryover" section of docs/quality.md

A seeded rank-4 LoRA on every attention and MLP linear of `bundled:digits-dit` (the README's example LoRA) is
remapped onto one export per plan (no distillation: carry-over depends on the plan, not on training). Columns are
`lora_report.json`'s: LoRA modules carried, the share of the LoRA's parameters carried exactly, and the share of
the norm of its weight update ‖B·A‖ carried.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from _docs import write_section
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

import dit_graft
from dit_graft.export import export
from dit_graft.loading import resolve_source
from dit_graft.lora import remap_export
from dit_graft.plan import apply, plan
from dit_graft.recipe import load_recipe, validate

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
CASES = {
    "digits-lit (all attention → linear)": None,  # the recipe's own graft
    "prune_depth, keep 4 of 6 (importance)": [{"site": "depth", "op": "prune_depth", "options": {"keep": 4}}],
    "parallel_blocks, all pairs": [{"site": "depth", "op": "parallel_blocks"}],
    "prune_width, keep 0.5 (magnitude)": [{"site": "mlp", "op": "prune_width", "options": {"keep": 0.5}}],
    "moe, 4 experts top-2 + shared": [{"site": "mlp", "op": "moe", "options": {"experts": 4, "top_k": 2, "shared": 1}}],
    "gated_conv attention + conv_mlp": [{"site": "attention", "op": "gated_conv"}, {"site": "mlp", "op": "conv_mlp"}],
}


def teacher_lora(path: Path, rank: int, seed: int) -> None:
    """A random (non-zero) LoRA for the bundled teacher, in diffusers' `transformer.<module>.lora_A/B` layout."""
    torch.manual_seed(seed)
    model = dit_graft.from_pretrained(resolve_source("bundled:digits-dit"))
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=TARGETS, init_lora_weights=False), model)
    save_file({f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    teacher = dit_graft.from_pretrained(resolve_source("bundled:digits-dit"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / "teacher-lora.safetensors"
        teacher_lora(lora, args.rank, args.seed)
        for i, (name, graft) in enumerate(CASES.items()):
            if graft is None:
                graft = load_recipe(ROOT / "recipes" / "digits-lit.yaml").model_dump()["graft"]
            recipe = validate({"model": {"source": "bundled:digits-dit"}, "graft": graft})
            graft_plan = plan(teacher, recipe)
            out = Path(tmp) / f"student-{i}"
            export(apply(teacher, graft_plan), graft_plan, recipe.model_dump(), out)
            _, report = remap_export(lora, out)
            share = report["params_carried_exactly"] / report["params_teacher_lora"]
            rows.append(
                f"| {name} | {report['modules_carried']} of {report['lora_modules']} | {share:.1%} | "
                f"{report['update_norm_share']:.1%} |"
            )
            print(rows[-1], flush=True)
    body = "\n".join(
        [
            "## Teacher LoRA carried onto students (dit-graft lora)",
            "",
            f"Machine: {platform.machine()} CPU, torch {torch.__version__}. Command: "
            f"`python scripts/lora_carryover.py --rank {args.rank} --seed {args.seed}`: a seeded rank-{args.rank} "
            "LoRA on every attention and MLP linear of bundled:digits-dit, remapped onto each student's export.",
            "",
            "| student plan | LoRA modules carried | parameters carried exactly | update norm carried |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    write_section(ROOT / "docs" / "quality.md", "lora-carryover", body, title="# Quality")


if __name__ == "__main__":
    main()
