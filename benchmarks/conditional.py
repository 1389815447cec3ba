"""Conditional sampling (inpainting) against the closed-form conditional of Gaussian mixtures:
replacement, RePaint's resampling jumps and the twisted SMC sampler (`inpaint(method=...)`).

Writes benchmarks/results/conditional.{json,md,png}. Run: `python benchmarks/conditional.py`
(no arguments; a few minutes on one CPU thread).

Setup: VP SDE (DDPM's linear schedule), exact mixture scores, float64.
- 2-D: the PEERS.md mixture (`benchmark_mixture_2d`) with x0 = 1.5 known; the true p(x1 | x0)
  has mean 0.977 and std 0.520 (`GaussianMixture.conditional`).
- 8-D: `random_mixture(8, 4, seed=2026)`, every other coordinate known, values from one draw
  of the mixture (seed 2027).
Each configuration draws N = 2,000 conditional samples (one per row of x_known, seed 0).
Errors: |mean - true mean| / true sd and |std / true std - 1| (max over the unknown
coordinates), and for 2-D the 1-Wasserstein distance to the true conditional (quantiles of
200,000 exact draws). Sampling noise alone, from two sets of N exact draws, is given as a
floor. NFE = score calls (one call on the whole batch = 1); an SMC call is on N K rows, so
"score rows per draw" = NFE x K is the fair cost (plus one backward pass per call with
twist_gradient="autograd").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from scoresde import VPSDE
from scoresde.guidance import inpaint
from scoresde.samplers.ddim import DDIMSampler
from scoresde.samplers.pc import EulerMaruyamaSampler
from scoresde.toy import benchmark_mixture_2d, random_mixture

OUT = Path(__file__).parent / "results"
N = 2000
F64 = torch.float64
SDE = VPSDE()


class Problem:
    """A mixture, its known coordinates and values, and the closed-form conditional."""

    def __init__(self, name: str, gm, known: torch.Tensor, values: torch.Tensor) -> None:
        self.name, self.gm, self.known = name, gm, known
        self.score = gm.score_fn(SDE)
        self.cond = gm.conditional(known, values)
        self.mean = self.cond.mean()
        self.sd = self.cond.covariance().diagonal().sqrt()
        full = torch.zeros(gm.dim, dtype=F64)
        full[known] = values
        self.x_known = full.repeat(N, 1)
        exact = self.cond.sample(200_000, generator=torch.Generator().manual_seed(99), dtype=F64)
        self.quantiles = exact[:, 0].sort().values if gm.dim == 2 else None

    def w1(self, x1: torch.Tensor) -> float:
        """W1 between a 1-D sample and the exact conditional (quantile functions)."""
        idx = ((torch.arange(len(x1)) + 0.5) / len(x1) * len(self.quantiles)).long()
        q = self.quantiles[idx]
        return float((x1.sort().values - q).abs().mean())

    def errors(self, x: torch.Tensor) -> dict:
        u = x[:, ~self.known]
        out = {
            "mean_err_sd": float(((u.mean(0) - self.mean) / self.sd).abs().max()),
            "std_err": float((u.std(0) / self.sd - 1).abs().max()),
        }
        if self.quantiles is not None:
            out["w1"] = self.w1(u[:, 0])
        return out

    def floor(self) -> dict:
        x = self.x_known.clone()
        draws = self.cond.sample(N, generator=torch.Generator().manual_seed(7), dtype=F64)
        x[:, ~self.known] = draws
        return self.errors(x)


def problems() -> list[Problem]:
    p2 = Problem(
        "2-D benchmark mixture, x0 = 1.5",
        benchmark_mixture_2d(),
        torch.tensor([True, False]),
        torch.tensor([1.5], dtype=F64),
    )
    gm8 = random_mixture(8, 4, seed=2026)
    y = gm8.sample(1, generator=torch.Generator().manual_seed(2027), dtype=F64)[0]
    known = torch.arange(8) % 2 == 0
    p8 = Problem("8-D random mixture, 4 of 8 known", gm8, known, y[known])
    return [p2, p8]


def configs(dim: int) -> list[dict]:
    """(method, sampler, steps, settings) rows; the 8-D problem gets a subset."""
    rows = []
    for steps in (50, 100, 200) if dim == 2 else (100,):
        rows.append({"method": "replace", "sampler": "em", "steps": steps})
        rows.append({"method": "replace", "sampler": "ddim", "steps": steps})
    for r in (2, 5, 10) if dim == 2 else (5,):
        rows.append({"method": "repaint", "sampler": "ddim", "steps": 50, "r": r, "j": 10})
    for steps in (50, 100) if dim == 2 else (100,):
        for k in (4, 16, 64):
            rows.append({"method": "smc", "sampler": "ddim", "steps": steps, "K": k})
    rows.append({"method": "smc", "sampler": "ddim", "steps": 100, "K": 16, "grad": "stop"})
    if dim == 2:
        rows.append({"method": "smc", "sampler": "em", "steps": 200, "K": 16})
    return rows


def make_sampler(cfg: dict):
    if cfg["sampler"] == "em":
        return EulerMaruyamaSampler(SDE, num_steps=cfg["steps"])
    return DDIMSampler(SDE, num_steps=cfg["steps"], eta=1.0)


def run(problem: Problem, cfg: dict) -> dict:
    sampler = make_sampler(cfg)
    kwargs = {}
    if cfg["method"] == "smc":
        kwargs = {"particles": cfg["K"], "twist_gradient": cfg.get("grad", "autograd")}
    elif cfg["method"] == "repaint":
        kwargs = {"jump_length": cfg["j"], "jump_n_sample": cfg["r"]}
    start = time.perf_counter()
    x, info = inpaint(
        sampler,
        problem.score,
        problem.x_known,
        problem.known,
        method=cfg["method"],
        generator=torch.Generator().manual_seed(0),
        return_info=True,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    k = cfg.get("K", 1)
    row = dict(cfg, nfe=info.nfe, rows_per_draw=info.nfe * k, seconds=seconds)
    row.update(problem.errors(x))
    if info.ess is not None:
        row["ess_min"] = float(info.ess.mean(1).min())  # mean over items, worst step
    return row


def label(row: dict) -> str:
    sampler = {"em": "Euler–Maruyama", "ddim": "DDIM eta=1"}[row["sampler"]]
    if row["method"] == "repaint":
        return f"repaint (j={row['j']}, r={row['r']}), {sampler}"
    if row["method"] == "smc":
        grad = ", stop-gradient" if row.get("grad") == "stop" else ""
        return f"smc K={row['K']}{grad}, {sampler}"
    return f"replace, {sampler}"


def markdown(results: dict) -> str:
    lines = [
        "# Benchmark: conditional sampling (inpainting)",
        "",
        "Command: `python benchmarks/conditional.py` (the script's docstring gives the setup).",
        f"VP SDE, exact mixture scores, float64; {N} conditional draws per row (seed 0). "
        "mean err: max over unknown coordinates of |mean - true| / true sd; std err: max of "
        "|std / true - 1|; W1 (2-D): 1-Wasserstein distance to the true p(x1 | x0). "
        "NFE: score calls; rows/draw: NFE x particles (the score evaluations one draw costs); "
        "ESS: smallest per-step effective sample size, averaged over draws. Seconds: wall "
        "clock, one CPU thread, shared machine.",
        "",
    ]
    for prob in results["problems"]:
        lines += [f"## {prob['name']}", ""]
        fl = prob["floor"]
        floor = f"mean err {fl['mean_err_sd']:.3f}, std err {fl['std_err']:.3f}"
        if "w1" in fl:
            floor += f", W1 {fl['w1']:.3f}"
        lines += [f"Two sets of {N} exact draws differ by: {floor}.", ""]
        has_w1 = "w1" in fl
        head = "| method | steps | NFE | rows/draw | mean err (sd) | std err |"
        head += " W1 |" if has_w1 else ""
        head += " ESS | seconds |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in prob["rows"]:
            cells = [
                label(r),
                str(r["steps"]),
                str(r["nfe"]),
                str(r["rows_per_draw"]),
                f"{r['mean_err_sd']:.3f}",
                f"{r['std_err']:.3f}",
            ]
            if has_w1:
                cells.append(f"{r['w1']:.3f}")
            cells.append(f"{r['ess_min']:.1f}" if "ess_min" in r else "-")
            cells.append(f"{r['seconds']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def picture(problem: Problem, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-3.5, 3.0, 600, dtype=F64)
    dens = problem.cond.log_prob(grid[:, None]).exp()
    runs = [
        ("replace (DDIM eta=1, 100 steps)", {"method": "replace", "sampler": "ddim", "steps": 100}),
        (
            "RePaint (j=10, r=10, 50 steps; 410 NFE)",
            {"method": "repaint", "sampler": "ddim", "steps": 50, "r": 10, "j": 10},
        ),
        (
            "SMC (K=16, DDIM eta=1, 100 steps)",
            {"method": "smc", "sampler": "ddim", "steps": 100, "K": 16},
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, (title, cfg) in zip(axes, runs, strict=True):
        kwargs = {}
        if cfg["method"] == "smc":
            kwargs = {"particles": cfg["K"]}
        elif cfg["method"] == "repaint":
            kwargs = {"jump_length": cfg["j"], "jump_n_sample": cfg["r"]}
        x = inpaint(
            make_sampler(cfg),
            problem.score,
            problem.x_known,
            problem.known,
            method=cfg["method"],
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        ax.hist(
            x[:, 1].numpy(), bins=60, range=(-3.5, 3.0), density=True, alpha=0.5, label="samples"
        )
        ax.plot(grid.numpy(), dens.numpy(), "k", lw=1.5, label="true p(x1 | x0 = 1.5)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x1")
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("2-D benchmark mixture, x0 = 1.5 known: imputed x1 against the closed form")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"N": N, "problems": []}
    probs = problems()
    for prob in probs:
        rows = []
        for cfg in configs(prob.gm.dim):
            row = run(prob, cfg)
            print(
                prob.name,
                label(row),
                {k: round(v, 3) for k, v in row.items() if isinstance(v, float)},
                flush=True,
            )
            rows.append(row)
        results["problems"].append(
            {
                "name": prob.name,
                "true_mean": prob.mean.tolist(),
                "true_sd": prob.sd.tolist(),
                "floor": prob.floor(),
                "rows": rows,
            }
        )
    (OUT / "conditional.json").write_text(json.dumps(results, indent=1) + "\n")
    (OUT / "conditional.md").write_text(markdown(results))
    picture(probs[0], OUT / "conditional.png")
    print("written", OUT / "conditional.md")


if __name__ == "__main__":
    main()
