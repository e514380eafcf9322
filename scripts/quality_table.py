"""Operator quality on the digits teacher: graft, distil with one small budget, evaluate.

    OMP_NUM_THREADS=2 python scripts/quality_table.py            # writes the "operators" section of docs/quality.md

For each attention operator: all layers grafted, and every other layer grafted. Then LiT's two claims:
linear attention with 1, 2 and 4 (the teacher's) heads, and with vs without weight inheritance (the
grafted attention projections re-initialised) at the same budget. Every student is distilled from the
same teacher-sample pool with the same seed and step budget, and sampled from the same noise as the
teacher (DDIM, cfg), so the numbers compare across rows.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from _docs import write_section

from dit_graft.evaluate import quality, sample
from dit_graft.loading import load_model, resolve_source
from dit_graft.metrics import mse, psnr
from dit_graft.pipeline import convert
from dit_graft.recipe import validate
from dit_graft.training.data import training_pool

ROOT = Path(__file__).resolve().parent.parent

OPERATORS = {
    "linear": {"dwconv": 3},
    "local": {"window": 2.0},
    "swa": {"window": 16},
    "sparse": {"block": 16, "keep": 0.5},
    "sla": {"block": 16},
    "gated_conv": {},
}


def configs(ops: list[str]) -> list[tuple[str, str, dict, bool]]:
    """(row name, layers, graft edit, inherit) for every row of the table."""
    rows = []
    for op in ops:
        for layers, label in (("all", "all"), ("every:2", "every other")):
            rows.append((f"{op} ({label})", layers, {"op": op, "options": OPERATORS[op]}, True))
    for heads in (1, 2):
        edit = {"op": "linear", "options": {"dwconv": 3, "heads": heads}}
        rows.append((f"linear, {heads} head(s)", "all", edit, True))
    rows.append(("linear, no inheritance", "all", {"op": "linear", "options": {"dwconv": 3}}, False))
    return rows


def reinit_attention(student: torch.nn.Module, paths: list[str]) -> None:
    """Re-initialises the grafted sites' projections: the 'without inheritance' control."""
    torch.manual_seed(0)
    for path in paths:
        attn = student.get_submodule(path)
        for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            lin.reset_parameters()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--ops", nargs="+", default=list(OPERATORS))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "quality-table")
    args = p.parse_args()

    teacher = load_model(resolve_source("bundled:digits-dit"))
    t_samples = sample(teacher, args.samples, args.sample_steps, args.cfg)
    t_q = quality(t_samples.images, t_samples.labels)
    rows = [("teacher (softmax)", t_q["fd"], t_q["fd_floor"], t_q["accuracy"], float("inf"), 1.0, 0.0)]
    available = [op for op in args.ops if op in OPERATORS]
    # every student draws from this one teacher-sample pool (the recipes differ only in their graft)
    pool = training_pool(
        teacher,
        validate({"model": {"source": "x"}, "graft": [{"site": "attention", "op": "linear"}]}).distill,
        args.work / "pool",
    )
    for name, layers, edit, inherit in configs(available):
        base = {
            "model": {"source": "bundled:digits-dit"},
            "graft": [{"site": "attention", "layers": layers, **edit}],
            "distill": {"steps": args.steps, "batch_size": 32, "checkpoint_every": 10**9, "log_every": 10},
        }
        try:
            recipe = validate(base)
        except Exception as e:  # noqa: BLE001 - an operator this build lacks is reported, not fatal
            print(f"skip {name}: {e}")
            continue

        def reinit(student, graft_plan, inherit=inherit):
            if not inherit:
                reinit_attention(student, [m.path for m in graft_plan.edits[0].modules])

        t0 = time.perf_counter()
        student = convert(recipe, None, teacher=teacher, work_dir=args.work, pool=pool, after_apply=reinit).student
        train_s = time.perf_counter() - t0
        s = sample(student, args.samples, args.sample_steps, args.cfg)
        q = quality(s.images, s.labels)
        rows.append(
            (
                name,
                q["fd"],
                q["fd_floor"],
                q["accuracy"],
                psnr(s.images, t_samples.images),
                s.seconds / t_samples.seconds,
                train_s,
            )
        )
        print(
            f"{name}: fd {q['fd']:.2f} acc {q['accuracy']:.3f} psnr {rows[-1][4]:.2f} "
            f"mse {mse(s.images, t_samples.images):.4f}",
            flush=True,
        )

    cmd = (
        f"python scripts/quality_table.py --steps {args.steps} --samples {args.samples} "
        f"--sample-steps {args.sample_steps} --cfg {args.cfg}"
    )
    lines = [
        "## Attention operators on the digits teacher (scripts/quality_table.py)\n",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Command: `{cmd}`.",
        f"Each student: {args.steps} distillation steps (batch 32, teacher-sample pool, eps + σ MSE), then "
        f"{args.samples} class-balanced samples, DDIM {args.sample_steps} steps, cfg {args.cfg}, the teacher's noise. "
        f"FD floor (real train vs held-out, {min(args.samples, 359)} images): {t_q['fd_floor']:.2f}.\n",
        "| student | FD ↓ | FD / floor | accuracy ↑ | PSNR to teacher (dB) ↑ | sampling latency / teacher | distil s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, fd, floor, acc, ps, lat, secs in rows:
        lines.append(f"| {name} | {fd:.2f} | {fd / floor:.2f} | {acc:.3f} | {ps:.2f} | {lat:.2f} | {secs:.0f} |")
    body = "\n".join(lines)
    print(body)
    write_section(ROOT / "docs" / "quality.md", "operators", body, title="# Quality")


if __name__ == "__main__":
    main()
