"""Benchmarks the attention kernels against torch SDPA at the same shapes, measured side by side in one run.

    python scripts/bench_kernels.py            # GPU shapes (bf16); writes the "kernels" section of docs/benchmarks.md
    python scripts/bench_kernels.py --small    # shrunken shapes: a minute or two on a CPU (the PyTorch paths there)

Per kernel and shape: forward and forward + backward median time (triton.testing.do_bench on CUDA, a wall-clock
median on CPU), the backward as their difference, achieved TB/s and TFLOP/s, the fraction of the roofline floor
(max(bytes / copy bandwidth, FLOPs / matmul rate), both measured at the start of the same run) and the speed-up
over SDPA at the same shape. Shapes: B=1, (H, N, d) in {(16, 4096, 72), (16, 16384, 72), (24, 16384, 128)} for
SDPA, linear and tile attention; B=2, H=16, N=32768, d=128 for block-sparse and SLA at 90% and 95% sparsity.
On CUDA the GPU targets (H100, bf16) are printed with pass/fail and written beside the table.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _docs import write_section
from dit_graft.kernels import (
    block_sparse_attention,
    linear_attention,
    sla_attention,
    sla_block_index,
    tile_attention,
    topk_block_index,
)

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64
TILE_WINDOW = (16, "circle")  # CLEAR's local window on the grids below
DENSE_SHAPES = [(1, 16, 4096, 72), (1, 16, 16384, 72), (1, 24, 16384, 128)]  # (B, H, N, d)
SPARSE_SHAPE = (2, 16, 32768, 128)
SMALL_DENSE_SHAPES = [(1, 2, 256, 72), (1, 2, 1024, 72), (1, 2, 1024, 128)]
SMALL_SPARSE_SHAPE = (2, 2, 2048, 128)
SPARSITIES = (0.90, 0.95)


@dataclass
class Cost:
    """Model FLOPs and compulsory bytes (inputs read, outputs written once) of a forward and of a backward."""

    fwd_flops: float
    bwd_flops: float
    fwd_bytes: float
    bwd_bytes: float


@dataclass
class Row:
    kernel: str
    shape: str
    cost: Cost
    fwd_ms: float
    fwd_bwd_ms: float
    sdpa: Row | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bwd_ms(self) -> float:
        return max(self.fwd_bwd_ms - self.fwd_ms, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timer(fn, device: torch.device, repeats: int, best: bool = False) -> float:
    """Median (or best) milliseconds of fn(): triton.testing.do_bench on CUDA, wall clock after a warm-up elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="min" if best else "median")
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times) if best else statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Measured device copy bandwidth in bytes/s (read + write), from the best of the repeats: a peak."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (timer(lambda: dst.copy_(src), device, repeats, best=True) * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Measured dense matmul rate in FLOP/s at n x n x n in dtype, from the best of the repeats: a peak."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (timer(lambda: a @ b, device, repeats, best=True) * 1e-3)


def window_pairs(grid: tuple[int, int], window: int, shape: str) -> int:
    """(query, key) pairs tile_attention computes on the grid: Σ over window offsets of the queries they fit."""
    h, w = grid
    dy = torch.arange(-window, window + 1).view(-1, 1)
    dx = torch.arange(-window, window + 1).view(1, -1)
    inside = (dy * dy + dx * dx < window * window) if shape == "circle" else torch.ones_like(dy * dx, dtype=bool)
    fits = (h - dy.abs()).clamp_min(0) * (w - dx.abs()).clamp_min(0)
    return int((fits * inside).sum())


def softmax_cost(bh: int, n: int, d: int, pairs: float, elt: int) -> Cost:
    """Softmax attention over `pairs` (query, key) pairs per head: 4·pairs·d forward, 2.5x that backward."""
    return Cost(4 * bh * pairs * d, 10 * bh * pairs * d, 4 * bh * n * d * elt, 8 * bh * n * d * elt)


def linear_cost(bh: int, n: int, d: int, elt: int) -> Cost:
    """Linear attention: 4·N·d² forward (state, output), 10·N·d² backward; q, k, v, o (+ do, dq, dk, dv) once."""
    return Cost(4 * bh * n * d * d, 10 * bh * n * d * d, 4 * bh * n * d * elt, 7 * bh * n * d * elt)


def make_inputs(shape, device, dtype, seed=0):
    B, H, N, D = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], do


def measure(kernel, shape, fn, leaves, do, cost, device, repeats, notes=()) -> Row:
    """Times fn() forward and forward + backward (the gradient of every output against do)."""

    def fwd():
        with torch.no_grad():
            return fn()

    def fwd_bwd():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, leaves, [do] * len(outs))

    fwd_ms = timer(fwd, device, repeats)
    fwd_bwd_ms = timer(fwd_bwd, device, repeats)
    return Row(kernel, "x".join(map(str, shape)), cost, fwd_ms, fwd_bwd_ms, notes=list(notes))


def dense_rows(shape, device, dtype, repeats) -> list[Row]:
    """SDPA, linear and tile attention at one (B, H, N, d), the latter two against the former."""
    B, H, N, D = shape
    elt = torch.finfo(dtype).bits // 8
    (q, k, v), do = make_inputs(shape, device, dtype)
    side = math.isqrt(N)
    grid = (side, N // side)
    window, window_shape = TILE_WINDOW
    sdpa = measure(
        "sdpa", shape, lambda: F.scaled_dot_product_attention(q, k, v), (q, k, v), do,
        softmax_cost(B * H, N, D, N * N, elt), device, repeats,
    )  # fmt: skip
    linear = measure(
        "linear", shape, lambda: linear_attention(q, k, v), (q, k, v), do,
        linear_cost(B * H, N, D, elt), device, repeats,
    )  # fmt: skip
    tile = measure(
        f"tile ({window_shape} r={window}, {grid[0]}x{grid[1]})", shape,
        lambda: tile_attention(q, k, v, grid, window, window_shape), (q, k, v), do,
        softmax_cost(B * H, N, D, window_pairs(grid, window, window_shape), elt), device, repeats,
    )  # fmt: skip
    linear.sdpa = tile.sdpa = sdpa
    return [sdpa, linear, tile]


def sparse_rows(shape, sparsity, inputs, sdpa, device, dtype, repeats) -> list[Row]:
    """Block-sparse (map given) and SLA (map computed inside the timed call) at one sparsity, against SDPA."""
    B, H, N, D = shape
    elt = torch.finfo(dtype).bits // 8
    (q, k, v), do = inputs
    keep = 1.0 - sparsity
    block_index = topk_block_index(q, k, BLOCK, keep)
    kept_pairs = float(block_index.sum()) / (B * H) * BLOCK * BLOCK
    block_sparse = measure(
        f"block-sparse {sparsity:.0%} (map given)", shape,
        lambda: block_sparse_attention(q, k, v, block_index, BLOCK), (q, k, v), do,
        softmax_cost(B * H, N, D, kept_pairs, elt), device, repeats,
    )  # fmt: skip
    # The critical map is topk_block_index's at the same keep: the same kept pairs.
    sparse, linear = softmax_cost(B * H, N, D, kept_pairs, elt), linear_cost(B * H, N, D, elt)
    cost = Cost(sparse.fwd_flops + linear.fwd_flops, sparse.bwd_flops + linear.bwd_flops, sparse.fwd_bytes,
                sparse.bwd_bytes)  # fmt: skip

    def sla():
        with torch.no_grad():
            critical, marginal = sla_block_index(q, k, BLOCK, keep, 0)
        return sla_attention(q, k, v, critical, marginal, BLOCK)

    sla_row = measure(f"sla {sparsity:.0%} (incl. map)", shape, sla, (q, k, v), do, cost, device, repeats)
    block_sparse.sdpa = sla_row.sdpa = sdpa
    return [block_sparse, sla_row]


def bench(small: bool, device: torch.device, dtype: torch.dtype, repeats: int) -> list[Row]:
    rows = []
    for shape in SMALL_DENSE_SHAPES if small else DENSE_SHAPES:
        rows += dense_rows(shape, device, dtype, repeats)
    shape = SMALL_SPARSE_SHAPE if small else SPARSE_SHAPE
    B, H, N, D = shape
    inputs = make_inputs(shape, device, dtype, seed=1)
    (q, k, v), do = inputs
    elt = torch.finfo(dtype).bits // 8
    sdpa = measure(
        "sdpa", shape, lambda: F.scaled_dot_product_attention(q, k, v), (q, k, v), do,
        softmax_cost(B * H, N, D, N * N, elt), device, repeats,
    )  # fmt: skip
    rows.append(sdpa)
    for sparsity in SPARSITIES:
        rows += sparse_rows(shape, sparsity, inputs, sdpa, device, dtype, repeats)
    return rows


def floor_ms(flops: float, nbytes: float, bandwidth: float, rate: float) -> float:
    return max(nbytes / bandwidth, flops / rate) * 1e3


def table(rows: list[Row], bandwidth: float, rate: float) -> str:
    lines = [
        "| kernel | B x H x N x d | fwd ms | fwd+bwd ms | fwd TB/s | fwd TFLOP/s | bwd TB/s | bwd TFLOP/s "
        "| fwd % of floor | bwd % of floor | fwd vs SDPA | fwd+bwd vs SDPA |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.cost
        fwd_s, bwd_s = r.fwd_ms * 1e-3, r.bwd_ms * 1e-3
        fwd_floor = floor_ms(c.fwd_flops, c.fwd_bytes, bandwidth, rate) / r.fwd_ms
        bwd_floor = floor_ms(c.bwd_flops, c.bwd_bytes, bandwidth, rate) / r.bwd_ms
        vs = (f"{r.sdpa.fwd_ms / r.fwd_ms:.2f}x", f"{r.sdpa.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x") if r.sdpa else ("", "")
        lines.append(
            f"| {r.kernel} | {r.shape} | {r.fwd_ms:.3f} | {r.fwd_bwd_ms:.3f} | {c.fwd_bytes / fwd_s / 1e12:.3f} "
            f"| {c.fwd_flops / fwd_s / 1e12:.3f} | {c.bwd_bytes / bwd_s / 1e12:.3f} | {c.bwd_flops / bwd_s / 1e12:.3f} "
            f"| {fwd_floor:.0%} | {bwd_floor:.0%} | {vs[0]} | {vs[1]} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row], bandwidth: float) -> list[tuple[str, float, float, bool]]:
    """The GPU targets (H100, bf16) as (name, measured, required, passed)."""
    checks = []

    def check(name, measured, required):
        checks.append((name, measured, required, measured >= required))

    for r in rows:
        c = r.cost
        if r.kernel == "linear":
            check(f"linear {r.shape} fwd: fraction of copy bandwidth", c.fwd_bytes / (r.fwd_ms * 1e-3) / bandwidth, 0.8)
            check(f"linear {r.shape} bwd: fraction of copy bandwidth", c.bwd_bytes / (r.bwd_ms * 1e-3) / bandwidth, 0.6)
            if r.shape.split("x")[2] == "16384":
                check(f"linear {r.shape} fwd+bwd: speed-up over SDPA", r.sdpa.fwd_bwd_ms / r.fwd_bwd_ms, 30.0)
        elif r.kernel.startswith("block-sparse"):
            sdpa_c = r.sdpa.cost
            fwd_ratio = (c.fwd_flops / r.fwd_ms) / (sdpa_c.fwd_flops / r.sdpa.fwd_ms)
            bwd_ratio = (c.bwd_flops / r.bwd_ms) / (sdpa_c.bwd_flops / r.sdpa.bwd_ms)
            check(f"{r.kernel} {r.shape} fwd: TFLOP/s per executed FLOP vs SDPA", fwd_ratio, 0.85)
            check(f"{r.kernel} {r.shape} bwd: TFLOP/s per executed FLOP vs SDPA", bwd_ratio, 0.60)
        elif r.kernel.startswith("sla 95%"):
            check(f"{r.kernel} {r.shape} fwd: speed-up over SDPA", r.sdpa.fwd_ms / r.fwd_ms, 9.0)
    return checks


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="shrunken shapes (a minute or two on a CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement on CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = args.repeats or (3 if args.small else 5)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20), 10)
    rate = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 1024, 10)
    print(f"copy {bandwidth / 1e12:.3f} TB/s, {dtype} matmul {rate / 1e12:.3f} TFLOP/s", file=sys.stderr)

    rows = bench(args.small, device, dtype, repeats)
    command = "python scripts/bench_kernels.py" + (" --small" if args.small else "")
    backend = os.environ.get("DIT_GRAFT_KERNELS") or ("triton" if device.type == "cuda" else "blockwise")
    body = [
        f"Kernels vs torch SDPA on **{device_name(device)}**, {str(dtype).removeprefix('torch.')}, kernel backend "
        f"`{backend}`, torch {torch.__version__}. Command: `{command}`.",
        "",
    ]
    if device.type != "cuda":
        body += [
            f"**CPU run of the `{backend}` PyTorch paths (no Triton), at shrunken shapes: a smoke test of the script, "
            "not GPU numbers and not comparable with the GPU targets.**",
            "",
        ]
    body += [
        f"Measured in the same run: copy bandwidth {bandwidth / 1e12:.3f} TB/s, {str(dtype).removeprefix('torch.')} "
        f"matmul {rate / 1e12:.3f} TFLOP/s. Floor = max(bytes / bandwidth, FLOPs / matmul rate); bytes are the "
        "compulsory ones (q, k, v read and o written once; backward adds do, dq, dk, dv). FLOPs: softmax 4·pairs·d "
        "forward and 2.5x that backward over the pairs computed (block-sparse: kept blocks; tile: pairs in window); "
        "linear 4·N·d² forward, 10·N·d² backward; SLA = its critical blocks' softmax + linear attention over N "
        "(its block-state sums and the block map count in its time, not in its FLOPs). bwd = (fwd+bwd) - fwd. "
        f"Block size {BLOCK}; SLA maps from `sla_block_index(critical=1 - sparsity, negligible=0)`, computed "
        "inside the timed call.",
        "",
        table(rows, bandwidth, rate),
    ]
    if device.type == "cuda":
        checks = targets(rows, bandwidth)
        body += ["", "GPU targets (H100, bf16):", ""]
        for name, measured, required, passed in checks:
            line = f"{'PASS' if passed else 'FAIL'}: {name} = {measured:.2f} (target ≥ {required:g})"
            print(line)
            body.append(f"- {line}")
    else:
        body += ["", "The GPU targets (H100, bf16) are checked only on CUDA."]
    text = "\n".join(body)
    print(text)
    write_section(args.out, "kernels", text)


if __name__ == "__main__":
    main()
