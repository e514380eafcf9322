"""Processes: who is the main process, barriers, and failures that end every rank together.

A run launched by `torchrun` or `accelerate launch` has WORLD_SIZE > 1 in its environment; the
process group is started once (NCCL on GPUs, gloo on CPUs) and every rank runs the same pipeline.
Only the main process writes files; the others wait at barriers. An error on one rank is turned
into a one-line message that every rank raises with the same exit code (`agree`), so no rank is
left waiting at a barrier for a peer that died.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dit_graft.errors import DitGraftError


@dataclass(frozen=True)
class Procs:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_world() -> int:
    """The process count the launcher (torchrun, accelerate launch) started; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> Procs:
    """Starts the process group once when launched with several processes; this process's Procs."""
    world = launched_world()
    if world <= 1:
        return Procs()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Procs(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def current() -> Procs:
    if dist.is_available() and dist.is_initialized():
        return Procs(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Procs()


def device() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK) when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", current().local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def shutdown() -> None:
    """Ends the process group (after a last barrier, so no rank leaves while another still talks)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class PeerError(DitGraftError):
    """Another rank failed; this rank stops with that rank's message and exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def agree(error: BaseException | None) -> None:
    """Collective: every rank reports whether it failed; if any did, every rank raises the first failure.

    A DitGraftError keeps its message and exit code; any other exception becomes exit 1 with its type
    and first line. On one process this re-raises `error` unchanged.
    """
    procs = current()
    if not procs.distributed:
        if error is not None:
            raise error
        return
    mine = None if error is None else _describe(error)
    reports: list = [None] * procs.world
    dist.all_gather_object(reports, mine)
    first = next(((r, m) for r, m in enumerate(reports) if m is not None), None)
    if first is None:
        return
    if error is not None and isinstance(error, DitGraftError) and first[0] == procs.rank:
        raise error
    message, code = first[1]
    raise PeerError(message if first[0] == procs.rank else f"{message} (rank {first[0]})", code)


def _describe(error: BaseException) -> tuple[str, int]:
    if isinstance(error, DitGraftError):
        return str(error), error.exit_code
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}", 1


@contextmanager
def collectively():
    """Runs a block on every rank; a failure anywhere ends every rank with that failure (see `agree`)."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - every failure must reach the other ranks
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        agree(e)
        raise
    agree(None)


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Averages `tensors` in place over the ranks with one flat all-reduce (a no-op in one process)."""
    procs = current()
    if not procs.distributed or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= procs.world
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def ends_together(error: BaseException, timeout_s: float = 20.0) -> bool:
    """Called by a failing rank: whether this rank should print the error line.

    On one process: yes. With several, every rank that failed at the same point (a recipe error, an agreed
    failure, a divergence) meets the others at a monitored barrier (gloo), and only the main process prints.
    A rank that failed alone (its peers are busy elsewhere) prints its own line; the launcher then ends
    the others.
    """
    procs = current()
    if not procs.distributed:
        return True
    if isinstance(error, PeerError):
        return procs.main
    try:
        if dist.get_backend() == "gloo":
            import datetime

            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
            return procs.main
    except Exception:  # noqa: BLE001 - a peer did not come: this rank failed alone
        return True
    return True


def leave(code: int) -> None:
    """Leaves the process with `code`; with a process group, without waiting on peers that may be gone."""
    import sys

    if current().distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
