"""When should `calibrate(method="ems")` keep DPM-Solver-v3? Its pilot errors against its
test pilots, judged on fresh paths, on targets no rule was chosen on.

Usage: python benchmarks/ems_keep.py [--n 10000] [--out benchmarks/results]
Writes ems_keep.{json,md} (about 30 minutes on one CPU thread).

`calibrate(DPMSolverSampler(sde, 10), method="ems")` (pilots seed 1) tunes DPM-Solver++'s grid,
measures v3's statistics and searches v3's own grid on the same pilots. Pilot rule (round 8):
keep v3 if its error on those pilots is the lower. Test rule (`calibrate` now): keep it if its
RMS error on 16,384 further test pilots is the lower; for comparison, the bespoke fit's
stricter rule (paired gain z > 2 on them). Truth: RMS error of the tuned grid and of v3 (kept
or not, `extra["rejected_ems"]`) on n other paths (seed 0) against tight solves, with a 95 %
paired-bootstrap interval of grid / v3. The cases: acceptance.py's targets and trained
networks (chosen for the bespoke fit's rule; "few pilots": the grid searched on 192 pilots,
statistics on 96), and four more made up for this benchmark before anything was measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import acceptance  # noqa: E402
import few_step  # noqa: E402

from scoresde import DPMSolverSampler  # noqa: E402
from scoresde.calibration import calibrate  # noqa: E402
from scoresde.samplers.ems import EMSSampler  # noqa: E402

# acceptance.py's mixtures (its 384-pilot fits become few pilots here), then new ones.
CASES = [(label.replace("384", "few"), kind, spec, "few" if pilots == 384 else "default")
         for label, kind, spec, pilots in acceptance.CASES]  # fmt: skip
CASES += [
    ("mix10d (new)", "vp", dict(seed=1010, k=12, d=10, condition=None), "default"),
    ("ve aniso16d (new)", "ve", dict(seed=1616, k=4, d=16, condition=300.0), "default"),
    ("subvp mix20d (new)", "subvp", dict(seed=2020, k=7, d=20, condition=None), "default"),
    ("aniso48d (new)", "vp", dict(seed=4848, k=3, d=48, condition=1000.0), "default"),
]
PILOTS = {
    "default": dict(num_pilot=2048, ems_pilots=1024),
    "few": dict(num_pilot=192, ems_pilots=96),
}


def judge(label: str, score, sde, dim: int, z, ref, pilots: str) -> dict:
    """Calibrate with method="ems", then measure the tuned grid and v3 on the paths z -> ref."""
    cal = calibrate(score, DPMSolverSampler(sde, 10), data_shape=(dim,), method="ems",
                    max_evals=150, generator=torch.Generator().manual_seed(1),
                    **PILOTS[pilots])  # fmt: skip
    ex = cal.extra
    tuned = torch.tensor(ex["tuned_grid"], dtype=torch.float64)
    samplers = dict(grid=DPMSolverSampler(sde, 10, time_grid=tuned))
    samplers["v3"] = EMSSampler(sde, **(cal.ems or ex["rejected_ems"]))
    with torch.no_grad():
        err = {k: few_step.path_errors(s.sample(score, (0,), x_init=z), ref)
               for k, s in samplers.items()}  # fmt: skip
    rms = {k: float(e.square().mean().sqrt()) for k, e in err.items()}
    keeps = dict(
        pilot=ex["ems_error"] < ex["grid_error"],
        test=ex["test_error"] < ex["test_initial_error"],
        test_z2=ex["test_error"] < ex["test_initial_error"] and ex["test_gain_z"] > 2,
    )
    assert keeps["test"] == (cal.ems is not None)
    row = dict(target=label, sde=sde.config()["name"], pilots=pilots, keeps=keeps,
               pilot_errors=[ex["grid_error"], ex["ems_error"]],
               test_errors=[ex["test_initial_error"], ex["test_error"]],
               test_z=ex["test_gain_z"], nfe=cal.nfe, seconds=cal.seconds,
               grid_err=rms["grid"], v3_err=rms["v3"], grid_median=float(err["grid"].median()),
               v3_median=float(err["v3"].median()),
               ratio_ci=few_step.ratio_interval(err["grid"], err["v3"]))  # fmt: skip
    print(row, flush=True)
    return row


RULES = {"pilot": "pilot rule (round 8)", "test": "test rule (calibrate)",
         "test_z2": "test rule with z > 2"}  # fmt: skip


def markdown(rows: list[dict], n: int) -> str:
    out = ["# Keeping DPM-Solver-v3: pilot errors against test pilots (benchmarks/ems_keep.py)",
           "", f"Command: `python benchmarks/ems_keep.py --n {n}`", "",
           "DPMSolverSampler(sde, 10), `calibrate(method=\"ems\")` (pilots of seed 1; few: "
           "`num_pilot=192, ems_pilots=96`). pilots / test pilots: RMS error of the tuned grid "
           "/ v3 on the 2,048 pilots both grid searches saw (the pilot rule keeps the lower) "
           "and on 16,384 further test pilots (the test rule keeps the lower; z: paired "
           f"per-path gain of v3 over its standard error). Fresh paths: {n} other draws, grid "
           "-> v3 RMS (median), and the 95 % paired-bootstrap interval of grid / v3. Verdict: "
           "right if a kept v3 is better there (interval above 1) or a rejected one is not; "
           "wrong (worse) if a kept one is worse (interval below 1); unclear if a kept one's "
           "interval spans 1.", "",
           "| target | SDE | pilots | pilots: grid / v3 | test pilots: grid / v3 (z) "
           "| fresh paths: grid -> v3 | grid / v3 | " + " | ".join(RULES.values()) + " |",
           "|---|---|---|---|---|---|---|" + "---|" * len(RULES)]  # fmt: skip

    def keep(flag: bool) -> str:
        return "keep" if flag else "reject"

    for r in rows:
        p, t, ci = r["pilot_errors"], r["test_errors"], r["ratio_ci"]
        rules = " | ".join(f"{keep(r['keeps'][k])}: {acceptance.verdict(r, r['keeps'][k])}"
                           for k in RULES)  # fmt: skip
        out.append(
            f"| {r['target']} | {r['sde']} | {r['pilots']} | {p[0]:.4f} / {p[1]:.4f} "
            f"| {t[0]:.4f} / {t[1]:.4f} ({r['test_z']:.1f}) "
            f"| {r['grid_err']:.4f} -> {r['v3_err']:.4f} ({r['grid_median']:.4f} -> "
            f"{r['v3_median']:.4f}) | {r['grid_err'] / r['v3_err']:.2f}x "
            f"({ci[0]:.2f}-{ci[1]:.2f}) | {rules} |"
        )
    out += ["", "Decisions against the fresh paths (right / wrong keeps / missed gains / unclear), "
            "and the mean fresh-path RMS of what each rule keeps, relative to always keeping "
            "the tuned grid:"]  # fmt: skip
    for key, name in RULES.items():
        v = [acceptance.verdict(r, r["keeps"][key]) for r in rows]
        count = [sum(x == w for x in v) for w in ("right", "wrong (worse)", "missed gain")]
        kept = [(r["v3_err"] if r["keeps"][key] else r["grid_err"]) / r["grid_err"] for r in rows]
        out.append(f"- {name}: {count[0]} / {count[1]} / {count[2]} / {len(v) - sum(count)}; "
                   f"{sum(kept) / len(kept):.3f}")  # fmt: skip
    best = [min(r["v3_err"], r["grid_err"]) / r["grid_err"] for r in rows]
    out.append(f"- the better of the two on the fresh paths (no rule can do better): "
               f"{sum(best) / len(best):.3f}")  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> None:
    acceptance.run_cases("ems_keep", CASES, judge, markdown, "default")


if __name__ == "__main__":
    main()
