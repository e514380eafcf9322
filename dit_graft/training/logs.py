"""The loss log of a run: loss.csv, loss.json and a loss-curve PNG (written by the main process)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path


def write_loss_log(log: list[dict], out_dir: Path) -> None:
    """Writes loss.csv, loss.json and a loss-curve PNG."""
    if not log:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in log for k in row))
    with open(out_dir / "loss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(log)
    (out_dir / "loss.json").write_text(json.dumps(log))
    with contextlib.suppress(ImportError):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        steps = [r["step"] for r in log]
        curves = {k: [r.get(k, float("nan")) for r in log] for k in keys if k not in ("step", "lr")}
        for k, values in curves.items():
            ax.plot(steps, values, label=k)
        if all(v > 0 for values in curves.values() for v in values if not math.isnan(v)):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png")
        plt.close(fig)
