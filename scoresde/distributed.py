"""Multi-process helpers for training under `torchrun` (torch.distributed, DDP).

`torchrun --nproc_per_node=K script.py` starts K processes and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each. `setup(...)` reads them, initialises the
default process group (gloo on CPU, nccl on CUDA) if that has not been done, and picks
the device (cuda:LOCAL_RANK on GPUs). The `Trainer` calls it; user code only needs
`shutdown()` at the end of a script (or nothing: the group dies with the process).

Design of data parallelism in `scoresde.training`: every rank draws the same *global*
batch indices and loss noise from identically seeded generators and keeps its slice, so
a K-process run computes the same gradient as a one-process run with the same global
batch (DDP averages the per-rank gradients), and the optimizer and EMA states, updated
from identical gradients, stay identical on every rank without further communication.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor

__all__ = ["DistInfo", "env_requests_distributed", "setup", "shutdown", "all_reduce_mean"]


class DistInfo(NamedTuple):
    """enabled: running with more than one process; rank, world_size, local_rank."""

    enabled: bool
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints and shows progress."""
        return self.rank == 0


SINGLE = DistInfo(False, 0, 1, 0)


def env_requests_distributed() -> bool:
    """True when torchrun (or a similar launcher) set WORLD_SIZE > 1 and RANK."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def setup(enabled: bool | None, device: torch.device | str | None) -> tuple[DistInfo, torch.device]:
    """Initialise torch.distributed when asked (enabled=True) or when the environment says so
    (enabled=None); returns (DistInfo, device).

    The device defaults to cuda:LOCAL_RANK when CUDA is available, else CPU. The backend is
    nccl for CUDA devices and gloo otherwise.
    """
    if enabled is None:
        enabled = env_requests_distributed() or (dist.is_available() and dist.is_initialized())
    if not enabled:
        dev = torch.device(device) if device is not None else _default_device(0)
        return SINGLE, dev
    if not dist.is_available():
        raise RuntimeError("distributed=True but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else _default_device(local_rank)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [
            k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
        ]
        if missing:
            raise RuntimeError(
                f"distributed training needs the environment variables {missing} (launch the "
                "script with torchrun, or call torch.distributed.init_process_group first)"
            )
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    info = DistInfo(True, dist.get_rank(), dist.get_world_size(), local_rank)
    return info, dev


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def all_reduce_mean(t: Tensor, info: DistInfo) -> Tensor:
    """The mean of t over ranks (t itself in a single process)."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    """Leave the default process group, if one exists, on the normal exit path.

    `destroy_process_group` is collective: every rank must reach it together. Rank 0 often
    still writes checkpoints and plots when the others are done, and a rank that tears its
    connections down meanwhile can abort (seen as a rare SIGABRT of rank 1 under load), so
    all ranks first meet at a barrier.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
