"""A sampler calibration fitted once for one model and saved with it.

`optimize_time_grid` tunes a fixed-step ODE sampler's time grid for one model (on pilot draws
of x_T, against tight probability-flow ODE solves; see `scoresde.samplers.schedules`). That
costs a few thousand batched score evaluations, so it is done once and kept with the model:

    model = ScoreModel.from_pretrained("my-model")
    cal = model.calibrate(DPMSolverSampler(model.sde, 10))   # stored in model.calibrations
    model.save_pretrained("my-model")                         # + my-model/calibration.json
    ...
    model = ScoreModel.from_pretrained("my-model")           # model.calibrations restored
    sampler, cal = calibrated_sampler(model, DPMSolverSampler(model.sde, 10))

A `Calibration` records what it was tuned for - the sampler's registry name (`SAMPLERS`), its
step count and every other constructor setting (order, corrector, eps, ...), and the SDE's
config - with the grid, the NFE spent (score evaluations, each on the whole pilot batch), the
pilot count and the pilot errors before and after. It is used only for a sampler with exactly
those settings, the default time grid and the same SDE: a 10-step grid says nothing about 12
steps, and a grid tuned for order 3 is not the one for order 2.

Not saved in a Trainer's resumable checkpoint (`latest.pt`): resuming changes the weights a
calibration was fitted for. `Trainer.save_pretrained` exports the EMA model with whatever
calibrations it holds; calibrate the exported model.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from scoresde._typing import ScoreFn, Tensor

__all__ = [
    "Calibration",
    "CALIBRATION_NAME",
    "calibrate",
    "calibrated_sampler",
    "find_calibration",
    "save_calibrations",
    "load_calibrations",
]

CALIBRATION_NAME = "calibration.json"
FORMAT = "scoresde.calibration"
VERSION = 3  # 2 added `solver` (a fitted multistep solver), 3 `ems`; older files still load
_READABLE = (1, 2, 3)
# A few grids are kB; an `ems` plan holds ~13 vectors of the sample's size per step (8 MB for
# 10 steps of 3 x 32 x 32 images); refuse anything absurd.
_MAX_BYTES = 1 << 26
# A fitted solver replaces the tuned grid only if its gain on the test pilots (fresh draws the
# fit never saw, not even to pick its best iterate) is this many standard errors of the paired
# per-path improvement (heavy-tailed errors make a lower RMS alone luck).
_MIN_GAIN_Z = 2.0


def _registry_name(sampler: Any) -> str:
    from scoresde.samplers import SAMPLERS

    for name, cls in SAMPLERS.items():
        if type(sampler) is cls:
            return name
    raise TypeError(
        f"sampler must be one of the registered samplers {tuple(SAMPLERS)}, "
        f"got {type(sampler).__name__}"
    )


# Deterministic fixed-step samplers with a `time_grid`, and the settings that must hold for
# the pathwise error against the ODE to mean anything.
_DETERMINISTIC = {
    "dpm": lambda s: not s.stochastic,
    "ddim": lambda s: s.eta == 0.0,
}


def sampler_settings(sampler: Any) -> tuple[str, int, dict[str, Any]]:
    """(registry name, num_steps, the other constructor settings) of a calibratable sampler.

    Raises TypeError for an unregistered sampler, ValueError for one that is not a
    deterministic fixed-step sampler (calibratable: "dpm" without `stochastic`, "ddim" with
    eta = 0)."""
    name = _registry_name(sampler)
    if name not in _DETERMINISTIC or not _DETERMINISTIC[name](sampler):
        raise ValueError(
            f"only deterministic fixed-step samplers can be calibrated (DPMSolverSampler with "
            f"stochastic=False, DDIMSampler with eta=0), got {sampler!r}"
        )
    params = inspect.signature(type(sampler).__init__).parameters
    settings = {}
    for key in params:
        if key in ("self", "sde", "num_steps", "time_grid"):
            continue
        value = getattr(sampler, key)
        if not isinstance(value, (bool, int, float, str)) or value != value:
            raise ValueError(f"setting {key}={value!r} of {name} cannot be recorded")
        settings[key] = value
    return name, int(sampler.num_steps), settings


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples -> lists; floats round-trip exactly)."""
    return json.loads(json.dumps(value, allow_nan=False))


def same_config(a: Any, b: Any) -> bool:
    """Equal once both are written as JSON (so a loaded calibration equals a fresh one)."""
    return _plain(a) == _plain(b)


@dataclass(frozen=True)
class Calibration:
    """A time grid tuned for one model and one sampler configuration (see the module doc).

    sampler: registry name ("dpm", "ddim"); num_steps; settings: the sampler's other
    constructor arguments; time_grid: num_steps + 1 floats from T down to eps; base_grid:
    the sampler's own named grid it replaces and started from ("quadratic"); sde: the SDE's
    config; nfe: score evaluations spent (each on all num_pilot draws, the reference solve
    included); pilot_error / initial_error: RMS pathwise error on the pilots with the tuned /
    the sampler's own grid; seconds: wall time of the calibration.
    """

    sampler: str
    num_steps: int
    settings: dict[str, Any]
    time_grid: list[float]
    base_grid: str
    sde: dict[str, Any]
    nfe: int
    num_pilot: int
    pilot_error: float
    initial_error: float
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    solver: dict[str, Any] | None = None
    ems: dict[str, Any] | None = None

    def grid(self) -> Tensor:
        """The tuned grid `[num_steps + 1]` (float64, CPU)."""
        return torch.tensor(self.time_grid, dtype=torch.float64)

    def matches(self, sampler: Any) -> bool:
        """True if `sampler` is the configuration this was tuned for: same registry name,
        step count and settings, the named time grid it was tuned from (not a tensor), and
        the same SDE config."""
        try:
            name, steps, settings = sampler_settings(sampler)
        except (TypeError, ValueError):
            return False
        if sampler.time_grid != self.base_grid:
            return False  # another named grid, or the user's own tensor: never overridden
        cfg = sampler.sde.config()
        return (
            name == self.sampler
            and steps == self.num_steps
            and same_config(settings, self.settings)
            and same_config(cfg, self.sde)
        )

    def make_sampler(self, sde: Any) -> Any:
        """The sampler this was tuned for, with the tuned grid; or the fitted bespoke solver
        (a `LearnedMultistepSampler`) or DPM-Solver-v3 plan (an `EMSSampler`) if this
        calibration holds one (the same NFE)."""
        if self.ems is not None:
            from scoresde.samplers.ems import EMSSampler

            return EMSSampler(sde, **self.ems)
        if self.solver is not None:
            from scoresde.samplers.learned import LearnedMultistepSampler

            return LearnedMultistepSampler(sde, **self.solver)
        from scoresde.samplers import SAMPLERS

        cls = SAMPLERS[self.sampler]
        return cls(sde, num_steps=self.num_steps, time_grid=self.grid(), **self.settings)

    def describe(self) -> str:
        """One line: what it is and what it cost."""
        opts = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        if self.ems is not None:
            errors = (  # files of round 8 have no test pilots
                f"test pilot RMS error {self._extra('initial_error'):.3g} with the tuned grid "
                f"-> {self._extra('error'):.3g}"
                if "test_error" in self.extra
                else f"pilot RMS error {self.initial_error:.3g} -> {self.pilot_error:.3g}"
            )
            return (
                f"DPM-Solver-v3 (empirical model statistics) for {self.sampler} "
                f"({self.num_steps} steps, {opts}; {errors}; {self.nfe} NFE)"
            )
        if self.solver is not None:
            return (
                f"bespoke solver fitted from {self.sampler} ({self.num_steps} steps, {opts}; "
                f"test pilot RMS error {self._extra('initial_error'):.3g} with the tuned grid "
                f"-> {self._extra('error'):.3g}; "
                f"{self.nfe} NFE on {self.num_pilot} pilots)"
            )
        return (
            f"calibrated {self.sampler} grid ({self.num_steps} steps, {opts}; pilot RMS error "
            f"{self.initial_error:.3g} -> {self.pilot_error:.3g}; {self.nfe} NFE on "
            f"{self.num_pilot} pilots)"
        )

    def _extra(self, key: str) -> float:
        """The fit's test-pilot error `key` (the held-out one in files written before the
        test pilots existed)."""
        return self.extra.get(f"test_{key}", self.extra.get(f"solver_{key}", math.nan))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Validated; raises ValueError naming the bad entry."""
        if not isinstance(data, dict):
            raise ValueError(f"a calibration must be a JSON object, got {type(data).__name__}")
        names = {f for f in cls.__dataclass_fields__}
        missing = names - set(data) - {"seconds", "extra", "solver", "ems"}
        if missing or set(data) - names:
            raise ValueError(
                f"calibration entries must be {sorted(names)}, missing {sorted(missing)}, "
                f"unknown {sorted(set(data) - names)}"
            )
        grid = data["time_grid"]
        ok = isinstance(grid, list) and all(isinstance(v, (int, float)) for v in grid)
        if not ok or len(grid) != int(data["num_steps"]) + 1:
            raise ValueError(f"time_grid must be num_steps + 1 numbers, got {grid!r}")
        if not all(a > b for a, b in zip(grid, grid[1:], strict=False)):
            raise ValueError("time_grid must be strictly decreasing")
        if not isinstance(data["base_grid"], str):
            raise ValueError(f"base_grid must be a grid name, got {data['base_grid']!r}")
        if not isinstance(data["settings"], dict) or not isinstance(data["sde"], dict):
            raise ValueError("settings and sde must be JSON objects")
        solver = data.get("solver")
        if solver is not None:
            keys = {"times", "ratios", "weights", "eps"}
            if not isinstance(solver, dict) or set(solver) != keys:
                raise ValueError(f"solver must be a JSON object with entries {sorted(keys)}")
            n = len(solver["times"]) if isinstance(solver["times"], list) else -1
            if n != int(data["num_steps"]):
                raise ValueError(f"solver times must be num_steps numbers, got {solver['times']!r}")
        ems = data.get("ems")
        if ems is not None:
            keys = {"times", "linear", "predictor", "corrector"}
            if not isinstance(ems, dict) or set(ems) != keys:
                raise ValueError(f"ems must be a JSON object with entries {sorted(keys)}")
            if not isinstance(ems["times"], list) or len(ems["times"]) != len(grid):
                raise ValueError("ems times must be num_steps + 1 numbers")
        return cls(**{**data, "time_grid": [float(v) for v in grid]})


def calibrate(
    score_fn: ScoreFn,
    sampler: Any,
    *,
    data_shape: tuple[int, ...],
    method: str = "grid",
    num_pilot: int = 2048,
    max_evals: int | None = None,
    fit_pilots: int = 4096,
    fit_iterations: int = 800,
    fit_batch: int | None = None,
    test_pilots: int = 16384,
    ems_pilots: int = 1024,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    reference_rtol: float = 1e-7,
) -> Calibration:
    """Tune `sampler`'s time grid for `score_fn` with `optimize_time_grid` (initial grid: the
    sampler's own) and record it as a `Calibration`.

    Args:
        score_fn: the model, s(x `[B, *D]`, t `[B]`).
        sampler: a deterministic fixed-step sampler with its default time grid, e.g.
            `DPMSolverSampler(sde, 10)`; the calibration is for exactly its settings.
        data_shape: one sample's shape D.
        method: "grid" (the time grid only); "solver": the grid, then a bespoke multistep
            solver fitted on top of it (`scoresde.samplers.learned`: the evaluation times
            and all the solver's weights, by gradient descent through the sampler on
            `fit_pilots` draws, a quarter of them held out to pick the best iterate; kept only
            if it beats the grid on `test_pilots` further draws by over two standard errors
            of the paired per-path improvement); "ems": the grid, then DPM-Solver-v3
            (`scoresde.samplers.ems`: statistics on `ems_pilots` further pilot trajectories,
            its own grid by the same search on the same pilots; kept if its error on
            `test_pilots` further draws is the lower). The same NFE per sample; "dpm"
            samplers only (deterministic, no denoise); the score must be differentiable in x
            (and in t for "solver").
        num_pilot, max_evals, generator, device, dtype, reference_rtol: as in
            `optimize_time_grid` (pilots from a private generator seeded 1234 by default;
            with method="solver" the grid is tuned on the first `num_pilot` of the
            `fit_pilots` draws).
        fit_pilots, fit_iterations: pilots and Adam steps of the solver fit.
        fit_batch: training pilots per Adam step (drawn afresh each step; None: all): a
            cheaper step, a noisier fit. Its evaluations count in `nfe` (on fewer pilots).
        test_pilots: draws (after the fit's or the statistics', same generator) that decide
            whether the fitted solver or the v3 plan is kept: their reference solves and both
            samplers' runs count in `nfe`. Kept apart from the pilots that chose the grid or
            the iterate, which favour the candidate that overfit them more. A rejected
            candidate is recorded in `extra["rejected_solver"]` / `extra["rejected_ems"]`.
    """
    from scoresde._validation import check_choice, check_device
    from scoresde.samplers import SAMPLERS
    from scoresde.samplers.schedules import optimize_time_grid, pf_ode_reference

    name, steps, settings = sampler_settings(sampler)
    if not isinstance(sampler.time_grid, str):
        raise ValueError("calibrate a sampler with a named time_grid (its default), not a tensor")
    method = check_choice("method", method, ("grid", "solver", "ems"))
    device = None if device is None else check_device("device", device)
    fit = (fit_pilots, fit_iterations, fit_batch, test_pilots, ems_pilots)
    pilots = _method_pilots(method, name, sampler, data_shape, num_pilot, fit, generator,
                            device, dtype)  # fmt: skip
    counted, cls, sde, info = CountingFn(score_fn), SAMPLERS[name], sampler.sde, {}

    def factory(grid: Tensor) -> Any:
        return cls(sde, num_steps=len(grid) - 1, time_grid=grid, **settings)

    start = time.perf_counter()
    x_ref = None
    with torch.no_grad():
        if method == "solver":
            pilots, x_ref, test = _references(counted, sampler, pilots, fit_pilots, reference_rtol)
        elif method == "ems":  # the grid's pilots' references serve both grid searches
            x_ref = pf_ode_reference(sde, counted, pilots[:num_pilot], sampler.eps,
                                     rtol=reference_rtol)  # fmt: skip
        grid = optimize_time_grid(
            factory, counted, sde, steps, data_shape=tuple(data_shape),
            x_T=None if pilots is None else pilots[:num_pilot],
            x_ref=None if x_ref is None else x_ref[:num_pilot], num_pilot=num_pilot,
            init=sampler.time_grid, eps=sampler.eps, max_evals=max_evals, generator=generator,
            device=device, dtype=dtype, reference_rtol=reference_rtol, info=info,
        )  # fmt: skip
    solver, extra, ems = None, {}, None
    if method == "solver":
        solver, extra = _fit_solver(
            counted, factory(grid), pilots, x_ref, test, fit_iterations, fit_batch
        )
    elif method == "ems":
        from scoresde.samplers.ems import calibrate_plan

        parts = pilots.split([num_pilot, ems_pilots, test_pilots])
        grid, ems, extra = calibrate_plan(counted, sampler, factory(grid), info, parts, x_ref,
                                          max_evals, reference_rtol)  # fmt: skip
    seconds = time.perf_counter() - start
    return Calibration(
        sampler=name, num_steps=steps, settings=settings, time_grid=grid.tolist(),
        base_grid=sampler.time_grid, sde=_plain(sde.config()), nfe=counted.nfe,
        num_pilot=int(num_pilot), pilot_error=info["error"],
        initial_error=info["initial_error"], seconds=seconds, extra=extra, solver=solver, ems=ems,
    )  # fmt: skip


class CountingFn:
    """Wrap any score_fn(x, t) and count its batch calls (`nfe`): the calibration's count,
    and the benchmarks'."""

    def __init__(self, fn: ScoreFn) -> None:
        self.fn, self.nfe = fn, 0

    def __call__(self, x: Tensor, t: Any) -> Tensor:
        self.nfe += 1
        return self.fn(x, t)


def _method_pilots(
    method: str, name: str, sampler: Any, data_shape: tuple[int, ...], num_pilot: int,
    fit: tuple, generator: torch.Generator | None, device: Any, dtype: torch.dtype,
) -> Tensor | None:  # fmt: skip
    """The pilots drawn up front: for "solver" and "ems" (None for "grid": optimize_time_grid
    draws its own, the same ones)."""
    if method == "solver":
        return _solver_pilots(name, sampler, data_shape, num_pilot, *fit[:4], generator, device,
                              dtype)  # fmt: skip
    if method == "ems":
        from scoresde.samplers.ems import calibration_pilots

        return calibration_pilots(sampler, data_shape, num_pilot, fit[4], fit[3], generator,
                                  device, dtype)  # fmt: skip
    return None


def _solver_pilots(
    name: str,
    sampler: Any,
    data_shape: tuple[int, ...],
    num_pilot: int,
    fit_pilots: int,
    fit_iterations: int,
    fit_batch: int | None,
    test_pilots: int,
    generator: torch.Generator | None,
    device: Any,
    dtype: torch.dtype,
) -> Tensor:
    """The pilot draws of `calibrate(method="solver")` `[fit_pilots + test_pilots, *D]`: the
    fit's (the grid is tuned on the first `num_pilot`), then the test's; after checking the
    sampler and the fit's settings."""
    from scoresde._validation import check_positive_int

    if name != "dpm" or sampler.denoise:
        raise ValueError(
            f"method='solver' fits DPMSolverSampler (stochastic=False, denoise=False), got "
            f"{sampler!r}"
        )
    check_positive_int("fit_pilots", fit_pilots)
    check_positive_int("fit_iterations", fit_iterations)
    check_positive_int("test_pilots", test_pilots)
    if test_pilots < 2:
        raise ValueError(f"test_pilots={test_pilots} must be at least 2 (a paired test)")
    if fit_batch is not None:
        check_positive_int("fit_batch", fit_batch)
    if fit_pilots < 2 * num_pilot:
        raise ValueError(f"fit_pilots={fit_pilots} must be at least twice num_pilot={num_pilot}")
    return pilot_batches(sampler.sde, data_shape, (fit_pilots, test_pilots), generator, device,
                         dtype)  # fmt: skip


def pilot_batches(
    sde: Any, data_shape: tuple[int, ...], sizes: tuple[int, ...], generator: Any, device: Any,
    dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """Prior draws `[sum(sizes), *D]`, batch after batch from one generator (default: the
    private one seeded like `optimize_time_grid`'s, so the first batch is its pilots)."""
    from scoresde.samplers.schedules import PILOT_SEED, _pilots

    if generator is None:
        generator = torch.Generator(device=device or "cpu").manual_seed(PILOT_SEED)
    draw = [_pilots(sde, None, tuple(data_shape), n, generator, device, dtype) for n in sizes]
    return torch.cat(draw)


def _references(
    score: ScoreFn, sampler: Any, pilots: Tensor, fit_pilots: int, rtol: float
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """(the fit's pilots, their references, (the test pilots, their references)). One
    reference solve for the grid's and the fit's pilots, another for the test's: the adaptive
    solve's steps depend on its whole batch, and the fit is chaotic in its references, so
    solving them together would make the fit depend on `test_pilots`."""
    from scoresde.samplers.schedules import pf_ode_reference

    fit, test = pilots[:fit_pilots], pilots[fit_pilots:]
    ref = [pf_ode_reference(sampler.sde, score, x, sampler.eps, rtol=rtol) for x in (fit, test)]
    return fit, ref[0], (test, ref[1])


def _fit_solver(
    score: ScoreFn,
    sampler: Any,
    pilots: Tensor,
    x_ref: Tensor,
    test: tuple[Tensor, Tensor],
    iterations: int,
    batch: int | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the fitted solver's entries, or None if it does not beat `sampler` on the test pilots;
    the fit's record for `Calibration.extra`). x_ref: the pilots' reference solves; test:
    (x_T, reference) of the test pilots."""
    from scoresde.samplers.learned import LearnedMultistepSampler, _gain_z, fit_multistep, unrolled
    from scoresde.samplers.schedules import pathwise_sq_errors

    start = time.perf_counter()
    fitted, info = fit_multistep(
        score, sampler.sde, unrolled(sampler), pilots, x_ref, iterations=iterations,
        batch_size=batch,
    )  # fmt: skip
    extra = dict(
        fit_pilots=int(pilots.shape[0]),
        fit_iterations=int(iterations),
        fit_batch=None if batch is None else int(batch),
        fit_backward_passes=int(info["gradients"]) * int(sampler.num_steps),
        fit_seconds=time.perf_counter() - start,
        solver_initial_error=info["initial_error"],
        solver_error=info["error"],
    )
    extra["solver_gain_z"] = info["gain_z"]
    solver = dict(times=fitted.times, ratios=fitted.ratios, weights=fitted.weights, eps=fitted.eps)
    x_test, ref_test = test
    with torch.no_grad():
        sq = [
            pathwise_sq_errors(s, score, x_test, ref_test)
            for s in (sampler, LearnedMultistepSampler(sampler.sde, **solver))
        ]
    errors = [math.sqrt(float(v.mean())) for v in sq]
    moved = info["best_iteration"] >= 0
    extra.update(test_pilots=int(x_test.shape[0]), test_initial_error=errors[0])
    # Not moved: the candidate is the grid's solver (equal up to rounding), no gain at all.
    z = _gain_z(sq[0], sq[1], moved=True) if moved else 0.0
    extra.update(test_error=errors[1], test_gain_z=z)
    if not (moved and errors[1] < errors[0] and extra["test_gain_z"] > _MIN_GAIN_Z):
        extra["rejected_solver"] = solver
        return None, extra
    return solver, extra


def find_calibration(calibrations: Any, sampler: Any) -> Calibration | None:
    """The last calibration in `calibrations` that matches `sampler` (see
    `Calibration.matches`), or None."""
    for cal in reversed(list(calibrations or [])):
        if cal.matches(sampler):
            return cal
    return None


def calibrated_sampler(model: Any, sampler: Any) -> tuple[Any, Calibration | None]:
    """(`sampler` with the model's matching calibrated grid, that Calibration) or
    (`sampler`, None) when the model holds no calibration for exactly this configuration."""
    cal = find_calibration(getattr(model, "calibrations", None), sampler)
    sde = getattr(model, "sde", None)
    if cal is not None and sde is not None and not same_config(sde.config(), cal.sde):
        cal = None  # a sampler of another SDE than the model's
    return (sampler, None) if cal is None else (cal.make_sampler(sampler.sde), cal)


def save_calibrations(path: str | Path, calibrations: Any) -> None:
    """Write a list of `Calibration`s as JSON (floats round-trip exactly)."""
    from scoresde._atomic import atomic_write

    data = {
        "format": FORMAT,
        "version": VERSION,
        "calibrations": [c.to_dict() for c in calibrations],
    }
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    file = Path(path)
    atomic_write(file, lambda tmp: Path(tmp).write_text(text))


def load_calibrations(path: str | Path) -> list[Calibration]:
    """Read the list written by `save_calibrations` (raises CheckpointError if malformed)."""
    from scoresde.checkpoints import CheckpointError

    file = Path(path)
    if file.stat().st_size > _MAX_BYTES:
        raise CheckpointError(f"{str(file)!r} is too large to be a calibration file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a scoresde calibration file")
        if data.get("version") not in _READABLE:
            raise ValueError(
                f"version {data.get('version')!r}; this scoresde reads versions {_READABLE}"
            )
        entries = data.get("calibrations")
        if not isinstance(entries, list):
            raise ValueError("no list of calibrations")
        return [Calibration.from_dict(e) for e in entries]
    except (UnicodeDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{str(file)!r}: {err}") from err
