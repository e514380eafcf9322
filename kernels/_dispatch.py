"""Backend choice shared by every kernel: Triton on CUDA, the bounded-memory PyTorch path (`blockwise`) elsewhere,
the dense reference (`naive`) only when asked; DIT_GRAFT_KERNELS forces one."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKEND_ENV_VAR = "DIT_GRAFT_KERNELS"
BACKENDS = ("triton", "blockwise", "naive")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def forced_backend() -> str | None:
    """The backend named by DIT_GRAFT_KERNELS, or None when it is unset or empty."""
    value = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def triton_available() -> bool:
    """Whether the triton package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks Triton to run kernels on the CPU interpreter (read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes", "y"}


def triton_interpreting() -> bool:
    """Whether triton itself was imported for the CPU interpreter (TRITON_INTERPRET set before `import triton`)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # Triton's own helpers (tl.zeros, tl.sum) are jit functions too, decorated when triton is imported.
    return isinstance(tl.zeros, InterpretedFunction)


def use_triton(op: str, *tensors: torch.Tensor, unsupported: str | None = None) -> bool:
    """Decides the backend for one call of `op`: True for Triton, False for a PyTorch path (see pytorch_path).

    `unsupported` is the op's reason its Triton kernel cannot take these inputs (None when it can): the automatic
    choice then falls back to the reference, a forced Triton raises it.
    """
    forced = forced_backend()
    if forced in ("naive", "blockwise"):
        return False
    if forced is None:
        on_cuda = all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors)
        return on_cuda and unsupported is None and triton_available()
    if not triton_available():
        raise ValueError(f"{op}: {BACKEND_ENV_VAR}=triton but the triton package is not installed")
    for t in tensors:
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"{op}: the Triton kernel takes float16, bfloat16 or float32, got {t.dtype}")
        if not t.is_cuda and not interpret_requested():
            raise ValueError(f"{op}: {BACKEND_ENV_VAR}=triton on {t.device} tensors needs TRITON_INTERPRET=1")
    if unsupported is not None:
        raise ValueError(f"{op}: {unsupported}")
    return True


def check_launchable(op: str, interpreted: bool, *tensors: torch.Tensor) -> None:
    """Raises unless a Triton module built with `interpreted` can launch on these tensors' devices."""
    for t in tensors:
        if not t.is_cuda and not interpreted:
            raise ValueError(
                f"{op}: Triton kernels on {t.device} tensors need TRITON_INTERPRET=1 set before triton is first "
                "imported (anything importing torch._dynamo, diffusers or triton itself may import it)"
            )


def pytorch_path(*tensors: torch.Tensor) -> str:
    """The PyTorch path a call not taking Triton runs: `naive` (dense reference) when DIT_GRAFT_KERNELS=naive or on
    meta tensors (shapes only: the bounded paths read their block maps) and under torch.compile (the bounded paths
    branch on their block maps, which breaks the graph; the reference traces whole), otherwise `blockwise`."""
    if forced_backend() == "naive" or any(t.is_meta for t in tensors) or torch.compiler.is_compiling():
        return "naive"
    return "blockwise"
