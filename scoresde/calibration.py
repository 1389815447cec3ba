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
VERSION = 1
_MAX_BYTES = 1 << 22  # a few grids: kB; refuse anything absurd


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
        """The sampler this was tuned for, with the tuned grid."""
        from scoresde.samplers import SAMPLERS

        cls = SAMPLERS[self.sampler]
        return cls(sde, num_steps=self.num_steps, time_grid=self.grid(), **self.settings)

    def describe(self) -> str:
        """One line: what it is and what it cost."""
        opts = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return (
            f"calibrated {self.sampler} grid ({self.num_steps} steps, {opts}; pilot RMS error "
            f"{self.initial_error:.3g} -> {self.pilot_error:.3g}; {self.nfe} NFE on "
            f"{self.num_pilot} pilots)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Validated; raises ValueError naming the bad entry."""
        if not isinstance(data, dict):
            raise ValueError(f"a calibration must be a JSON object, got {type(data).__name__}")
        names = {f for f in cls.__dataclass_fields__}
        missing = names - set(data) - {"seconds", "extra"}
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
        return cls(**{**data, "time_grid": [float(v) for v in grid]})


def calibrate(
    score_fn: ScoreFn,
    sampler: Any,
    *,
    data_shape: tuple[int, ...],
    num_pilot: int = 512,
    max_evals: int | None = None,
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
        num_pilot, max_evals, generator, device, dtype, reference_rtol: as in
            `optimize_time_grid` (pilots from a private generator seeded 1234 by default).
    """
    from scoresde.samplers.schedules import optimize_time_grid

    name, steps, settings = sampler_settings(sampler)
    if not isinstance(sampler.time_grid, str):
        raise ValueError("calibrate a sampler with a named time_grid (its default), not a tensor")
    count = {"nfe": 0}

    def counted(x: Tensor, t: Tensor) -> Tensor:
        count["nfe"] += 1
        return score_fn(x, t)

    from scoresde.samplers import SAMPLERS

    cls = SAMPLERS[name]
    sde = sampler.sde
    info: dict[str, Any] = {}

    def factory(grid: Tensor) -> Any:
        return cls(sde, num_steps=len(grid) - 1, time_grid=grid, **settings)

    start = time.perf_counter()
    with torch.no_grad():
        grid = optimize_time_grid(
            factory,
            counted,
            sde,
            steps,
            data_shape=tuple(data_shape),
            num_pilot=num_pilot,
            init=sampler.time_grid,
            eps=sampler.eps,
            max_evals=max_evals,
            generator=generator,
            device=device,
            dtype=dtype,
            reference_rtol=reference_rtol,
            info=info,
        )
    seconds = time.perf_counter() - start
    return Calibration(
        sampler=name,
        num_steps=steps,
        settings=settings,
        time_grid=grid.tolist(),
        base_grid=sampler.time_grid,
        sde=_plain(sde.config()),
        nfe=count["nfe"],
        num_pilot=int(num_pilot),
        pilot_error=info["error"],
        initial_error=info["initial_error"],
        seconds=seconds,
    )


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
    from scoresde.pretrained import _atomic_write

    data = {
        "format": FORMAT,
        "version": VERSION,
        "calibrations": [c.to_dict() for c in calibrations],
    }
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    file = Path(path)
    _atomic_write(file, lambda tmp: Path(tmp).write_text(text))


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
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}; this scoresde reads {VERSION}")
        entries = data.get("calibrations")
        if not isinstance(entries, list):
            raise ValueError("no list of calibrations")
        return [Calibration.from_dict(e) for e in entries]
    except (UnicodeDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{str(file)!r}: {err}") from err
