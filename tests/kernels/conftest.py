"""Kernel test setup: Triton runs on the CPU interpreter without CUDA, and torch.empty starts as NaN."""

import os

import pytest
import torch
from dit_graft.kernels._dispatch import triton_interpreting

# Triton chooses interpreter or GPU when a kernel is decorated: its own helpers (tl.zeros, tl.sum) when triton is
# imported, ours when a kernels' triton module is. This covers runs where nothing imported triton yet; otherwise
# TRITON_INTERPRET=1 must come from the environment or the top of tests/conftest.py (see triton_backend).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _nan_filled(allocate):
    """Wraps a torch allocator so floating tensors come back filled with NaN."""

    def allocate_nan(*args, **kwargs):
        t = allocate(*args, **kwargs)
        if t.is_floating_point():
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    return allocate_nan


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Makes torch.empty and torch.empty_like return NaN, so an output element a kernel never writes fails."""
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))


@pytest.fixture
def triton_backend(monkeypatch):
    """Forces the Triton kernels and returns the device their inputs belong on."""
    pytest.importorskip("triton")
    if DEVICE == "cpu" and not triton_interpreting():
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on the CPU: "
            "run `TRITON_INTERPRET=1 pytest` or set it at the top of tests/conftest.py, before torch is imported"
        )
    monkeypatch.setenv("DIT_GRAFT_KERNELS", "triton")
    return DEVICE
