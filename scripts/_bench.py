"""Shared benchmark helpers: the machine's name and a CPU peak-memory probe."""

from __future__ import annotations

import platform
import threading
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{cpu_name()} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def cpu_peak_mb(fn, interval_s: float = 0.0005) -> float:
    """Peak resident-memory growth while `fn()` runs, in MB, sampled by a polling thread.

    ru_maxrss cannot be used: it remembers peaks from before the call (model construction).
    """
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(interval_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak = max(peak, proc.memory_info().rss)
    return (peak - base) / 2**20
