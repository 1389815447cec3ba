"""Tuned time grids ("Align Your Steps"-style, `optimize_time_grid`) against the default grid.

Writes benchmarks/results/schedules.{json,md,png}. Run: `python benchmarks/schedules.py`
(no arguments; about 25 minutes on one CPU thread).

Setup: VP SDE (DDPM's linear schedule), exact mixture scores, float64, end time eps = 1e-3.
Grids are tuned on 1024 pilot x_T drawn with seed 1234 (reference: dopri5 rtol 1e-7) and
evaluated on 10,000 fresh x_T drawn with seed 0 (reference: dopri5 rtol 1e-9): the error is
the RMS over samples of ||x - x_ref||, as in PEERS.md. The median per-sample error is given
too, because the RMS of a tuned grid is dominated by the few samples near a boundary between
modes, where the flow separates trajectories.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from scoresde import VPSDE, DPMSolverSampler
from scoresde.samplers.grids import time_grid
from scoresde.samplers.schedules import optimize_time_grid, pf_ode_reference
from scoresde.toy import benchmark_mixture_2d, eight_gaussians, random_mixture

OUT = Path(__file__).parent / "results"
STEPS = (5, 10, 20, 50)
CONFIGS = ((3, True), (2, True), (3, False), (2, False))  # (order, corrector)
NUM_PILOT, PILOT_SEED, EVAL_SEED, NUM_EVAL = 1024, 1234, 0, 10_000
MAX_EVALS = 1500
TARGETS = {
    "benchmark_mixture_2d": benchmark_mixture_2d,
    "eight_gaussians": eight_gaussians,
    "random_mixture(16)": lambda: random_mixture(16),
}
GENERAL_STEPS = (5, 10, 20)


def factory(sde, order: int, corrector: bool):
    return lambda g: DPMSolverSampler(
        sde, len(g) - 1, order=order, corrector=corrector, time_grid=g
    )


def errors(sampler, score, x_T, x_ref) -> dict[str, float]:
    x = sampler.sample(score, tuple(x_T.shape), x_init=x_T)
    e = (x - x_ref).reshape(x.shape[0], -1).norm(dim=1)
    return {"rms": float(e.pow(2).mean().sqrt()), "median": float(e.median())}


class Target:
    """A mixture with its exact score, evaluation draws and their reference solutions."""

    def __init__(self, name: str, sde) -> None:
        self.name, self.sde = name, sde
        self.mixture = TARGETS[name]()
        self.score = self.mixture.score_fn(sde)
        g = torch.Generator().manual_seed(EVAL_SEED)
        shape = (NUM_EVAL, self.mixture.dim)
        self.x_T = sde.prior_sampling(shape, generator=g, dtype=torch.float64)
        self.x_ref = pf_ode_reference(sde, self.score, self.x_T, 1e-3, rtol=1e-9)

    def tune(self, steps: int, order: int, corrector: bool) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        grid = optimize_time_grid(
            factory(self.sde, order, corrector),
            self.score,
            self.sde,
            steps,
            data_shape=(self.mixture.dim,),
            num_pilot=NUM_PILOT,
            generator=torch.Generator().manual_seed(PILOT_SEED),
            max_evals=MAX_EVALS,
        )
        return grid, time.perf_counter() - start

    def evaluate(self, grid, order: int, corrector: bool) -> dict[str, float]:
        sampler = factory(self.sde, order, corrector)(grid)
        return errors(sampler, self.score, self.x_T, self.x_ref)


def main() -> None:
    torch.set_num_threads(1)
    sde = VPSDE()
    bench = Target("benchmark_mixture_2d", sde)
    rows, tuned_on_bench = [], {}
    for order, corrector in CONFIGS:
        for steps in STEPS:
            default = bench.evaluate(time_grid(sde, steps, "quadratic"), order, corrector)
            grid, secs = bench.tune(steps, order, corrector)
            tuned = bench.evaluate(grid, order, corrector)
            tuned_on_bench[(order, corrector, steps)] = grid
            rows.append(
                {
                    "order": order,
                    "corrector": corrector,
                    "nfe": steps,
                    "default": default,
                    "tuned": tuned,
                    "tune_seconds": secs,
                    "grid": grid.tolist(),
                }
            )
            print(rows[-1]["order"], corrector, steps, default, tuned, f"{secs:.1f}s", flush=True)
    transfer = []
    for name in ("eight_gaussians", "random_mixture(16)"):
        target = Target(name, sde)
        for steps in GENERAL_STEPS:
            default = target.evaluate(time_grid(sde, steps, "quadratic"), 3, True)
            borrowed = target.evaluate(tuned_on_bench[(3, True, steps)], 3, True)
            grid, secs = target.tune(steps, 3, True)
            own = target.evaluate(grid, 3, True)
            transfer.append(
                {
                    "target": name,
                    "nfe": steps,
                    "default": default,
                    "bench_grid": borrowed,
                    "own_grid": own,
                    "tune_seconds": secs,
                    "grid": grid.tolist(),
                }
            )
            print(name, steps, default, borrowed, own, f"{secs:.1f}s", flush=True)
    results = {"setup": __doc__, "rows": rows, "transfer": transfer}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "schedules.json").write_text(json.dumps(results, indent=1) + "\n")
    (OUT / "schedules.md").write_text(markdown(results))
    plot(results, OUT / "schedules.png")


def markdown(results: dict) -> str:
    out = [
        "# Benchmark: tuned time grids (`optimize_time_grid`)",
        "",
        "Command: `python benchmarks/schedules.py` (the script's docstring gives the setup).",
        f"DPMSolverSampler on benchmark_mixture_2d, VP SDE, exact score, float64, eps = 1e-3; "
        f"tuned on {NUM_PILOT} pilots (seed {PILOT_SEED}, at most {MAX_EVALS} Nelder-Mead "
        f"evaluations), evaluated on {NUM_EVAL:,} fresh x_T (seed {EVAL_SEED}). Error: RMS of "
        "||x - x_ref|| over samples (median per-sample error in brackets). Default grid: "
        '"quadratic". Tuning time: wall seconds on one CPU thread, the pilots\' reference '
        "solve included.",
        "",
        "| order | corrector | NFE | default grid | tuned grid | tuning time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        d, t = r["default"], r["tuned"]
        out.append(
            f"| {r['order']} | {'yes' if r['corrector'] else 'no'} | {r['nfe']} | "
            f"{_err(d)} | {_err(t)} | "
            f"{r['tune_seconds']:.0f} |"
        )
    worse = [
        f"order {r['order']} {'with' if r['corrector'] else 'without'} corrector at {r['nfe']} NFE"
        for r in results["rows"]
        if r["tuned"]["rms"] > r["default"]["rms"]
    ]
    out += [
        "",
        "Held-out RMS worse with the tuned grid than with the default: "
        + (", ".join(worse) if worse else "none")
        + ".",
    ]
    out += [
        "",
        "## Transfer to other targets (order 3 + corrector)",
        "",
        "| target | NFE | default grid | grid tuned on benchmark_mixture_2d | grid tuned on the "
        "target | tuning time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["transfer"]:
        cells = [_err(r[k]) for k in ("default", "bench_grid", "own_grid")]
        out.append(
            f"| {r['target']} | {r['nfe']} | " + " | ".join(cells) + f" | {r['tune_seconds']:.0f} |"
        )
    for key, what in (("bench_grid", "the borrowed grid"), ("own_grid", "the target's own grid")):
        worse = [
            f"{r['target']} at {r['nfe']} NFE"
            for r in results["transfer"]
            if r[key]["rms"] > r["default"]["rms"]
        ]
        out += ["", f"Worse than the default with {what}: " + (", ".join(worse) or "none") + "."]
    return "\n".join(out) + "\n"


def _err(e: dict[str, float]) -> str:
    """RMS (median) to 3 significant digits."""
    return f"{e['rms']:.3g} ({e['median']:.3g})"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for order, corrector in CONFIGS:
        rows = [r for r in results["rows"] if (r["order"], r["corrector"]) == (order, corrector)]
        nfe = [r["nfe"] for r in rows]
        label = f"order {order}{' + corrector' if corrector else ''}"
        (line,) = ax.plot(
            nfe, [r["default"]["rms"] for r in rows], "--o", label=f"{label}, default"
        )
        ax.plot(
            nfe,
            [r["tuned"]["rms"] for r in rows],
            "-s",
            color=line.get_color(),
            label=f"{label}, tuned",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="NFE",
        ylabel="held-out RMS pathwise error",
        title="DPMSolverSampler: quadratic vs tuned grid",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
