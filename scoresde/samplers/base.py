"""The shared sampling loop: every sampler is a `Sampler` subclass that implements
`_sample(ctx, x)` and draws everything it needs from the `SamplingContext`:

- `ctx.score(x, t)`: the user's score_fn, counted (one call on a batch = one NFE) and
  checked (its output must have x's shape);
- `ctx.randn_like(x)`: Gaussian noise, from the user's generator or, with
  `batch_invariant=True`, from per-sample streams (sample i does not depend on the batch);
- `ctx.steps(n)`: the step indices, with a progress bar when asked;
- `ctx.after_step(i, t, x)`: NaN/Inf detection (reported with the step and time) and the
  user's `callback(step, t, x)`, which may return a replacement x (used for inpainting).

A fixed-step sampler is then a short loop (see `ddim.py`), and adaptive samplers reuse the
same pieces with their own step-size controller.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from scoresde._validation import (
    broadcast_time,
    check_bool,
    check_data,
    check_shape,
    resolve_device_dtype,
)
from scoresde.sdes import SDE

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, float, Tensor], "Tensor | None"]


class NonFiniteError(FloatingPointError):
    """A trajectory produced NaN or Inf; the message names the step and time."""


class CountedScore:
    """Wraps a score_fn: broadcasts t, counts NFE, checks the output's shape and casts it to
    x's dtype (a score computed in float64 does not turn a float32 run into float64)."""

    def __init__(self, score_fn: ScoreFn) -> None:
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.score_fn = score_fn
        self.nfe = 0
        self.last_t: Any = None  # the time of the latest call, to name it in errors

    def __call__(self, x: Tensor, t: Any) -> Tensor:
        out = self.score_fn(x, broadcast_time(t, x))
        self.nfe += 1
        self.last_t = t
        if not torch.is_tensor(out) or out.shape != x.shape:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(
                f"score_fn must return a tensor shaped like x {tuple(x.shape)}, got {got}"
            )
        if out.dtype != x.dtype:  # e.g. a float64 score in a float32 run: the run keeps x's
            if not out.is_floating_point():
                raise TypeError(f"score_fn must return a floating tensor, got dtype {out.dtype}")
            out = out.to(x.dtype)
        return out


# --- noise -----------------------------------------------------------------------------------


class GeneratorNoise:
    """Noise from one torch.Generator (or torch's global RNG when generator is None)."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    def randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=device, dtype=dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(tuple(x.shape), x.device, x.dtype)


_MASK32 = (1 << 32) - 1


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values
    < 2^32. The multipliers are < 2^31, so no product overflows int64."""
    for mult in (0x2C1B3C6D, 0x297A2D39, 0x5BD1E995):
        h = h ^ (h >> 16)
        h = (h * mult) & _MASK32
    return h ^ (h >> 15)


class PerSampleNoise:
    """Counter-based Gaussian noise with one stream per sample.

    The value for sample i, draw number c and element j is a hash of (base seed, i, c, j)
    pushed through Box–Muller, so sample i's noise is the same whatever the batch size.
    The base seed is one draw from the user's generator, so successive calls differ.
    """

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        self.base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_device))
        self.counter = 0
        self._index_cache: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}

    def _indices(self, shape: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (shape, device)
        if key not in self._index_cache:
            b, d = shape[0], math.prod(shape[1:])
            sample = torch.arange(b, device=device, dtype=torch.int64)[:, None]
            element = torch.arange(d, device=device, dtype=torch.int64)[None, :]
            # Pre-hashed per-sample and per-element keys, reused by every draw.
            self._index_cache[key] = (
                _mix32((sample * 0x3C6EF372 + self.base) & _MASK32),
                _mix32((element * 0x1B873593 + 0x2545F491) & _MASK32),
            )
        return self._index_cache[key]

    def randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        sample_key, element_key = self._indices(shape, device)
        draw = _mix32(torch.tensor(self.counter * 0x61C88647 + 0x9E3779B9, device=device) & _MASK32)
        self.counter += 1
        h1 = _mix32(sample_key ^ element_key ^ draw)
        h2 = _mix32(h1 ^ 0x68E31DA4)
        # Uniforms in (0, 1] and [0, 1) from 32 random bits each; Box–Muller.
        u1 = (h1.to(torch.float64) + 1.0) / 4294967296.0
        u2 = h2.to(torch.float64) / 4294967296.0
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return z.to(dtype).reshape(shape)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(tuple(x.shape), x.device, x.dtype)


# --- NaN guard -------------------------------------------------------------------------------


class NonFiniteGuard:
    """Detects NaN/Inf in a trajectory from one reduction per step.

    On the CPU the check is immediate (no device to sync with). On accelerators the per-step
    sums go to a device buffer and are inspected every `check_every` steps and at the end,
    so the hot loop does not wait on the device at every step.
    """

    def __init__(self, device: torch.device, check_every: int | None = None) -> None:
        self.immediate = device.type == "cpu"
        self.check_every = check_every or 32
        self._pending: list[tuple[int, float, Tensor]] = []

    def __call__(self, step: int, t: float, x: Tensor) -> None:
        total = x.sum()  # NaN/Inf anywhere (or overflow) makes the sum non-finite
        if self.immediate:
            if not math.isfinite(float(total)):
                self._raise(step, t)
            return
        self._pending.append((step, t, total))
        if len(self._pending) >= self.check_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        finite = torch.isfinite(torch.stack([s for _, _, s in self._pending])).tolist()
        pending, self._pending = self._pending, []
        for (step, t, _), ok in zip(pending, finite, strict=True):
            if not ok:
                self._raise(step, t)

    @staticmethod
    def _raise(step: int, t: Any) -> None:
        when = _describe_time(t)
        raise NonFiniteError(
            f"non-finite values (NaN/Inf) in the trajectory after step {step} ({when}); "
            "check the score function, the step count or the time grid"
        )


def _describe_time(t: Any) -> str:
    """ "t = 0.5" for one time, "t in [a, b]" for per-sample times (adaptive samplers)."""
    if torch.is_tensor(t) and t.numel() > 1:
        return f"t in [{float(t.min()):.6g}, {float(t.max()):.6g}]"
    return f"t = {float(t):.6g}"


def check_returned_samples(x: Tensor, ctx: SamplingContext) -> None:
    """Raise NonFiniteError if the samples a sampler returns hold NaN/Inf.

    The per-step guard sees the state after every step of the loop, but not what happens
    after the last one (a final denoising step, the adaptive sampler's Tweedie step, a
    callback's replacement): this catches those, naming the last step and the time of the
    last score evaluation. One reduction and one sync per run, after the loop.
    """
    if bool(torch.isfinite(x).all()):
        return
    last = ctx.last_step
    after = "before the first step" if last is None else f"after step {last}"
    when = "" if ctx.score.last_t is None else f", at {_describe_time(ctx.score.last_t)}"
    raise NonFiniteError(
        f"non-finite values (NaN/Inf) in the returned samples, from the final step {after} "
        f"(the last score evaluation{when}: e.g. the denoising step); check the score "
        "function near the end time"
    )


# --- the context and the base class ----------------------------------------------------------


class SamplingContext:
    """What a sampler's `_sample` needs for one run (see the module docstring)."""

    def __init__(
        self,
        score: CountedScore,
        noise: GeneratorNoise | PerSampleNoise,
        guard: NonFiniteGuard,
        callback: Callback | None,
        progress: bool,
        desc: str,
    ) -> None:
        self.score = score
        self.noise = noise
        self.guard = guard
        self.callback = callback
        self.progress = progress
        self.desc = desc
        self.last_step: int | None = None  # the latest step seen by after_step
        self.batch_invariant = False  # whether the run promised batch-invariant samples
        self._bar: Any = None

    def randn_like(self, x: Tensor) -> Tensor:
        return self.noise.randn_like(x)

    def steps(self, n: int) -> Iterator[int]:
        """range(n), with a tqdm bar when progress was asked for."""
        if not self.progress:
            yield from range(n)
            return
        from tqdm.auto import tqdm

        with tqdm(total=n, desc=self.desc, leave=False) as bar:
            self._bar = bar
            for i in range(n):
                yield i
                bar.update(1)
                bar.set_postfix(nfe=self.score.nfe, refresh=False)
            self._bar = None

    def after_step(self, step: int, t: float, x: Tensor) -> Tensor:
        """NaN check, then the user's callback (which may return a replacement x)."""
        self.last_step = step
        self.guard(step, t, x)
        if self.callback is not None:
            out = self.callback(step, t, x)
            if out is not None:
                if not torch.is_tensor(out) or out.shape != x.shape:
                    raise ValueError("callback must return None or a tensor shaped like x")
                x = out
        return x


def _check_shape_matches(shape: Any, x_init: Tensor) -> None:
    """A real sample shape given next to x_init must be x_init's: sampling x_init.shape[0]
    samples when the caller asked for another number would be a silent surprise. None and
    placeholders that are no sample shape (e.g. `(0,)`) defer to x_init."""
    if shape is None:
        return
    try:
        wanted = check_shape(shape)
    except (TypeError, ValueError):
        return
    if wanted != tuple(x_init.shape):
        raise ValueError(
            f"shape {wanted} disagrees with x_init's shape {tuple(x_init.shape)}; pass "
            "shape=x_init.shape (or shape=None) to start from x_init"
        )


class Sampler(abc.ABC):
    """Base class: validation, the prior draw, noise, NFE accounting and the run context.

    After `sample`, `self.nfe` holds the number of score evaluations of that run (every
    call counts: correctors, final denoising steps, rejected adaptive steps).
    """

    def __init__(self, sde: SDE) -> None:
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a scoresde SDE, got {type(sde).__name__}")
        self.sde = sde
        self.nfe = 0

    @abc.abstractmethod
    def _sample(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        """Integrate from x at t = T (`[B, *D]`) to the data end; return the samples."""

    def sample(
        self,
        score_fn: ScoreFn,
        shape: tuple[int, ...] | None,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        x_init: Tensor | None = None,
        progress: bool = False,
        callback: Callback | None = None,
        batch_invariant: bool = False,
    ) -> Tensor:
        """Draw samples `shape` = `(B, *D)`.

        Args:
            score_fn: s(x `[B, *D]`, t `[B]`) -> `[B, *D]`, an estimate of grad log p_t.
            shape: `(B, *D)`. With x_init it must equal x_init's shape, or be None (or a
                placeholder that is no sample shape, such as `(0,)`) to take x_init's.
            generator: the only source of randomness; same seed -> bit-identical output.
            device, dtype: where to sample (default: the generator's device, float32).
            x_init: start from this x_T `[B, *D]` instead of a prior draw (its device and
                dtype then win).
            progress: show a progress bar.
            callback: `callback(step, t, x)` after every step; may return a replacement x.
            batch_invariant: per-sample noise streams, so sample i is the same in a batch of
                10 or 10,000 (for the same generator seed).
        """
        score = CountedScore(score_fn)
        batch_invariant = check_bool("batch_invariant", batch_invariant)
        if x_init is not None:
            check_data("x_init", x_init)
            _check_shape_matches(shape, x_init)
            shape = tuple(x_init.shape)
            device, dtype = x_init.device, x_init.dtype
        shape = check_shape(shape)
        device, dtype = resolve_device_dtype(generator, device, dtype)
        noise: GeneratorNoise | PerSampleNoise
        if batch_invariant:
            noise = PerSampleNoise(generator, device)
        else:
            noise = GeneratorNoise(generator)
        if x_init is None:
            x = noise.randn(shape, device, dtype) * self.sde.prior_std
        else:
            x = x_init.detach().clone()
        guard = NonFiniteGuard(device)
        ctx = SamplingContext(score, noise, guard, callback, progress, type(self).__name__)
        ctx.batch_invariant = batch_invariant
        try:
            with torch.no_grad():
                x = self._sample(ctx, x)
            guard.flush()
            check_returned_samples(x, ctx)
        finally:
            self.nfe = score.nfe
        return x

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "nfe"
        )
        return f"{type(self).__name__}({fields})"
