"""Benchmarks the attention operators: forward latency and peak memory relative to softmax attention.

    OMP_NUM_THREADS=1 python scripts/bench_operators.py    # writes the "operators" section of docs/benchmarks.md

One DiT-XL/2 attention layer, a diffusers Attention(query_dim=1152, heads=16, dim_head=72) with random
weights, batch 1, N tokens on a √N×√N grid, with each operator's processor installed by `op.build`
(softmax: diffusers' default SDPA processor). Operators run side by side at each N, softmax first, and
every ratio is to softmax at the same N. Per (operator, N), in a fresh process (on CPU a child of a
fork server that imported torch and diffusers once; on CUDA in this process):

1. one forward that measures peak memory beyond the loaded layer and its input (CPU: the peak RSS
   growth, as scripts/bench_convert.py measures it; CUDA: max_memory_allocated);
2. timed forwards, up to --repeats, stopping once --budget-s seconds of them have run (at least one);
   their median is the latency.

The slopes are least-squares fits of log latency against log N, over every measured N and over the
two largest (at small N the q/k/v/out projections, linear in N, dominate every operator). An operator
whose forward is predicted (from its previous N, growing as N²) to take longer than --max-forward-s
is skipped at that N and above; softmax, the reference, always runs (--max-forward-s 0: never skip).
The formula column is the operator's attention-core FLOP formula ÷ softmax's: the work its kernel
does, not what the PyTorch path off CUDA does (masked and sparse attention compute densely there).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from _bench import cpu_peak_mb, machine
from _docs import write_section
from diffusers.models.attention_processor import Attention

from dit_graft.families.dit import DIT, SelfAttentionAdapter
from dit_graft.operators import OPERATORS, Site, TokenGrid
from dit_graft.operators.base import build_replacement

if importlib.util.find_spec("dit_graft.operators.sla") is not None:
    importlib.import_module("dit_graft.operators.sla")  # registers `sla` should the package not import it

ROOT = Path(__file__).resolve().parent.parent
HEADS, HEAD_DIM = 16, 72  # DiT-XL/2
DIM = HEADS * HEAD_DIM

# (operator, options): windows of ~200-260 keys per query, so that local, swa and sparse do similar work
BENCHED = [
    ("softmax", {}),
    ("linear", {}),
    ("local", {"window": 8.0}),
    ("swa", {"window": 256}),
    ("sparse", {"block": 64, "keep": 4}),
    ("gated_conv", {"kernel": 3}),
    ("sla", {}),
]


def _site(tokens: int) -> Site:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise SystemExit(f"--tokens: {tokens} is not a square number of tokens")
    grid = TokenGrid((side, side))
    return Site("attn", "attention", 0, DIM, HEADS, grid, adapter=SelfAttentionAdapter(grid))


def _layer(name: str, options: dict, tokens: int, device: torch.device) -> tuple[Attention, torch.Tensor]:
    """The attention layer with the operator's processor, and one input of `tokens` tokens."""
    torch.manual_seed(0)
    attn = Attention(DIM, heads=HEADS, dim_head=HEAD_DIM, bias=True).to(device).eval()
    op = OPERATORS.get(name)
    processor = build_replacement(op, DIT, _site(tokens), attn, op.parse_options(options))
    attn.set_processor(processor.to(device) if isinstance(processor, torch.nn.Module) else processor)
    return attn, torch.randn(1, tokens, DIM, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, options: dict, tokens: int, repeats: int, budget_s: float, device: str) -> dict:
    """Peak memory of the first forward (MB) and the median latency of the timed ones (ms)."""
    dev = torch.device(device)
    attn, x = _layer(name, options, tokens, dev)
    gc.collect()
    with torch.no_grad():
        if dev.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            attn(x)
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak_mb = cpu_peak_mb(lambda: attn(x))
        times: list[float] = []
        while not times or (len(times) < repeats and sum(times) < budget_s * 1e3):
            _sync(dev)
            t0 = time.perf_counter()
            attn(x)
            _sync(dev)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "runs": len(times), "peak_mb": peak_mb}


def _child(conn, *args) -> None:
    conn.send(measure(*args))
    conn.close()


def measure_fresh(ctx, *args) -> dict | str:
    """`measure` in a fresh child of the fork server; a string saying why when the child dies."""
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, *args))
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = None
    child.join()
    return result if result is not None else f"failed (exit code {child.exitcode})"


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(ms) against log(N)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(ms) for _, ms in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def formula_ratio(name: str, options: dict, tokens: int) -> float | None:
    op, softmax = OPERATORS.get(name), OPERATORS.get("softmax")
    if op.flops is None:
        return None
    site = _site(tokens)
    return op.flops(site, tokens, op.parse_options(options)) / softmax.flops(site, tokens, None)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    registered = dict(OPERATORS.items())
    benched = [(n, o) for n, o in BENCHED if n in registered]
    notes = [
        f"`{n}` is not registered (no dit_graft.operators.{n}): not measured" for n, _ in BENCHED if n not in registered
    ]
    ctx = None
    if device.type == "cpu":
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "diffusers.models.attention_processor", "dit_graft.operators", "__main__"])
    rows, last = [], {}
    for tokens in args.tokens:
        reference = None
        for name, options in benched:
            row = {"op": name, "options": options, "tokens": tokens, "formula": formula_ratio(name, options, tokens)}
            prev = last.get(name)  # (N, ms) of the last measured N, "skipped" or None
            predicted = prev[1] * (tokens / prev[0]) ** 2 / 1e3 if isinstance(prev, tuple) else 0.0
            skip = name != "softmax" and args.max_forward_s and (prev == "skipped" or predicted > args.max_forward_s)
            if skip:
                row["result"] = "skipped" if prev == "skipped" else f"skipped (~{predicted:.0f} s/forward predicted)"
                last[name] = "skipped"
            else:
                call = (name, options, tokens, args.repeats, args.budget_s, device.type)
                row["result"] = measure(*call) if ctx is None else measure_fresh(ctx, *call)
                if isinstance(row["result"], dict):
                    last[name] = (tokens, row["result"]["ms"])
            if name == "softmax" and isinstance(row["result"], dict):
                reference = row["result"]
            row["reference"] = reference
            rows.append(row)
            print(_row(row), flush=True)
    return rows, notes


def _row(row: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "-"
    head = f"| {row['op']} | {opts} | {row['tokens']} |"
    result, ref = row["result"], row["reference"]
    if not isinstance(result, dict):
        return f"{head} {result} | | | | | {_fmt_ratio(row['formula'])} |"
    ms_ratio = mem_ratio = None
    if ref is not None:
        ms_ratio = result["ms"] / ref["ms"]
        mem_ratio = result["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None
    return (
        f"{head} {result['ms']:.1f} | {result['runs']} | {_fmt_ratio(ms_ratio)} | {result['peak_mb']:.0f} | "
        f"{_fmt_ratio(mem_ratio)} | {_fmt_ratio(row['formula'])} |"
    )


def table(rows: list[dict], notes: list[str], args: argparse.Namespace) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{env}python scripts/bench_operators.py {shlex.join(sys.argv[1:])}".rstrip()
    memory = "peak RSS growth, fresh process" if device.type == "cpu" else "max_memory_allocated"
    header = f"Machine: {machine(device)}" + (f"; {args.note}" if args.note else "")
    if hasattr(os, "getloadavg"):
        header += f"; 1-min load average {args.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    header += "."
    lines = [
        "## Attention operators (scripts/bench_operators.py)\n",
        f"{header} Command: `{command}`.\n",
        f"One DiT-XL/2 attention layer (diffusers `Attention`, 1152 channels = 16 heads × 72), batch 1, "
        f"random weights, forward only; the operator's processor installed with `op.build`, softmax = diffusers' "
        f"default SDPA processor. ms: median of the timed runs after one first forward, which measures peak "
        f"memory ({memory}). ×softmax: at the same N, in this run. Formula: the operator's attention-core FLOP "
        f"formula ÷ softmax's (projections excluded) — the work its kernel does.",
        "",
        "| operator | options | N | ms | runs | ms ×softmax | peak MB | peak ×softmax | core FLOPs ×softmax, formula |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in rows]
    lines += [
        "",
        "Latency against N: least-squares slope of log ms on log N, over every measured N and over the two largest "
        "(where the attention core, not the projections, dominates):\n",
        "| operator | slope, all N | slope, two largest N | over N |",
        "|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["op"] for r in rows):
        points = [(r["tokens"], r["result"]["ms"]) for r in rows if r["op"] == name and isinstance(r["result"], dict)]
        cells = " | ".join("-" if f is None else f"{f:.2f}" for f in (slope(points), slope(points[-2:])))
        lines.append(f"| {name} | {cells} | {', '.join(str(n) for n, _ in points)} |")
    if device.type == "cpu":
        notes.append(
            "Off CUDA the PyTorch paths run: `local` and `swa` are SDPA with a dense boolean mask and `sparse` is "
            "the block-sparse reference (dense scores, masked, a few heads per call), so all three still do "
            "O(N²) work here; their savings are the formula column's, for a kernel that skips the masked blocks."
        )
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--repeats", type=int, default=5, help="timed forwards at most, per operator and N")
    p.add_argument("--budget-s", type=float, default=10.0, help="stop timing once this many seconds have run")
    p.add_argument("--max-forward-s", type=float, default=30.0, help="skip operators predicted slower (0: never)")
    p.add_argument("--note", default="", help="appended to the table's machine line (e.g. what else ran)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    args.load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows, notes = run(args)
    body = table(rows, notes, args)
    print(body)
    write_section(args.out, "operators", body)


if __name__ == "__main__":
    main()
