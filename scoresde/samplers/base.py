"""The shared sampling loop: every sampler is a `Sampler` subclass that implements
`_sample(ctx, x)` and draws everything it needs from the `SamplingContext`:

- `ctx.score(x, t)`: the user's score_fn, counted (one call on a batch = one NFE) and
  checked (its output must have x's shape); the result never shares memory with x (a
  score_fn that returns its input is copied), so a sampler may update either in place;
  `ctx.score.preload(times, x)` makes a grid's time tensors in one go (they are cached
  across runs: no Python-float -> tensor work in the loop);
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
from collections.abc import Iterator
from typing import Any

import torch

from scoresde._typing import Callback, ScoreFn, Tensor
from scoresde._validation import (
    NonFiniteError,
    broadcast_time,
    check_bool,
    check_data,
    check_finite,
    check_shape,
    resolve_device_dtype,
)
from scoresde.samplers.philox import PhiloxNormal
from scoresde.sdes import SDE

# Python-float times -> their [B] tensors, shared by every run in the process: a fixed-step
# loop asks for the same grid times at every run, and building a time tensor costs ~8 us
# (more than a whole update of a 10,000 x 2 state). Keyed by (t, B, device, dtype); each entry
# is a read-only expanded view and remembers the version counter of its storage, so a score_fn
# that writes into t in place (possible only at B = 1) invalidates it instead of corrupting
# later runs. Bounded: cleared when it grows past _MAX_TIMES entries.
_TIMES: dict[tuple[float, int, torch.device, torch.dtype], tuple[Tensor, int]] = {}
_MAX_TIMES = 8192
_TIMES_GENERATION = [0]  # bumped whenever _TIMES is cleared (see CountedScore.preload)


def _store_times(times: list[float], batch: int, device: torch.device, dtype: torch.dtype) -> None:
    """Make the [B] time tensors of `times` in one allocation (one host-to-device copy)."""
    if len(_TIMES) + len(times) > _MAX_TIMES:
        _TIMES.clear()
        _TIMES_GENERATION[0] += 1
    # Normal tensors even inside torch.inference_mode: a later run may differentiate through
    # the score (guidance), and inference tensors cannot be saved for backward.
    with torch.inference_mode(False):
        column = torch.tensor(times, dtype=dtype, device=device)[:, None]
        rows = column.expand(len(times), batch).unbind(0)
    for t, row in zip(times, rows, strict=True):
        _TIMES[(t, batch, device, dtype)] = (row, row._version)


class CountedScore:
    """Wraps a score_fn: broadcasts t, counts NFE, checks the output's shape and casts it to
    x's dtype (a score computed in float64 does not turn a float32 run into float64).

    A Python-float t becomes a cached read-only `[B]` tensor (see `_TIMES`); `preload` makes a
    whole grid's in one go."""

    def __init__(self, score_fn: ScoreFn) -> None:
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.score_fn = score_fn
        self.nfe = 0
        self.last_t: Any = None  # the time of the latest call, to name it in errors

    def preload(self, times: list[float], x: Tensor, memo: dict | None = None) -> None:
        """Make the `[B]` tensors of the Python-float `times` for batches like x in bulk
        (~1 us each instead of ~8 us one by one); cached ones are skipped.

        `memo`: a dict kept with `times` (e.g. in a cached plan) that records for which
        (B, device, dtype) they were made, so a repeated run skips the look-ups."""
        sig = (x.shape[0], x.device, x.dtype)
        if memo is not None and memo.get(sig) == _TIMES_GENERATION[0]:
            return
        missing = [t for t in dict.fromkeys(times) if (t, *sig) not in _TIMES]
        if missing:
            _store_times(missing, *sig)
        if memo is not None:
            if len(memo) >= 8:
                memo.clear()
            memo[sig] = _TIMES_GENERATION[0]

    def _time(self, t: Any, x: Tensor) -> Tensor:
        if type(t) is float:
            key = (t, x.shape[0], x.device, x.dtype)
            hit = _TIMES.get(key)
            if hit is None or hit[0]._version != hit[1]:
                _store_times([t], key[1], key[2], key[3])
                hit = _TIMES[key]
            return hit[0]
        return broadcast_time(t, x)

    def __call__(self, x: Tensor, t: Any) -> Tensor:
        out = self.score_fn(x, self._time(t, x))
        self.nfe += 1
        self.last_t = t
        if not torch.is_tensor(out) or out.shape != x.shape:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(
                f"score_fn must return a tensor shaped like x {tuple(x.shape)}, got {got}"
            )
        if out is x or (out._is_view() and out.data_ptr() == x.data_ptr()):
            # A score that hands back its input (or a view of it): the samplers update their
            # stage buffers (and the score) in place, so the score must not share x's memory.
            out = out.clone()
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


class PerSampleNoise(PhiloxNormal):
    """Counter-based Gaussian noise with one Philox-4x32-10 stream per sample
    (`scoresde.samplers.philox`): the value for sample i, draw number c and entry j is a
    function of (key, sample_offset + i, c, j) alone, so sample i's noise is the same
    whatever the batch size, the chunking of a run or the number of processes. The 64-bit
    key is one draw from the user's generator, so successive calls differ and the same
    seed repeats them.
    """

    def __init__(self, generator: torch.Generator | None, sample_offset: int = 0) -> None:
        base = PhiloxNormal.from_generator(generator, sample_offset)
        super().__init__(base.key, base.sample_offset)


# --- NaN guard -------------------------------------------------------------------------------


class NonFiniteGuard:
    """Detects NaN/Inf in a trajectory, amortised so the hot loop does not pay a reduction
    (and, on accelerators, a host sync) at every step.

    - On accelerators each step's sum goes to a device list that is inspected every
      `check_every` steps and at the end: the report names the exact first bad step.
    - On the CPU a reduction costs about as much as one update of the state (~2.5 us on
      10,000 x 2), so the state itself is summed every `check_every` steps and at the end.
      NaN/Inf persist in every sampler's update (each step is a combination of the previous
      state with a nonzero weight), so the report names the step where it was caught and the
      last step known to be finite: the first bad step lies in between. With a callback
      (which may replace the state) every step is checked, and so is the exact step.
    """

    def __init__(
        self, device: torch.device, check_every: int | None = None, every_step: bool = False
    ) -> None:
        self.immediate = device.type == "cpu"
        self.check_every = 1 if every_step else (check_every or (8 if self.immediate else 32))
        self._pending: list[tuple[int, Any, Tensor]] = []
        self._last: tuple[int, Any, Tensor] | None = None  # CPU: latest unchecked state
        self._since = 0
        self._finite_at: tuple[int, Any] | None = None  # CPU: last step known to be finite

    def __call__(self, step: int, t: Any, x: Tensor) -> None:
        if self.immediate:
            self._last = (step, t, x)
            self._since += 1
            if self._since >= self.check_every:
                self.flush()
            return
        # NaN/Inf anywhere (or overflow) makes the sum non-finite; no sync here.
        self._pending.append((step, t, x.sum()))
        if len(self._pending) >= self.check_every:
            self.flush()

    def flush(self) -> None:
        if self._last is not None:
            step, t, x = self._last
            self._last, self._since = None, 0
            if not math.isfinite(float(x.sum())):
                self._raise(step, t, self._finite_at)
            self._finite_at = (step, t)
        if not self._pending:
            return
        finite = torch.isfinite(torch.stack([s for _, _, s in self._pending])).tolist()
        pending, self._pending = self._pending, []
        for (step, t, _), ok in zip(pending, finite, strict=True):
            if not ok:
                self._raise(step, t)

    @classmethod
    def _raise(cls, step: int, t: Any, finite_at: tuple[int, Any] | None = None) -> None:
        where = f"after step {step} ({_describe_time(t)})"
        if finite_at is not None and finite_at[0] < step - 1:
            where += (
                f"; the state was finite after step {finite_at[0]} "
                f"({_describe_time(finite_at[1])}), "
                f"so they first appeared between step {finite_at[0] + 1} and step {step}"
            )
        elif finite_at is None and step > 0:
            where += f"; they first appeared between step 0 and step {step}"
        raise NonFiniteError(
            f"non-finite values (NaN/Inf) in the trajectory {where}; "
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
    # A finite sum proves every entry finite (one cheap reduction); only a non-finite sum
    # (NaN/Inf, or finite entries whose sum overflows) needs the exact elementwise test.
    if math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all()):
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
        sample_offset: int = 0,
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
            batch_invariant: per-sample noise streams (Philox-4x32-10, a 64-bit key drawn
                from `generator`), so sample i is the same in a batch of 10 or 10,000 (for the
                same generator seed).
            sample_offset: with batch_invariant, the global index of this batch's first
                sample: a run split into chunks (or over processes) that gives each chunk a
                fresh generator with the same seed and its offset reproduces the one-batch
                run exactly (see `scoresde.distributed.sample`).
        """
        score = CountedScore(score_fn)
        batch_invariant = check_bool("batch_invariant", batch_invariant)
        if x_init is not None:
            check_finite("x_init", check_data("x_init", x_init))
            _check_shape_matches(shape, x_init)
            shape = tuple(x_init.shape)
            device, dtype = x_init.device, x_init.dtype
        shape = check_shape(shape)
        device, dtype = resolve_device_dtype(generator, device, dtype)
        if not isinstance(sample_offset, int) or isinstance(sample_offset, bool):
            raise TypeError(f"sample_offset must be an int, got {type(sample_offset).__name__}")
        if sample_offset and not batch_invariant:
            raise ValueError(
                f"sample_offset={sample_offset} needs batch_invariant=True (per-sample noise)"
            )
        noise: GeneratorNoise | PerSampleNoise
        if batch_invariant:
            noise = PerSampleNoise(generator, sample_offset)
        else:
            noise = GeneratorNoise(generator)
        if x_init is None:
            x = noise.randn(shape, device, dtype) * self.sde.prior_std
        else:
            x = x_init.detach().clone()
        guard = NonFiniteGuard(torch.device(device), every_step=callback is not None)
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
            f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and "nfe" not in k
        )
        return f"{type(self).__name__}({fields})"
