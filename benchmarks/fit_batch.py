"""The bespoke solver fit on minibatches (`calibrate(..., method="solver", fit_batch=512)`)
against the full-batch fit (the default): fit time, held-out and test gain, ode_err at 10 NFE.

Usage: python benchmarks/fit_batch.py [--n 10000] [--out benchmarks/results]
Writes fit_batch.{json,md} (about 40 minutes on one CPU thread, most of it the trained
network's full-batch fit).

Same pilots (seed 1), paths (seed 0) and settings as `few_step.py --part bespoke`: exact
scores on the 2-D mixture and the held-out 25-mode target, and the trained 2-D MLP.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import few_step  # noqa: E402

from scoresde.bench import targets as T  # noqa: E402
from scoresde.bench.peers import CountingScore  # noqa: E402

BATCH = 512


def fit_row(label: str, score, sde, z, ref, dim: int, batch: int | None) -> dict:
    cal, err, record = few_step.judged_fit(score, sde, dim, z, ref, fit_batch=batch)
    e = err["candidate"]
    row = dict(target=label, fit_batch=batch, fit_seconds=cal.extra["fit_seconds"], **record,
               accepted=cal.solver is not None,
               ode_err=float(e.square().mean().sqrt()), median=float(e.median()))  # fmt: skip
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in ("mixture2d", "grid25"):
        gm, sde = T.TARGETS[name].mixture(), T.make_sde("vp")
        z, ref = few_step.prior_paths(sde, gm, args.n)
        for batch in (None, BATCH):
            rows.append(fit_row(name, CountingScore(sde, gm), sde, z, ref, gm.dim, batch))
    net, sde, z, ref = few_step.trained_problem(args.n)
    for batch in (None, BATCH):
        rows.append(fit_row("mlp2d (trained MLP)", net, sde, z, ref, 2, batch))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fit_batch.json").write_text(json.dumps(dict(n=args.n, rows=rows), indent=1))
    (args.out / "fit_batch.md").write_text(markdown(rows, args.n))


def markdown(rows: list[dict], n: int) -> str:
    out = ["# Bespoke fit: minibatch against full batch (benchmarks/fit_batch.py)", ""]
    out += [f"Command: `python benchmarks/fit_batch.py --n {n}`", ""]
    out += [
        "fit_batch: training pilots per Adam step (-: all 3,072); fit s: seconds of the fit "
        "(800 Adam steps; the reference solves not included); held-out / test: RMS error of "
        "the tuned grid -> the fitted solver on the fit's 1,024 held-out pilots (which chose "
        "its iterate) and on 16,384 fresh test pilots, and z, the paired gain over its "
        "standard error; kept: test z > 2 (`calibrate`'s rule); ode_err and median of the "
        f"fitted solver (kept or not) on {n} paths.",
        "",
        "| target | fit_batch | fit s | held-out | test | kept | ode_err | median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h, t = r["held_out"], r["test"]
        out.append(
            f"| {r['target']} | {r['fit_batch'] or '-'} | {r['fit_seconds']:.0f} "
            f"| {h[0]:.4f} -> {h[1]:.4f}, z {h[2]:.2f} | {t[0]:.4f} -> {t[1]:.4f}, z {t[2]:.2f} "
            f"| {'yes' if r['accepted'] else 'no'} | {r['ode_err']:.4f} | {r['median']:.4f} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
