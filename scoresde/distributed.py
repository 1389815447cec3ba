"""Multi-process helpers for training under `torchrun` (torch.distributed, DDP).

`torchrun --nproc_per_node=K script.py` starts K processes and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each. `setup(...)` reads them, initialises the
default process group (gloo on CPU, nccl on CUDA) if that has not been done, and picks
the device (cuda:LOCAL_RANK on GPUs). The `Trainer` calls it; user code only needs
`shutdown()` at the end of a script (or nothing: the group dies with the process).

Sampling and likelihoods (`sample`, `log_likelihood`): the work is cut into global chunks
of `batch_size` samples (points), chunk k holding samples k * batch_size, ... whatever the
number of processes; rank r computes chunks r, r + K, r + 2K, ... and rank 0 gathers them in
order. Each chunk is sampled with `batch_invariant=True`, a fresh generator seeded with the
run's seed (so every chunk uses the same 64-bit Philox key) and `sample_offset` = its first
sample's index, so K processes write exactly the samples of one process with the same seed
and batch size, and the batch size does not change them either (PC's Langevin corrector
then takes its step size from reference particles, not from the batch) up to the network's
rounding, which can differ in the last bit between batch sizes (and flip a step decision
of `AdaptiveSDESampler`, which then ends within about its error: see its module docstring).

Design of data parallelism in `scoresde.training`: every rank draws the same *global*
batch indices and loss noise from identically seeded generators and keeps its slice, so
a K-process run computes the same gradient as a one-process run with the same global
batch (DDP averages the per-rank gradients), and the optimizer and EMA states, updated
from identical gradients, stay identical on every rank without further communication.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from scoresde._typing import Tensor
from scoresde._validation import check_device, check_positive_int

__all__ = [
    "DistInfo",
    "env_requests_distributed",
    "setup",
    "shutdown",
    "all_reduce_mean",
    "sample",
    "log_likelihood",
    "chunks",
]


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
        dev = check_device("device", device) if device is not None else _default_device(0)
        return SINGLE, dev
    if not dist.is_available():
        raise RuntimeError("distributed=True but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = check_device("device", device) if device is not None else _default_device(local_rank)
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
        gc.collect()  # a group still referenced from a cycle: join its threads now, not at exit


# --- sharded sampling and likelihoods --------------------------------------------------------


def chunks(total: int, batch_size: int) -> list[tuple[int, int]]:
    """The global chunks [(start, size), ...] of `total` items in batches of `batch_size`."""
    return [(lo, min(batch_size, total - lo)) for lo in range(0, total, batch_size)]


def _gather_chunks(
    mine: list[Tensor], plan: list[tuple[int, int]], info: DistInfo, like: Tensor
) -> Tensor | None:
    """Rank r holds the outputs of chunks r, r + K, ... (`mine`, in order); returns all
    chunks concatenated in global order on rank 0 (None on the other ranks)."""
    local = torch.cat(mine) if mine else like.new_empty((0, *like.shape[1:]))
    if not info.enabled:
        return local
    k = info.world_size
    sizes = [sum(plan[c][1] for c in range(r, len(plan), k)) for r in range(k)]
    width = max(sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(k)]
    dist.all_gather(parts, padded.contiguous())
    if not info.is_main:
        return None
    pos = [0] * k
    out = []
    for c, (_, size) in enumerate(plan):
        r = c % k
        out.append(parts[r][pos[r] : pos[r] + size])
        pos[r] += size
    return torch.cat(out)


def _like(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.empty((0, *shape), device=device, dtype=dtype)


def sample(
    sampler: Any,
    score_fn: Callable[[Tensor, Tensor], Tensor],
    num_samples: int,
    sample_shape: Sequence[int],
    *,
    seed: int = 0,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    info: DistInfo | None = None,
) -> Tensor | None:
    """`num_samples` samples of shape `sample_shape`, sharded over the processes of a
    `torchrun` launch (or computed in one process) with identical results.

    Args:
        sampler: a `scoresde.samplers.Sampler`.
        score_fn: its score function (on `device`).
        num_samples, sample_shape: the output is `[num_samples, *sample_shape]`.
        seed: every chunk is sampled with `torch.Generator(device).manual_seed(seed)`.
        batch_size: samples per chunk (see the module docstring).
        device, dtype: where and in what precision to sample (default: the device picked
            by `setup`, cuda:LOCAL_RANK under torchrun with GPUs, else CPU; float32).
        progress: per-chunk progress bars (rank 0 only).
        info: the process group (default: `setup(None, device)`, which initialises it
            under torchrun).

    Returns the samples on rank 0 (and in a single process), None on the other ranks.
    Total NFE over all chunks of this rank: `sampler.nfe_total` afterwards.
    """
    num_samples = check_positive_int("num_samples", num_samples)
    batch_size = check_positive_int("batch_size", batch_size)
    shape = tuple(int(d) for d in sample_shape)
    if info is None:
        info, dev = setup(None, device)
    else:
        local = info.local_rank
        dev = check_device("device", device) if device is not None else _default_device(local)
    plan = chunks(num_samples, batch_size)
    mine, nfe = [], 0
    for c in range(info.rank, len(plan), info.world_size):
        lo, n = plan[c]
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        x = sampler.sample(
            score_fn,
            (n, *shape),
            generator=gen,
            device=dev,
            dtype=dtype,
            progress=progress and info.is_main,
            batch_invariant=True,
            sample_offset=lo,
        )
        nfe += sampler.nfe
        mine.append(x.detach())
    sampler.nfe_total = nfe
    return _gather_chunks(mine, plan, info, _like(shape, dev, dtype or torch.float32))


def log_likelihood(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    sde: Any,
    data: Tensor,
    *,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    info: DistInfo | None = None,
    **kwargs: Any,
) -> tuple[Tensor, int] | None:
    """Per-point log-likelihoods `[N]` (nats, float64, on the CPU) of `data` `[N, *D]`,
    sharded over the processes of a `torchrun` launch with identical results.

    Every rank holds `data` (on the device to compute on); the points are cut into global
    batches of `batch_size` (batch k = points k * batch_size, ...), rank r solves batches
    r, r + K, ..., each with per-point Hutchinson probes from a generator seeded with
    `seed` (`batch_invariant=True`, `sample_offset` = the batch's first point), so a
    point's value does not depend on the number of processes. `kwargs` go to
    `scoresde.likelihood.log_likelihood` (trace, method, rtol, atol, eps, ...).

    Returns (logp `[N]`, NFE summed over all batches and ranks) on rank 0 (and in one
    process), None on the other ranks.
    """
    from scoresde.likelihood import log_likelihood as solve

    batch_size = check_positive_int("batch_size", batch_size)
    if not torch.is_tensor(data) or data.ndim < 2 or data.shape[0] == 0:
        raise ValueError(f"data must be a non-empty tensor [N, *D], got {data!r:.60}")
    if info is None:
        info, _ = setup(None, data.device)
    plan = chunks(data.shape[0], batch_size)
    mine, nfe = [], 0
    gen_device = data.device
    mine_batches = range(info.rank, len(plan), info.world_size)
    iterator: Any = mine_batches
    if progress and info.is_main:
        from tqdm.auto import tqdm

        iterator = tqdm(mine_batches, desc="log-likelihood", unit="batch")
    for c in iterator:
        lo, n = plan[c]
        gen = torch.Generator(device=gen_device).manual_seed(int(seed))
        res = solve(
            score_fn,
            sde,
            data[lo : lo + n],
            generator=gen,
            batch_invariant=True,
            sample_offset=lo,
            **kwargs,
        )
        nfe += res.nfe
        mine.append(res.logp.detach().to(torch.float64))
    like = data.new_empty((0,), dtype=torch.float64)
    logp = _gather_chunks(mine, plan, info, like)
    if info.enabled:
        total = torch.tensor([float(nfe)], dtype=torch.float64, device=data.device)
        dist.all_reduce(total)
        nfe = int(total.item())
    if logp is None:
        return None
    return logp.cpu(), nfe
