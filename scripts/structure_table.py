"""Structural conversions on the digits teacher: depth, parallel blocks, MoE and layer selection.

    OMP_NUM_THREADS=2 python scripts/structure_table.py       # writes the "structure" section of docs/quality.md

Rows: each depth method at 50% depth (ShortGPT importance, TinyFusion learnable 1:2, PPCL contiguous),
parallel blocks (depth halved), MoE at 40% activated FFN parameters (5 experts, top-2), and linear
attention on 50% of the layers chosen by sensitivity (`layers: {auto: ...}`), interleaved (every
other layer) or as the first half. Every student runs the same pipeline: stage 1 (activation
distillation of each new module or merged block) then end-to-end distillation, from the same
teacher-sample pool and seed; it is sampled from the teacher's noise (DDIM, cfg) and timed against
the teacher in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from _docs import write_section

from dit_graft.evaluate import quality, sample
from dit_graft.families import family_for
from dit_graft.loading import load_model, resolve_source
from dit_graft.metrics import psnr
from dit_graft.pipeline import convert
from dit_graft.recipe import validate
from dit_graft.training.data import training_pool

ROOT = Path(__file__).resolve().parent.parent

ROWS: dict[str, list[dict]] = {
    "depth 6→3, importance (ShortGPT)": [{"site": "depth", "op": "prune_depth", "options": {"keep": 3}}],
    "depth 6→3, learnable 1:2 (TinyFusion)": [
        {"site": "depth", "op": "prune_depth", "options": {"method": "learnable", "group_size": 2}}
    ],
    "depth 6→3, contiguous (PPCL)": [
        {"site": "depth", "op": "prune_depth", "options": {"method": "contiguous", "keep": 3}}
    ],
    "parallel blocks (6→3)": [{"site": "depth", "op": "parallel_blocks", "options": {"pairs": "all"}}],
    "MoE 5 experts top-2 (40% FFN active)": [
        {"site": "mlp", "op": "moe", "layers": "all", "options": {"experts": 5, "top_k": 2}}
    ],
    "linear attn, 50% auto (sensitivity)": [
        {"site": "attention", "op": "linear", "options": {"dwconv": 3}, "layers": {"auto": {"fraction": 0.5}}}
    ],
    "linear attn, 50% interleaved (0,2,4)": [
        {"site": "attention", "op": "linear", "options": {"dwconv": 3}, "layers": "every:2"}
    ],
    "linear attn, first half (0-2)": [{"site": "attention", "op": "linear", "options": {"dwconv": 3}, "layers": "0-2"}],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="end-to-end distillation steps per student")
    p.add_argument("--stage1-steps", type=int, default=100)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--rows", nargs="+", default=None, help="substrings of the row names to run (default: all)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "structure-table")
    args = p.parse_args()

    teacher = load_model(resolve_source("bundled:digits-dit"))
    family = family_for(teacher)
    t_samples = sample(teacher, args.samples, args.sample_steps, args.cfg)
    t_q = quality(t_samples.images, t_samples.labels)
    n_params = sum(p.numel() for p in teacher.parameters())
    header = ("teacher (6 blocks)", 6, n_params, t_q["fd"], t_q["fd_floor"], t_q["accuracy"], float("inf"), 1.0, 0.0)
    rows = [header]
    chosen_note = ""
    base = validate({"model": {"source": "bundled:digits-dit"}, "graft": [{"site": "attention", "op": "linear"}]})
    pool = training_pool(teacher, base.distill, args.work)  # every row draws from this one teacher-sample pool
    for name, graft in ROWS.items():
        if args.rows and not any(r in name for r in args.rows):
            continue
        recipe = validate(
            {
                "model": {"source": "bundled:digits-dit"},
                "graft": graft,
                "distill": {
                    "stages": ["activation", "end_to_end"],
                    "activation": {"steps": args.stage1_steps},
                    "steps": args.steps,
                    "batch_size": 32,
                    "checkpoint_every": 10**9,
                    "log_every": 10,
                    **({"losses": {"load_balance": 0.01}} if graft[0]["op"] == "moe" else {}),
                },
            }
        )
        t0 = time.perf_counter()
        done = convert(recipe, None, teacher=teacher, work_dir=args.work / "run", pool=pool)
        student = done.student
        if done.selections:
            chosen_note = f"The sensitivity ranking chose attention layers {done.selections[0].chosen}."
        convert_s = time.perf_counter() - t0
        s = sample(student, args.samples, args.sample_steps, args.cfg)
        q = quality(s.images, s.labels)
        row = (
            name,
            family.num_layers(student),
            sum(p.numel() for p in student.parameters()),
            q["fd"],
            q["fd_floor"],
            q["accuracy"],
            psnr(s.images, t_samples.images),
            s.seconds / t_samples.seconds,
            convert_s,
        )
        rows.append(row)
        print(f"{name}: fd {q['fd']:.2f} acc {q['accuracy']:.3f} psnr {row[6]:.2f} latency {row[7]:.2f}", flush=True)

    cmd = (
        f"python scripts/structure_table.py --steps {args.steps} --stage1-steps {args.stage1_steps} "
        f"--samples {args.samples} --sample-steps {args.sample_steps} --cfg {args.cfg}"
    )
    lines = [
        "## Structural conversions on the digits teacher (scripts/structure_table.py)\n",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Command: `{cmd}`.",
        f"Each student: stage 1 ({args.stage1_steps} steps, L2, every new module or merged block alone), then "
        f"{args.steps} end-to-end steps (batch 32, eps + σ MSE; MoE adds load balancing 0.01), then "
        f"{args.samples} class-balanced samples, DDIM {args.sample_steps} steps, cfg {args.cfg}, the teacher's noise. "
        f"FD floor ({min(args.samples, 359)} images): {t_q['fd_floor']:.2f}. Latency: the student's sampling time "
        f"over the teacher's, same run, same batch. {chosen_note}\n",
        "| student | blocks | params | FD ↓ | FD / floor | accuracy ↑ | PSNR to teacher (dB) ↑ | latency / teacher "
        "| graft + distil s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, blocks, params, fd, floor, acc, ps, lat, secs in rows:
        lines.append(
            f"| {name} | {blocks} | {params / 1e6:.2f}M | {fd:.2f} | {fd / floor:.2f} | {acc:.3f} | {ps:.2f} "
            f"| {lat:.2f} | {secs:.0f} |"
        )
    body = "\n".join(lines)
    print(body)
    write_section(ROOT / "docs" / "quality.md", "structure", body, title="# Quality")


if __name__ == "__main__":
    main()
