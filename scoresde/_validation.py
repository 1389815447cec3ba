"""Argument checks and small tensor helpers shared across scoresde (private).

Every public entry point validates its arguments here so that a user's mistake is a
`ValueError`/`TypeError` naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator
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


def check_device(name: str, device: Any) -> torch.device:
    """`device` (a torch.device, a string such as "cpu" / "cuda:1" / "mps", or an int, read
    as a CUDA index) as a torch.device that exists on this machine.

    Raises TypeError for another type and ValueError, naming the argument, for a string torch
    cannot parse or a CUDA / MPS device this machine lacks (instead of torch's bare error deep
    inside the first tensor op). Queries the backends only, no host sync: call it at API
    entry points, not in hot loops. `None` is the caller's to resolve.
    """
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(
                f"{name} must be a torch device such as 'cpu', 'cuda', 'cuda:1' or 'mps', "
                f"got {device!r}"
            ) from None
    elif isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise ValueError(f"{name} as an int is a CUDA device index >= 0, got {device!r}")
        dev = torch.device("cuda", device)
    else:
        raise TypeError(
            f"{name} must be a torch.device, a str such as 'cpu' or 'cuda:0', or an int "
            f"(a CUDA index), got {type(device).__name__} ({device!r})"
        )
    if dev.type == "cuda":
        _check_cuda(name, device, dev)
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"{name}={device!r} was requested but torch.backends.mps.is_available() is "
                f"False; use {name}='cpu'"
            )
        if dev.index not in (None, 0):
            raise ValueError(f"{name}={device!r} was requested but there is only one MPS device")
    return dev


def _check_cuda(name: str, device: Any, dev: torch.device) -> None:
    if not torch.cuda.is_available():
        raise ValueError(
            f"{name}={device!r} was requested but torch.cuda.is_available() is False; "
            f"use {name}='cpu'"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"{name}={device!r} was requested but this machine has {count} CUDA device(s) "
            f"(torch.cuda.device_count() is {count}); use an index in 0..{count - 1}"
        )


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
    else:
        device = check_device("device", device)
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


# --- the time range [0, T] of an SDE's public methods -------------------------------------
_TIMES_UNCHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "scoresde_times_unchecked", default=False
)


@contextlib.contextmanager
def unchecked_times() -> Iterator[None]:
    """Within this block `check_time` accepts any t: for internal code that evaluates a
    schedule's analytic continuation slightly past [0, T] on purpose (schedule inverses'
    round-off, grids from a log-SNR inverse, DDPM's discrete-time mapping)."""
    token = _TIMES_UNCHECKED.set(True)
    try:
        yield
    finally:
        _TIMES_UNCHECKED.reset(token)


def check_time(t: Any, T: float, name: str = "t") -> None:
    """Raise a ValueError naming `name`, the value and [0, T] if a time is outside [0, T].

    t = 0 is a hard bound (sub-VP's g and sigma, and VP's with beta_min = 0, are NaN at any
    t < 0); above T a relative round-off of 1e-6 (or 4 ulps of t's dtype) is accepted. A
    Python number is checked directly and a CPU tensor with one min/max reduction; a tensor
    on an accelerator is not checked (that would cost a host sync at every call), nor is
    anything while `unchecked_times()` is active or under torch.compile. A NaN time is an
    error too (a NaN index would otherwise become a finite, wrong DDPM coefficient).
    """
    if _TIMES_UNCHECKED.get():
        return
    if torch.is_tensor(t):
        if t.device.type != "cpu" or t.numel() == 0 or torch.compiler.is_compiling():
            return
        eps = torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0
        if t.numel() == 1:
            lo = hi = float(t)
        else:
            lo_t, hi_t = torch.aminmax(t.detach())
            lo, hi = float(lo_t), float(hi_t)
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        lo = hi = float(t)
        eps = 0.0
    else:
        return  # a type error is broadcast_time's / as_tensor's to report
    upper = T + T * max(1e-6, 4 * eps)
    if not (lo >= 0.0 and hi <= upper):  # a NaN fails both comparisons
        bad = hi if lo >= 0.0 else lo
        raise ValueError(f"{name} must be in [0, T] = [0, {T:g}], got {name}={bad!r}")
