"""Argument checks and small tensor helpers shared across scoresde (private).

Every public entry point validates its arguments here so that a user's mistake is a
`ValueError`/`TypeError` naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from scoresde._typing import Tensor


class NonFiniteError(FloatingPointError):
    """A trajectory produced NaN or Inf; the message names the step and time.

    Exported as `scoresde.samplers.NonFiniteError`; defined here so that the solvers below
    the samplers (`scoresde.flow`, `scoresde._ode`) raise the same class.
    """


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Return `value` as a float, or raise if it is not a finite (strictly) positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if torch.is_tensor(value) and value.numel() == 1:
            value = float(value)
        else:
            raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return `value` as an int, or raise if it is not an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Raise unless `value` is one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A flag must be a real bool (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_eps(eps: Any, sde: Any) -> float:
    """The end time eps of a solve must lie in (0, T) of the SDE."""
    eps = check_positive("eps", eps)
    if eps >= sde.T:
        raise ValueError(f"eps must be in (0, T={sde.T}), got {eps!r}")
    return eps


def check_data(name: str, x: Any) -> Tensor:
    """Data tensors are floating point with a batch dimension: `[B, *D]`, rank >= 2."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape [B, *D] with rank >= 2, got shape {tuple(x.shape)}"
        )
    return x


def check_finite(name: str, x: Tensor, where: str = "") -> Tensor:
    """A user's input holds no NaN / Inf (else the solver would report it at some step, as if
    the score were at fault). One host sync: for entry points, not for hot loops."""
    if x.numel() == 0:
        return x
    bad = ~torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise ValueError(
            f"{name} must be finite, but {rows.numel()} of its {x.shape[0]} rows hold NaN or "
            f"Inf (the first: row {int(rows[0])}){where}"
        )
    return x


def check_shape(shape: Any, name: str = "shape") -> tuple[int, ...]:
    """A sample shape `(B, *D)` of positive ints, rank >= 2."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in shape
    ):
        raise TypeError(f"{name} must be a tuple of ints (B, *D), got {shape!r}")
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ValueError(f"{name} must be (B, *D) with rank >= 2 and positive sizes, got {shape!r}")
    return tuple(shape)


def broadcast_time(t: Any, x: Tensor) -> Tensor:
    """Time as a `[B]` tensor on x's device and dtype.

    Accepts a Python number, a 0-d tensor (broadcast to the batch) or a `[B]` tensor.
    """
    batch = x.shape[0]
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.full((batch,), float(t), dtype=x.dtype, device=x.device)
    if not torch.is_tensor(t):
        raise TypeError(f"t must be a float or a tensor of shape [B], got {type(t).__name__}")
    t = t.to(device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        return t.expand(batch)
    if t.ndim == 1 and t.shape[0] == batch:
        return t
    if t.ndim == 1 and t.shape[0] == 1:
        return t.expand(batch)
    raise ValueError(
        f"t must be a scalar or have shape [B] = [{batch}], got shape {tuple(t.shape)}"
    )


def as_tensor(t: Any) -> Tensor:
    """A time given alone (no x): a float becomes a 0-d tensor of the default dtype."""
    if torch.is_tensor(t):
        return t if torch.is_floating_point(t) else t.to(torch.get_default_dtype())
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.tensor(float(t), dtype=torch.get_default_dtype())
    raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample `[B]` tensor to `[B, 1, ..., 1]` so it broadcasts against x."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def resolve_device_dtype(
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> tuple[torch.device, torch.dtype]:
    """Device defaults to the generator's (else CPU); dtype to torch's default."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return device, dtype


def check_finite_rows(name: str, x: Tensor, where: str = "") -> None:
    """Raise ValueError if x `[N, *D]` holds NaN or Inf, naming the first offending rows
    (`where` says which part of a larger source x is, e.g. " (batch 3 of the iterable)").

    One isfinite reduction and one host read of its result; the rows are only located on
    the failure path. Non-floating or empty tensors pass.
    """
    if not x.is_floating_point() or x.numel() == 0 or bool(torch.isfinite(x).all()):
        return
    rows = (~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)).nonzero().flatten()
    count, total = int(rows.numel()), x.shape[0]
    shown = ", ".join(str(int(r)) for r in rows[:5]) + (", ..." if count > 5 else "")
    raise ValueError(
        f"{name}{where} must be finite, but {count} of its {total} rows hold NaN or Inf "
        f"(rows {shown}): row {int(rows[0])} is the first ({count} of {total} rows); remove "
        "or impute them before training"
    )
