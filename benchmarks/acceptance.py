"""When is a bespoke solver fit kept? The held-out rule against the test-pilot rule, judged on
fresh paths, on targets that no other benchmark uses (chosen before measuring, none tuned on).

Usage: python benchmarks/acceptance.py [--n 10000] [--out benchmarks/results]
Writes acceptance.{json,md} (about 40 minutes on one CPU thread).

`calibrate(DPMSolverSampler(sde, 10), method="solver", fit_batch=512)` (pilots seed 1) fits a
candidate solver on the tuned grid. Old rule: keep it if it beats the grid on the fit's own
held-out pilots (which also chose its iterate) by z > 2 standard errors of the paired per-path
gain. Test rule (`calibrate`): the same test on 16,384 fresh test pilots (`test_pilots`), and,
to see the test's power, on the first 4,096 of them (the last round's default). Truth: RMS
error of the grid and of the candidate (kept or not, `extra["rejected_solver"]`) on n other paths
(seed 0) against tight solves, with a 95 % paired-bootstrap interval of grid / candidate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import few_step  # noqa: E402

from scoresde import DPMSolverSampler  # noqa: E402
from scoresde.bench import targets as T  # noqa: E402
from scoresde.bench.peers import CountingScore  # noqa: E402
from scoresde.samplers import LearnedMultistepSampler  # noqa: E402
from scoresde.toy import GaussianMixture  # noqa: E402

# calibrate's test on the first n of its test pilots (the last is all of them, its default).
TEST_SIZES = (4096, 16384)


def random_mixture(seed: int, k: int, d: int, condition: float | None) -> GaussianMixture:
    """k components in d dimensions: means ~ N(0, 1.5^2 I), unequal weights; isotropic
    variances in [.01, .25] or (with `condition`) rotated covariances with eigenvalues
    log-uniform in [.005, .005 * condition]."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(k, d, generator=g, dtype=torch.float64)
    weights = 0.4 + torch.rand(k, generator=g, dtype=torch.float64)
    if condition is None:
        covs = (0.1 + 0.4 * torch.rand(k, generator=g, dtype=torch.float64)) ** 2
    else:
        covs = T.rotated_covariances(g, k, d, 0.005, condition)
    return GaussianMixture(weights, means, covs)


# (label, SDE, mixture, fit_pilots): fit_pilots 4096 is the default (the grid tuned on 2,048
# of them); 384 is a fit on too few pilots (the grid on 192), whose held-out quarter (96) is
# easily fooled.
CASES = [
    ("mix6d", "vp", dict(seed=601, k=8, d=6, condition=None), 4096),
    ("aniso12d", "vp", dict(seed=1202, k=6, d=12, condition=100.0), 4096),
    ("subvp mix3d", "subvp", dict(seed=303, k=5, d=3, condition=None), 4096),
    ("ve aniso4d", "ve", dict(seed=404, k=5, d=4, condition=50.0), 4096),
    ("mix6d, 384 pilots", "vp", dict(seed=601, k=8, d=6, condition=None), 384),
    ("aniso12d, 384 pilots", "vp", dict(seed=1202, k=6, d=12, condition=100.0), 384),
    ("ve mix5d", "ve", dict(seed=505, k=6, d=5, condition=None), 4096),
    ("aniso24d", "vp", dict(seed=2424, k=5, d=24, condition=200.0), 4096),
    ("subvp aniso6d", "subvp", dict(seed=606, k=4, d=6, condition=30.0), 4096),
    ("ve aniso4d, 384 pilots", "ve", dict(seed=404, k=5, d=4, condition=50.0), 384),
]


def train_mlp(dataset: str) -> tuple[torch.nn.Module, object]:
    """A 2-D MLP score network trained on scikit-learn's two moons or two circles (VP, 1,500
    steps; frozen float64 EMA copy): trained networks no other benchmark uses."""
    from sklearn.datasets import make_circles, make_moons

    from scoresde.losses import DSMLoss
    from scoresde.recipes import build_model
    from scoresde.training import Trainer

    if dataset == "moons":
        x, _ = make_moons(20_000, noise=0.06, random_state=5)
    else:
        x, _ = make_circles(20_000, noise=0.04, factor=0.5, random_state=5)
    data = torch.as_tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    sde = T.make_sde("vp")
    model = build_model(sde, "mlp", (2,), net_kwargs={"hidden": 128, "num_blocks": 3}, seed=5)
    trainer = Trainer(model, DSMLoss(sde), lr=2e-3, batch_size=256, warmup_steps=100,
                      decay_steps=1500, ema_decay=0.995, progress=False, seed=5)  # fmt: skip
    trainer.fit(data, 1500, progress=False)
    net = trainer.ema_model.eval().double()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, sde


def test_z(score, sde, dim: int, cal, fit_pilots: int, sizes: tuple[int, ...]) -> list[float]:
    """The test's z on the first n of calibrate's test pilots, for n in `sizes`: the pilots
    drawn again as calibrate draws them, their references solved as calibrate solves them
    (so the last size's z is calibrate's own)."""
    import scoresde.calibration as calibration
    from scoresde.samplers.learned import _gain_z
    from scoresde.samplers.schedules import pathwise_sq_errors, pf_ode_reference

    sampler = DPMSolverSampler(sde, 10)
    num_test = cal.extra["test_pilots"]
    drawn = calibration._solver_pilots(
        "dpm", sampler, (dim,), min(2048, fit_pilots // 2), fit_pilots, 800, 512, num_test,
        torch.Generator().manual_seed(1), None, torch.float64,
    )  # fmt: skip
    x_test = drawn[fit_pilots:]
    candidate = LearnedMultistepSampler(sde, **(cal.solver or cal.extra["rejected_solver"]))
    grid = DPMSolverSampler(sde, 10, time_grid=cal.grid())
    with torch.no_grad():
        ref = pf_ode_reference(sde, score, x_test, sampler.eps)
        sq = [pathwise_sq_errors(s, score, x_test, ref) for s in (grid, candidate)]
    if cal.extra["solver_error"] >= cal.extra["solver_initial_error"]:
        return [0.0 for _ in sizes]  # never left the grid: calibrate's z 0
    return [_gain_z(sq[0][:n], sq[1][:n], moved=True) for n in sizes]


def judge(label: str, score, sde, dim: int, z, ref, fit_pilots: int) -> dict:
    """Calibrate, then measure the grid and the candidate on the paths z -> ref."""
    cal, err, record = few_step.judged_fit(
        score, sde, dim, z, ref, num_pilot=min(2048, fit_pilots // 2), fit_pilots=fit_pilots,
        fit_batch=512,
    )  # fmt: skip
    ex = cal.extra
    rms = {k: float(e.square().mean().sqrt()) for k, e in err.items()}
    old = ex["solver_error"] < ex["solver_initial_error"] and ex["solver_gain_z"] > 2.0
    zs = test_z(score, sde, dim, cal, fit_pilots, TEST_SIZES)
    assert abs(zs[-1] - ex["test_gain_z"]) <= 1e-6 * max(1.0, abs(zs[-1])), (zs, ex)
    better = ex["test_error"] < ex["test_initial_error"]
    row = dict(target=label, sde=sde.config()["name"], fit_pilots=fit_pilots, old_keep=old,
               new_keep=cal.solver is not None, fit_seconds=ex["fit_seconds"],
               calibration_seconds=cal.seconds, nfe=cal.nfe, **record,
               test_sizes=list(TEST_SIZES), test_z=zs,
               test_keep=[better and v > 2.0 for v in zs],
               grid_err=rms["grid"], candidate_err=rms["candidate"],
               grid_median=float(err["grid"].median()),
               candidate_median=float(err["candidate"].median()),
               ratio_ci=few_step.ratio_interval(err["grid"], err["candidate"]))  # fmt: skip
    print(row, flush=True)
    return row


def verdict(r: dict, keep: bool) -> str:
    """Whether a keep / reject decision agrees with the fresh paths: a kept candidate should
    be better (interval above 1), a rejected one not clearly better (interval not above 1)."""
    better = r["ratio_ci"][0] > 1.0
    worse = r["ratio_ci"][1] < 1.0
    if keep:
        return "right" if better else ("wrong (worse)" if worse else "unclear")
    return "missed gain" if better else "right"


def markdown(rows: list[dict], n: int) -> str:
    sizes = " / ".join(f"{k:,}" for k in TEST_SIZES)
    out = ["# Keeping a bespoke fit: the held-out rule against the test-pilot rule "
           "(benchmarks/acceptance.py)", "",
           f"Command: `python benchmarks/acceptance.py --n {n}`", "",
           "DPMSolverSampler(sde, 10), `calibrate(method=\"solver\", fit_batch=512)`. held-out / "
           "test: RMS error of the tuned grid -> the candidate fit, and z (paired gain over its "
           "standard error), on the fit's held-out quarter (old rule) and on "
           f"{TEST_SIZES[-1]:,} fresh test pilots (`calibrate`'s rule: keep if z > 2); test z: "
           f"the same test on the first {sizes} of them (what a smaller `test_pilots` "
           f"decides). Fresh paths: {n} other draws, grid -> candidate "
           "RMS (median), and the 95 % paired-bootstrap interval of grid / candidate. "
           "Verdict: right if a kept fit is better there (interval above 1) or a rejected one "
           "is not; wrong (worse) if a kept one is worse (interval below 1).", "",
           f"| target | SDE | fit pilots | held-out (old rule) | test pilots "
           f"| test z ({sizes}) | fresh paths: grid -> candidate | grid / candidate "
           "| old rule | " + " | ".join(f"test rule, {k:,}" for k in TEST_SIZES) + " |",
           "|---|---|---|---|---|---|---|---|---|" + "---|" * len(TEST_SIZES)]  # fmt: skip

    def keep(flag: bool) -> str:
        return "keep" if flag else "reject"

    for r in rows:
        h, t, ci = r["held_out"], r["test"], r["ratio_ci"]
        rules = " | ".join(f"{keep(k)}: {verdict(r, k)}" for k in r["test_keep"])
        out.append(
            f"| {r['target']} | {r['sde']} | {r['fit_pilots']} "
            f"| {h[0]:.4f} -> {h[1]:.4f}, z {h[2]:.2f} | {t[0]:.4f} -> {t[1]:.4f} "
            f"| {' / '.join(f'{v:.2f}' for v in r['test_z'])} "
            f"| {r['grid_err']:.4f} -> {r['candidate_err']:.4f} ({r['grid_median']:.4f} -> "
            f"{r['candidate_median']:.4f}) | {r['grid_err'] / r['candidate_err']:.2f}x "
            f"({ci[0]:.2f}-{ci[1]:.2f}) | {keep(r['old_keep'])}: {verdict(r, r['old_keep'])} "
            f"| {rules} |"
        )
    out += ["", "Decisions against the fresh paths (right / wrong keeps / missed gains / unclear):"]
    rules = [("old rule (held-out)", [r["old_keep"] for r in rows])]
    rules += [(f"test rule, {k:,} pilots", [r["test_keep"][i] for r in rows])
              for i, k in enumerate(TEST_SIZES)]  # fmt: skip
    for name, keeps in rules:
        v = [verdict(r, k) for r, k in zip(rows, keeps, strict=True)]
        count = [sum(x == w for x in v) for w in ("right", "wrong (worse)", "missed gain")]
        out.append(f"- {name}: {count[0]} / {count[1]} / {count[2]} / {len(v) - sum(count)}")
    return "\n".join(out) + "\n"


def run_cases(name: str, cases: list, judge, markdown, network_setting) -> None:
    """The command line of this benchmark and of ems_keep.py: for each (label, SDE, mixture
    spec, setting) of `cases`, then for the moons and circles MLPs (with `network_setting`),
    `judge(label, score, sde, dim, z, ref, setting)` on n fresh paths (solved once per
    target), writing `name`.json and `name`.md after each row."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict] = []

    def write() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        (args.out / f"{name}.md").write_text(markdown(rows, args.n))

    paths: dict = {}
    for label, kind, spec, setting in cases:
        gm, sde = random_mixture(**spec), T.make_sde(kind)
        key = (kind, tuple(spec.values()))
        if key not in paths:
            paths[key] = few_step.prior_paths(sde, gm, args.n)
        z, ref = paths[key]
        rows.append(judge(label, CountingScore(sde, gm), sde, gm.dim, z, ref, setting))
        write()
    for dataset in ("moons", "circles"):
        net, sde = train_mlp(dataset)
        z, ref = few_step.network_paths(net, sde, args.n)
        rows.append(judge(f"{dataset} MLP (trained)", net, sde, 2, z, ref, network_setting))
        write()


def main() -> None:
    run_cases("acceptance", CASES, judge, markdown, 4096)


if __name__ == "__main__":
    main()
