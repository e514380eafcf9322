"""The digits quality table: teacher and default student side by side, with the sample grid.

    python scripts/digits_report.py --student runs/digits-lit     # after `dit-graft convert recipes/digits-lit.yaml`

Samples both models from the same noise and classes (DDIM, class-balanced), measures FD to held-out
digits, the real-vs-real floor at the same count, class accuracy, PSNR to the teacher and the
sampling latency ratio, and writes the "digits" section of docs/quality.md and
docs/img/digits-teacher-vs-student.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from _docs import write_section

import dit_graft
from dit_graft.evaluate import evaluate, sample_grid, save_grid
from dit_graft.loading import resolve_source

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", type=Path, default=ROOT / "runs" / "digits-lit")
    p.add_argument("--teacher", default="bundled:digits-dit")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--section", default="digits", help="Section name in docs/quality.md.")
    p.add_argument("--image", default="digits-teacher-vs-student.png")
    args = p.parse_args()

    teacher = dit_graft.from_pretrained(resolve_source(args.teacher))
    student = dit_graft.from_pretrained(args.student)
    report, s, t = evaluate(student, teacher, args.samples, args.steps, args.cfg, args.seed)
    save_grid(sample_grid(s, t), ROOT / "docs" / "img" / args.image)

    graft = json.loads((args.student / "graft.json").read_text())
    steps = graft["metrics"].get("steps")
    cmd = (
        f"python scripts/digits_report.py --student {os.path.relpath(args.student, ROOT)} "
        f"--samples {args.samples} --steps {args.steps} --cfg {args.cfg} --seed {args.seed}"
    )
    lines = [
        f"## {graft['recipe'].get('name') or args.student.name}: teacher vs student\n",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Command: `{cmd}`.",
        f"{args.samples} class-balanced samples per model, DDIM {args.steps} steps, cfg {args.cfg}, the same noise "
        f"for both. Student: {steps} distillation steps ({graft['metrics'].get('seconds')} s convert wall time).\n",
        "| model | FD ↓ | FD / floor | class accuracy ↑ | PSNR to teacher (dB) ↑ | sampling s | latency ratio |",
        "|---|---|---|---|---|---|---|",
        f"| real train vs held-out (floor) | {report['fd_floor']:.2f} | 1.00 | – | – | – | – |",
        f"| teacher ({args.teacher}) | {report['teacher_fd']:.2f} | {report['teacher_fd'] / report['fd_floor']:.2f} | "
        f"{report['teacher_accuracy']:.3f} | – | {report['teacher_seconds']:.1f} | 1.00 |",
        f"| student ({args.student.name}) | {report['fd']:.2f} | {report['fd_ratio']:.2f} | {report['accuracy']:.3f} | "
        f"{report['psnr_to_teacher']:.2f} | {report['seconds']:.1f} | {report['latency_ratio']:.2f} |",
        "",
        f"![teacher (left) vs student (right), one row per class](img/{args.image})",
    ]
    body = "\n".join(lines)
    print(body)
    write_section(ROOT / "docs" / "quality.md", args.section, body, title="# Quality")
    (ROOT / "docs" / f"{args.section}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
