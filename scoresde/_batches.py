"""The Trainer's data sources: seeded batches of a tensor, or the batches of an iterable."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde._validation import check_finite_rows


class _TensorBatches:
    """Global batches of `batch_size` rows drawn with replacement by a seeded generator."""

    def __init__(self, x: Tensor, y: Tensor | None, batch_size: int, gen: torch.Generator):
        self.x, self.y, self.batch_size, self.gen = x, y, batch_size, gen

    def next(self) -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=self.gen)
        return self.x[idx], (None if self.y is None else self.y[idx])


class _IterableBatches:
    """Batches from a DataLoader / iterable, restarted when exhausted (one per rank)."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        self.it: Iterator[Any] = iter(data)
        self.count = 0  # batches drawn, to name a bad one

    def next(self) -> tuple[Tensor, Tensor | None]:
        try:
            item = next(self.it)
        except StopIteration:
            self.it = iter(self.data)
            try:
                item = next(self.it)
            except StopIteration:
                if self.count == 0:
                    raise ValueError("data is an empty iterable") from None
                # a generator / iterator returns itself from iter() and stays spent
                raise ValueError(
                    f"data ran out after {self.count} batches and cannot be restarted (a "
                    f"{type(self.data).__name__} runs once): pass a re-iterable such as a list or "
                    "a DataLoader, or at least as many batches as steps"
                ) from None
        self.count += 1
        if torch.is_tensor(item):
            return self._checked(item), None
        if isinstance(item, (tuple, list)) and len(item) == 2 and torch.is_tensor(item[0]):
            return self._checked(item[0]), item[1]
        if isinstance(item, (tuple, list)) and len(item) == 1 and torch.is_tensor(item[0]):
            return self._checked(item[0]), None
        raise TypeError(
            "an iterable data source must yield tensors x or pairs (x, labels), got "
            f"{type(item).__name__}"
        )

    def _checked(self, x: Tensor) -> Tensor:
        """Refuse NaN/Inf in a batch (CPU batches only: on a device it would cost a sync per
        step; the non-finite-loss check catches those)."""
        if x.device.type == "cpu" and x.ndim >= 1:
            check_finite_rows("data", x, f" (batch {self.count} of the iterable)")
        return x


def make_batches(
    data: Any, labels: Any, batch_size: int, gen: torch.Generator
) -> _TensorBatches | _IterableBatches:
    """The batch source of `Trainer.fit`'s data: a tensor [N, *D] (or a pair (x, labels))
    gives seeded global batches of `batch_size`; an iterable gives its own batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        if labels is not None:
            raise ValueError("labels given twice: in data=(x, y) and labels=")
        data, labels = data
    if torch.is_tensor(data):
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must be a non-empty tensor [N, *D], got {tuple(data.shape)}")
        if not torch.is_floating_point(data):
            raise TypeError(f"data must be floating point, got dtype {data.dtype}")
        check_finite_rows("data", data)
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (data.shape[0],):
                raise ValueError(
                    f"labels must have shape [N] = [{data.shape[0]}], got {tuple(labels.shape)}"
                )
            labels = labels.long()
        return _TensorBatches(data, labels, batch_size, gen)
    if labels is not None:
        raise ValueError("labels= is only used with tensor data; iterables yield (x, y)")
    if isinstance(data, Iterable):
        return _IterableBatches(data)
    raise TypeError(
        f"data must be a tensor [N, *D], a pair (x, labels) or an iterable of batches, "
        f"got {type(data).__name__}"
    )


def check_features(model: torch.nn.Module, batches: _TensorBatches | _IterableBatches) -> None:
    """Name `data` (not a batch of it) when its per-sample size differs from the `dim` a
    network declares (MLPScoreNet, alone or wrapped in a ScoreModel): otherwise the first
    step fails deep in the network with the batch's shape. Batches of an iterable are left
    to the network, which sees them one at a time."""
    if not isinstance(batches, _TensorBatches):
        return
    data = batches.x
    from scoresde.nets.mlp import MLPScoreNet  # a user's net may use `dim` for other things

    for module in (model, getattr(model, "net", None)):
        if isinstance(module, MLPScoreNet):
            dim = module.dim
            features = math.prod(data.shape[1:])
            if features != dim:  # make_batches already refused data with ndim < 2
                raise ValueError(
                    f"data must have {dim} features per sample to match the model, got "
                    f"data of shape {tuple(data.shape)} ({features} features per sample)"
                )
            return
