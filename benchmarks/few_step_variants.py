"""What was tried to improve DPM-Solver++ at 10 NFE without calibration (issue 12.1): variants
of the multistep plan, tuned on the held-in targets (PEERS.md's 2-D mixture and mix16d, VP
and VE) and then checked on held-out ones (benchmarks/few_step.py's, plus the benchmark
suite's ring2d / aniso2d / mix64d, VE and sub-VP).

Usage: python benchmarks/few_step_variants.py [--n 800] [--out benchmarks/results]
Writes few_step_variants.json and few_step_variants.md (about 5 minutes, most of it the
reference solves).

Variants (all built from the same engine, `scoresde.samplers._multistep.make_plan`, with the
plan's weight rows replaced where a variant differs):
- UniPC's B(h) forms (Zhao et al. 2023): with a full linear solve UniPC's coefficients are the
  exact integral of the interpolant whatever B(h) is, so "bh1" (B = h) and "bh2"
  (B = e^h - 1) differ from DPM-Solver++ only where UniPC fixes the coefficient at 1/2:
  its order-2 predictor and the first step's order-1 corrector.
- iPNDM-style (Zhang & Chen 2023): the predictor's data prediction is the fixed
  Adams–Bashforth combination (3/2, -1/2), (23, -16, 5)/12 of the past values, i.e. as if
  the lambda steps were equal, integrated with the first-order exponential weight; the
  corrector is kept.
- interpolation in another variable v(lambda) (DEIS, Zhang & Chen 2022): the past data
  predictions interpolated as a polynomial in v and integrated exactly against e^lambda;
  v = t is `DPMSolverSampler(interpolation="t")`; v = sigma/alpha is DEIS's "rho".
- order per step: the last step of first order only ("last1") or a longer first-order
  start; the corrector of the predictor's order (not one more).
- power grids t_i = eps + (T - eps)(1 - i/n)^p and the logSNR grid.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import few_step  # noqa: E402  (registers the held-out targets)

from scoresde import DPMSolverSampler  # noqa: E402
from scoresde.bench import targets as T  # noqa: E402
from scoresde.bench.peers import CountingScore  # noqa: E402
from scoresde.samplers._multistep import (  # noqa: E402
    make_plan,
    resolve_taus,
    run_plan,
    step_orders,
)
from scoresde.samplers.toolkit import Coefficients, make_grid  # noqa: E402

TUNE = [("mixture2d", "vp"), ("mix16d", "vp"), ("mixture2d", "ve"), ("mix16d", "ve")]
HELD = [(t, "vp") for t in ("aniso32d", "grid25", "ring2d", "aniso2d", "mix64d")]
HELD += [(t, "vp") for t in ("aniso8d", "modes64", "mix128d")]
HELD += [("aniso32d", "ve"), ("grid25", "ve"), ("modes64", "ve"), ("aniso8d", "subvp")]
AB = {2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12]}


def power(p: float):
    def grid(sde: Any, n: int, eps: float = 1e-3) -> torch.Tensor:
        frac = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
        return eps + (sde.T - eps) * (1 - frac) ** p

    return grid


def _rows(co: Coefficients, slots: int, idx: list[int], w: list[float]) -> list[float]:
    row = [0.0] * slots
    for j, wj in zip(idx, w, strict=True):
        row[j % slots] += wj / co.alpha[j]  # the loop holds alpha_j x0_j
    return row


class Variant(DPMSolverSampler):
    """DPMSolverSampler(order 2-3 + corrector) with one of the variants above."""

    def __init__(self, sde: Any, n: int, order: int = 3, grid: Any = "quadratic", **opts: Any):
        super().__init__(sde, n, order=order, time_grid=grid(sde, n) if callable(grid) else grid)
        self.opts = opts

    def _sample(self, ctx: Any, x: torch.Tensor) -> torch.Tensor:
        co, plan = self._variant_plan()
        return run_plan(ctx, x, co, plan)

    def _orders(self, co: Coefficients) -> list[int]:
        n, lof = self.num_steps, self.opts.get("lof")
        if lof == "last1":
            return [min(self.order, i + 1) if i < n - 1 else 1 for i in range(n)]
        orders = step_orders(co.lam, self.order, True)
        if lof == "slow_start":  # one more first-order step at the start
            orders = [1, 1] + [min(k, i) for i, k in enumerate(orders[2:], start=1)]
        return orders

    def _variant_plan(self) -> tuple[Coefficients, Any]:
        co = Coefficients(self.sde, make_grid(self.sde, self.num_steps, self.time_grid, self.eps))
        n, orders = self.num_steps, self._orders(co)
        corr = [k if self.opts.get("corr") == "k" else k + 1 for k in orders]
        plan = make_plan(co, orders, corr, resolve_taus(0.0, co), self._var())
        slots = plan.slots
        for i in range(n):
            k, a_s, h = orders[i], co.alpha[i + 1], co.lam[i + 1] - co.lam[i]
            full = (
                None
                if plan.corr[i] is None
                else [c + p for c, p in zip(plan.corr[i], plan.pred[i], strict=True)]
            )
            if self.opts.get("ipndm") and k >= 2:
                w0 = -a_s * math.expm1(-h)
                plan.pred[i] = _rows(co, slots, [i - j for j in range(k)], [w0 * c for c in AB[k]])
            bh = self.opts.get("bh")
            if bh and k == 2:
                b, r1 = (-h if bh == "bh1" else math.expm1(-h)), (co.lam[i - 1] - co.lam[i]) / h
                w = [-a_s * math.expm1(-h) + a_s * b * 0.5 / r1, -a_s * b * 0.5 / r1]
                plan.pred[i] = _rows(co, slots, [i, i - 1], w)
            if bh and corr[i] == 2 and full is not None:
                b = -h if bh == "bh1" else math.expm1(-h)
                w = [-a_s * math.expm1(-h) + a_s * b * 0.5, -a_s * b * 0.5]
                full = _rows(co, slots, [i, i + 1], w)
            if full is not None:
                plan.corr[i] = [f - p for f, p in zip(full, plan.pred[i], strict=True)]
        return co, plan

    def _var(self) -> Any:
        kind = self.opts.get("var")
        if kind is None:
            return None
        if kind == "t":
            from scoresde.samplers._multistep import time_variable

            return time_variable(self.sde)
        power_of = {"sigma/alpha": 1.0, "sqrt(sigma/alpha)": 0.5}[kind]
        return lambda lams: [math.exp(-power_of * lam) for lam in lams]


VARIANTS = {
    "default (3M + corrector, quadratic)": {},
    "2M + corrector": dict(order=2),
    "UniPC bh1": dict(bh="bh1"),
    "UniPC bh2": dict(bh="bh2"),
    "2M, UniPC bh2": dict(order=2, bh="bh2"),
    "iPNDM-style predictor": dict(ipndm=True),
    "iPNDM-style, power 1.75": dict(ipndm=True, grid=power(1.75)),
    "interp. in t (DEIS tAB)": dict(var="t"),
    "interp. in t, power 1.75": dict(var="t", grid=power(1.75)),
    "interp. in sigma/alpha (DEIS rho)": dict(var="sigma/alpha"),
    "last step only first order": dict(lof="last1"),
    "slower start": dict(lof="slow_start"),
    "corrector of the same order": dict(corr="k"),
    "power 1.5 grid": dict(grid=power(1.5)),
    "power 1.75 grid": dict(grid=power(1.75)),
    "logSNR grid": dict(grid="logsnr"),
}


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).flatten(1).norm(dim=1).square().mean().sqrt())


def run(n: int, steps: int, cases: list, variants: dict) -> dict[str, dict[str, float]]:
    out = {}
    for name, kind in cases:
        gm, sde = T.TARGETS[name].mixture(), T.make_sde(kind)
        z, ref = few_step.prior_paths(sde, gm, n)
        score = CountingScore(sde, gm)
        row = {}
        for label, kw in variants.items():
            x = Variant(sde, steps, **kw).sample(score, (0,), x_init=z)
            row[label] = rms(x, ref)
        out[f"{name} ({kind})"] = row
        print(name, kind, steps, {k: round(v, 4) for k, v in row.items()}, flush=True)
    return out


def paired(n: int = 3000, seed: int = 5) -> list[dict[str, Any]]:
    """interpolation="t" against the default at 10 NFE on fresh paths (seed 5, not the
    tables' seed 0): RMS ratio with a 95 % bootstrap interval, medians, and the fraction of
    paths on which t is closer to the reference (per-path errors are heavy tailed)."""
    rows = []
    for name in ("mix64d", "modes64", "aniso32d", "mixture2d"):
        gm, sde = T.TARGETS[name].mixture(), T.make_sde("vp")
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, gm.dim, generator=g, dtype=torch.float64)
        ref = T.reference_solve(sde, gm, z, sde.T, 1e-3)
        score = CountingScore(sde, gm)
        err = {}
        for label, kw in (("lambda", {}), ("t", dict(interpolation="t"))):
            x = DPMSolverSampler(sde, 10, **kw).sample(score, (0,), x_init=z)
            err[label] = (x - ref).norm(dim=1)
        boot, g = [], torch.Generator().manual_seed(0)
        for _ in range(1000):
            i = torch.randint(0, n, (n,), generator=g)
            boot.append(
                float(err["t"][i].square().mean().sqrt() / err["lambda"][i].square().mean().sqrt())
            )
        b = sorted(boot)
        rms_ = {k: float(v.square().mean().sqrt()) for k, v in err.items()}
        row = dict(target=name, n=n, rms=rms_, ratio=rms_["t"] / rms_["lambda"], ci=[b[25], b[975]])
        row.update(median={k: float(v.median()) for k, v in err.items()})
        row["frac_t_better"] = float((err["t"] < err["lambda"]).double().mean())
        rows.append(row)
        print(row, flush=True)
    return rows


def table(res: dict[str, dict[str, float]], title: str) -> list[str]:
    cases = list(res)
    labels = list(res[cases[0]])
    out = [f"### {title}", "", "| variant | " + " | ".join(cases) + " |"]
    out += ["|---|" + "---|" * len(cases)]
    base = labels[0]
    for lab in labels:
        cells = []
        for c in cases:
            v, b = res[c][lab], res[c][base]
            same = abs(v - b) <= 1e-3 * b  # e.g. interpolation in t under VE: the same method
            mark = "" if lab == base or same else (" +" if v > b else " -")
            cells.append(f"{v:.3f}{mark}")
        out.append(f"| {lab} | " + " | ".join(cells) + " |")
    return out + ["", "(+: worse than the default on that target, -: better, neither: same)", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--paired", action="store_true", help="only the fresh-path check")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.paired:
        rows = paired()
        (args.out / "few_step_paired.json").write_text(json.dumps(rows, indent=1))
        return
    if args.markdown_only:
        res = json.loads((args.out / "few_step_variants.json").read_text())
    else:
        res = {"n": args.n, "tune_10": run(args.n, 10, TUNE, VARIANTS)}
        res["held_10"] = run(args.n, 10, HELD, VARIANTS)
        two = {k: VARIANTS[k] for k in list(VARIANTS)[:1] + ["interp. in t (DEIS tAB)"]}
        for steps in (5, 20):
            res[f"all_{steps}"] = run(args.n, steps, TUNE + HELD, two)
    md = ["# DPM-Solver++ variants at 10 NFE (benchmarks/few_step_variants.py)", ""]
    md += [f"ode_err, {res['n']} paths per target, exact scores, eps = 1e-3.", ""]
    md += table(res["tune_10"], "10 NFE, held-in targets (the ones tuned on)")
    md += table(res["held_10"], "10 NFE, held-out targets")
    for steps in (5, 20):
        md += table(res[f"all_{steps}"], f"{steps} NFE, every target: interpolation in t")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "few_step_variants.json").write_text(json.dumps(res, indent=1))
    (args.out / "few_step_variants.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
