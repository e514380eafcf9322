"""Comparison helper for kernel tests: relative RMS error against a (float64) reference."""

from __future__ import annotations

import torch


def relative_rms_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """RMS(got - ref) / RMS(ref), computed in float64; 0 when both are zero."""
    ref, got = ref.detach().double(), got.detach().double()
    err = (got - ref).pow(2).mean().sqrt()
    scale = ref.pow(2).mean().sqrt()
    return (err / scale.clamp_min(torch.finfo(torch.float64).tiny)).item() if err > 0 else 0.0


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float, atol: float = 0.0) -> None:
    """Asserts got has ref's shape, is finite, and is within relative RMS error tol of ref or within atol everywhere.

    atol is for references that are zero up to rounding, where a relative error means nothing.
    """
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {(~torch.isfinite(got)).sum().item()} non-finite elements"
    if (got.detach().double() - ref.detach().double()).abs().max() <= atol:
        return
    error = relative_rms_error(ref, got)
    assert error <= tol, f"{name}: relative RMS error {error:.3e} > {tol:.1e}"
