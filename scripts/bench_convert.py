"""Benchmarks the conversion: one distillation step split into its parts, and student/teacher latency.

    python scripts/bench_convert.py                # writes the "convert" and "scale-out" sections of docs/benchmarks.md
    python scripts/bench_convert.py --only scale   # only the scale-out table

1. One distillation step of the default recipe on the bundled digits teacher (batch 32): teacher
   forward, student forward + backward, optimizer step — medians over repeats.
2. Forward latency of a linear-attention student vs its softmax teacher at 256, 1024 and 4096 tokens
   (DiT-S width: 384 channels, 6 heads x 64, 4 blocks, patch 2, random weights, batch 1), measured side
   by side in the same run, plus each forward's peak memory beyond the loaded model.
3. Scale-out: `dit-graft convert` of the digits recipe (end-to-end stage, global batch 32) in 1 and 2
   processes (torchrun; gloo on CPUs) and with each trainable scope: training samples per second and the
   peak memory of the largest process (CUDA: max_memory_allocated; CPU: peak resident memory, which
   includes Python and torch themselves), as each run records them in graft.json. On a machine with
   fewer cores than 2 × OMP_NUM_THREADS, two processes share the cores and are not faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench import cpu_peak_mb, machine
from _docs import write_section
from diffusers import DiTTransformer2DModel

from dit_graft.diffusion import Schedule
from dit_graft.families import family_for
from dit_graft.loading import load_model, resolve_source
from dit_graft.plan import apply, plan
from dit_graft.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median wall time of `fn()` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_step(device: torch.device, repeats: int) -> list[tuple[str, float]]:
    recipe = load_recipe(ROOT / "recipes" / "digits-lit.yaml")
    teacher = load_model(resolve_source(recipe.model.source)).to(device)
    student = apply(teacher, plan(teacher, recipe))
    family_for(student).prepare_for_training(student.train())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    b = recipe.distill.batch_size
    x = torch.randn(b, 1, 16, 16, device=device)
    t = torch.randint(0, Schedule.linear().num_steps, (b,), device=device)
    y = torch.randint(0, 10, (b,), device=device)

    def teacher_fwd():
        with torch.no_grad():
            return teacher(x, timestep=t, class_labels=y).sample

    target = teacher_fwd()

    def student_fwd_bwd():
        opt.zero_grad(set_to_none=True)
        (student(x, timestep=t, class_labels=y).sample - target).square().mean().backward()

    student_fwd_bwd()
    rows = [
        ("teacher forward", timed(teacher_fwd, device, repeats)),
        ("student forward + backward", timed(student_fwd_bwd, device, repeats)),
        ("optimizer step (AdamW)", timed(opt.step, device, repeats)),
    ]
    return rows + [("one distillation step (sum)", sum(r[1] for r in rows))]


def dit_s(tokens: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A DiT-S-width teacher with `tokens` tokens (patch 2) and one input batch."""
    side = int(tokens**0.5) * 2
    torch.manual_seed(0)
    teacher = DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=side,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    inputs = dict(
        hidden_states=torch.randn(1, 4, side, side, device=device),
        timestep=torch.tensor([500], device=device),
        class_labels=torch.tensor([1], device=device),
    )
    return teacher.to(device).eval(), inputs


def student_of(teacher: torch.nn.Module) -> torch.nn.Module:
    return apply(teacher, plan(teacher, load_recipe(ROOT / "recipes" / "digits-lit.yaml")))


def forward_peak_mb(which: str, tokens: int, device: torch.device) -> float:
    """Peak memory of one forward beyond the loaded model, in MB.

    CUDA: max_memory_allocated. CPU: the child process's peak RSS growth during the forward, measured
    in a fresh process per model so that one model's peak cannot hide the other's.
    """
    if device.type == "cuda":
        model, inputs = dit_s(tokens, device)
        model = student_of(model) if which == "student" else model
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            model(**inputs)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--peak-child", which, str(tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _peak_child(which: str, tokens: int) -> None:
    """In a fresh process: load one model, run one forward, print its peak RSS growth in MB."""
    model, inputs = dit_s(tokens, torch.device("cpu"))
    model = student_of(model) if which == "student" else model
    with torch.no_grad():
        print(cpu_peak_mb(lambda: model(**inputs)))


def bench_latency(device: torch.device, repeats: int, tokens: list[int]) -> list[tuple]:
    rows = []
    for n in tokens:
        teacher, inputs = dit_s(n, device)
        student = student_of(teacher)
        with torch.no_grad():
            t_ms = timed(lambda m=teacher, x=inputs: m(**x), device, repeats)
            s_ms = timed(lambda m=student, x=inputs: m(**x), device, repeats)
        rows.append(
            (n, t_ms, s_ms, s_ms / t_ms, forward_peak_mb("teacher", n, device), forward_peak_mb("student", n, device))
        )
    return rows


# 1 and 2 processes alternate, so that a change in the machine's load affects both alike
SCALE_ROWS = [(n, "ddp", scope) for scope in ("all", "grafted", "new", "lora") for n in (1, 2)] + [(2, "fsdp", "all")]


def bench_compiled(device: torch.device, repeats: int, tokens: list[int]) -> list[tuple]:
    """Forward ms of teacher and student, eager and torch.compile(fullgraph=True), side by side in one run.

    Each compiled model is timed after its first call (which compiles); the compile seconds are reported too.
    """
    rows = []
    for n in tokens:
        teacher, inputs = dit_s(n, device)
        student = student_of(teacher)
        row = [n]
        with torch.no_grad():
            for model in (teacher, student):
                eager = timed(lambda m=model, x=inputs: m(**x), device, repeats)
                torch._dynamo.reset()
                compiled = torch.compile(model, fullgraph=True)
                t0 = time.perf_counter()
                compiled(**inputs)
                _sync(device)
                row += [eager, timed(lambda m=compiled, x=inputs: m(**x), device, repeats), time.perf_counter() - t0]
        rows.append(tuple(row))
    return rows


def compiled_lines(rows: list[tuple]) -> list[str]:
    lines = [
        "",
        "torch.compile (fullgraph=True, inductor), same models and inputs, eager and compiled side by side "
        "(`--compile`; compile s: the first call):\n",
        "| tokens | teacher eager ms | teacher compiled ms | student eager ms | student compiled ms | "
        "compiled student/teacher | teacher speedup | student speedup | compile s (teacher, student) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, te, tc, tcs, se, sc, scs in rows:
        lines.append(
            f"| {n} | {te:.1f} | {tc:.1f} | {se:.1f} | {sc:.1f} | {sc / tc:.3f} | {te / tc:.2f}× | {se / sc:.2f}× | "
            f"{tcs:.0f}, {scs:.0f} |"
        )
    return lines


def convert_run(procs: int, parallel: str, scope: str, steps: int, threads: int) -> dict:
    """One conversion of the digits recipe in `procs` processes; its graft.json metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "student"
        sets = [
            f"distill.steps={steps}",
            "distill.batch_size=32",
            "distill.pool_size=64",
            "distill.pool_steps=5",
            f"distill.checkpoint_every={steps}",
            f"distill.parallel={parallel}",
            f"distill.trainable={scope}",
        ]
        launcher = [sys.executable, "-m", "dit_graft.cli"]
        if procs > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
            launcher += ["-m", "dit_graft.cli"]
        cmd = [*launcher, "convert", str(ROOT / "recipes" / "digits-lit.yaml"), "--out", str(out)]
        cmd += [a for x in sets for a in ("--set", x)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=tmp)
        return json.loads((out / "graft.json").read_text())["metrics"]


def bench_scale(steps: int, threads: int) -> list[tuple]:
    rows = []
    for procs, parallel, scope in SCALE_ROWS:
        load = os.getloadavg()[0]
        m = convert_run(procs, parallel, scope, steps, threads)
        load = max(load, os.getloadavg()[0])
        row = (procs, parallel, scope, m["params_trained"], m["samples_per_second"], m["peak_memory_mb"], load)
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def scale_section(rows: list[tuple], steps: int, threads: int, device: torch.device) -> str:
    lines = [
        "## Scale-out and trainable scopes (scripts/bench_convert.py)\n",
        f"Machine: {machine(device)}. Command: `python scripts/bench_convert.py --only scale --steps {steps} "
        f"--threads {threads}`: `dit-graft convert recipes/digits-lit.yaml` (end-to-end stage, {steps} steps, "
        "global batch 32), one process or `torchrun --nproc-per-node 2` (gloo), OMP_NUM_THREADS="
        f"{threads} per process. Samples/s counts training steps only; peak memory is the largest process's "
        "(CPU: peak resident memory, Python and torch included).\n",
        "| processes | parallel | trainable | trained params | samples/s | peak MB | load average |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p} | {par} | {sc} | {n:,} | {sps:.1f} | {mb:.0f} | {load:.1f} |" for p, par, sc, n, sps, mb, load in rows
    ]
    lines.append(
        "\nLoad average: the machine's 1-minute load average around each run (other jobs sharing the cores "
        "make a row slower; compare rows of similar load)."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--only", choices=["convert", "scale"], help="run one section only")
    p.add_argument("--steps", type=int, default=20, help="training steps per scale-out run")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process in the scale-out runs")
    p.add_argument("--compile", action="store_true", help="also time both models under torch.compile (slow on CPU)")
    p.add_argument("--peak-child", nargs=2, metavar=("MODEL", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak_child:
        _peak_child(args.peak_child[0], int(args.peak_child[1]))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.only != "convert":
        body = scale_section(bench_scale(args.steps, args.threads), args.steps, args.threads, device)
        print(body)
        write_section(args.out, "scale-out", body)
    if args.only == "scale":
        return
    step = bench_step(device, args.repeats)
    lat = bench_latency(device, args.repeats, args.tokens)
    lines = [
        f"## Conversion (scripts/bench_convert.py)\n\nMachine: {machine(device)}. "
        f"Command: `python scripts/bench_convert.py --repeats {args.repeats}`. Medians of {args.repeats} runs.\n",
        "One distillation step, default recipe (digits teacher, batch 32, all attention → linear):\n",
        "| part | ms |",
        "|---|---|",
    ]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in step]
    lines += [
        "",
        "Forward latency, linear-attention student vs softmax teacher (DiT-S width, 4 blocks, batch 1, "
        "random weights):\n",
        "| tokens | teacher ms | student ms | student/teacher | teacher peak MB | student peak MB |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {t:.1f} | {s:.1f} | {r:.3f} | {tm:.0f} | {sm:.0f} |" for n, t, s, r, tm, sm in lat]
    if args.compile:
        lines += compiled_lines(bench_compiled(device, args.repeats, args.tokens))
    body = "\n".join(lines)
    print(body)
    write_section(args.out, "convert", body)


if __name__ == "__main__":
    main()
