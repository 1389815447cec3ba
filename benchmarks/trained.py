"""Trained-model benchmark: sample quality and likelihood of *learned* score models.

Parts (run separately so they can use one core each, then merged by `--part report`):

- "2d": an `MLPScoreNet` (VP SDE, `--param` parameterization, default v) trained on
  8gaussians and mixture3 (exact Gaussian mixtures: quality = mean NLL of the samples
  under the true mixture against the data's own, sliced W2 against fresh data with its
  sampling floor, mode-weight error) and on two_moons (sliced W2 only); every sampler at
  NFE 10..200 (1000 for EM/PC); the model's NLL of held-out points by the probability-flow
  ODE (exact trace) against the exact mixture NLL of the same points.
- "digits": a `UNet` trained on the scikit-learn 8x8 digits train split; test-set bits/dim
  through the probability-flow ODE with the 17-level dequantization offset, against a
  per-pixel Gaussian and a full-covariance Gaussian fitted on the train split; sample
  grids and the pixel-space Frechet distance to the test set against NFE.
- "digits-bound": a true upper bound on the digits model's discrete bits/dim.
- "params": mixture3 models with each parameterization (eps, v, x0, score) and the exact
  score, sampled from the same x_T by ODE/DPM-Solver++/Euler-Maruyama: why eps-models give
  far outliers under probability-flow ODE samplers.

Usage:
    python benchmarks/trained.py --quick                 # CI size, < 1 minute
    python benchmarks/trained.py --part 2d               # full 2-D part
    python benchmarks/trained.py --part digits           # full digits part
    python benchmarks/trained.py --part params           # parameterization study (mixture3)
    python benchmarks/trained.py --part report           # merge -> trained.{json,md,png}
    python benchmarks/trained.py                         # all parts in turn

Writes trained.json, trained.md, trained.png, trained_2d_samples.png and
trained_digits_samples.png into --out (default benchmarks/results); partial results
trained_2d.json / trained_digits.json / trained_digits_bound.json / trained_params.json;
checkpoints under --workdir (resumed if present).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from scoresde.data import load_digits_split
from scoresde.likelihood import bits_per_dim, dataset_log_likelihood, dequantization_offset
from scoresde.losses import DSMLoss
from scoresde.metrics import (
    frechet_distance,
    mean_log_density,
    mode_weight_error,
    sampling_floor,
    sliced_wasserstein,
)
from scoresde.samplers import (
    AdaptiveSDESampler,
    DDIMSampler,
    DPMSolverSampler,
    EDMSampler,
    EulerMaruyamaSampler,
    ODESampler,
    PCSampler,
)
from scoresde.toy import benchmark_mixture_2d, eight_gaussians, make_dataset
from scoresde.training import CheckpointError, Trainer, build_model

Tensor = torch.Tensor
RESULTS = Path(__file__).parent / "results"

# --- configurations ---------------------------------------------------------------------------

FULL = {
    "2d": {
        "datasets": ["8gaussians", "mixture3", "two_moons"],
        "train_points": 50_000,
        "net_kwargs": {"hidden": 128, "num_blocks": 3},
        "steps": 2000,
        "batch_size": 256,
        "lr": 2e-3,
        "warmup": 200,
        "n_samples": 5000,
        "nfes": [10, 20, 50, 100, 200],
        "long_nfes": [1000],  # only for the SDE samplers EM and PC
        "n_likelihood": 1000,
        "lik_rtol": 1e-4,
        "floor_repeats": 5,
    },
    "digits": {
        "channels": [32, 32],
        "steps": 2000,
        "batch_size": 128,
        "lr": 2e-3,
        "warmup": 200,
        "lik_rtol": 1e-3,
        "num_probes": 4,
        "n_test": None,  # all test images
        "n_samples": 500,
        "nfes": [10, 20, 50, 100],
        "grid_runs": [("DPM-Solver++ 2M", 10), ("DPM-Solver++ 2M", 50), ("PC", 200)],
    },
}
QUICK = {
    "2d": {
        "datasets": ["mixture3"],
        "net_kwargs": {"hidden": 64, "num_blocks": 2},
        "train_points": 5000,
        "steps": 150,
        "batch_size": 256,
        "lr": 2e-3,
        "warmup": 20,
        "n_samples": 500,
        "nfes": [10, 20],
        "long_nfes": [],
        "n_likelihood": 100,
        "lik_rtol": 1e-3,
        "floor_repeats": 2,
    },
    "digits": {
        "channels": [8, 8],
        "steps": 20,
        "batch_size": 32,
        "lr": 2e-3,
        "warmup": 5,
        "lik_rtol": 1e-2,
        "num_probes": 1,
        "n_test": 16,
        "n_samples": 64,
        "nfes": [10],
        "grid_runs": [("DPM-Solver++ 2M", 10)],
    },
}

# (name, builder (sde, num_steps) -> sampler, NFE per step, stochastic)
SAMPLERS: list[tuple[str, Any, int]] = [
    (
        "Euler-Maruyama",
        lambda sde, n: EulerMaruyamaSampler(sde, num_steps=n),
        1,
    ),
    ("PC", lambda sde, n: PCSampler(sde, num_steps=n), 2),
    ("ODE heun", lambda sde, n: ODESampler(sde, method="heun", num_steps=n), 2),
    ("DDIM", lambda sde, n: DDIMSampler(sde, num_steps=n), 1),
    ("DPM-Solver++ 2M", lambda sde, n: DPMSolverSampler(sde, num_steps=n, order=2), 1),
    ("DPM-Solver++ 3M", lambda sde, n: DPMSolverSampler(sde, num_steps=n, order=3), 1),
    ("EDM Heun", lambda sde, n: EDMSampler(sde, num_steps=n), 2),
]
SDE_SAMPLERS = ("Euler-Maruyama", "PC")
# The 2-D models' parameterization: "v" keeps the probability-flow ODE's far tail sane (see
# `param_study` and the "Parameterization and ODE samplers" section of trained.md).
PARAMS = ("eps", "v", "x0", "score")
DEFAULT_PARAM = "v"
# Adaptive samplers: run once each, NFE chosen by the method.
ADAPTIVE: list[tuple[str, Any]] = [
    (
        "ODE dopri5 rtol=1e-3",
        lambda sde: ODESampler(sde, method="dopri5", rtol=1e-3, atol=1e-3),
    ),
    ("AdaptiveSDE", lambda sde: AdaptiveSDESampler(sde)),
]


def _steps_for(nfe: int, per_step: int) -> int:
    # EDM Heun uses 2n-1 NFE; rounding up keeps every sampler at or just under the budget.
    return max(2, round(nfe / per_step))


def _sampler_runs(cfg: dict, names: tuple[str, ...] | None = None) -> list[tuple[str, int]]:
    runs = []
    for name, _, _ in SAMPLERS:
        if names is not None and name not in names:
            continue
        nfes = list(cfg["nfes"]) + (list(cfg["long_nfes"]) if name in SDE_SAMPLERS else [])
        runs += [(name, nfe) for nfe in nfes]
    return runs


def _build_sampler(name: str, sde: Any, nfe: int) -> Any:
    for n, build, per_step in SAMPLERS:
        if n == name:
            return build(sde, _steps_for(nfe, per_step))
    raise ValueError(f"unknown sampler {name!r}")


def _train(model: Any, data: Tensor, cfg: dict, ckdir: Path, seed: int) -> tuple[Trainer, dict]:
    """Train (or resume from ckdir/latest.pt) to cfg["steps"]; returns trainer and a log."""
    sde = model.sde
    trainer = Trainer(
        model,
        DSMLoss(sde),
        lr=cfg["lr"],
        batch_size=cfg["batch_size"],
        warmup_steps=cfg["warmup"],
        decay_steps=cfg["steps"],
        min_lr_ratio=0.05,
        ema_decay=0.999,
        checkpoint_dir=ckdir,
        checkpoint_every=500,
        seed=seed,
        device="cpu",
        progress=False,
    )
    latest = ckdir / "latest.pt"
    resumed_from = 0
    if latest.exists():
        try:
            trainer.load(latest)
            resumed_from = trainer.step
        except CheckpointError as err:  # another config: start over
            print(f"ignoring {latest}: {err}")
    t0 = time.perf_counter()
    todo = max(0, cfg["steps"] - trainer.step)
    if todo:
        trainer.fit(data, todo, progress=False)
    seconds = time.perf_counter() - t0
    hist = trainer.history
    k = max(1, min(100, len(hist) // 10))
    log = {
        "steps": trainer.step,
        "resumed_from_step": resumed_from,
        "train_seconds_this_run": round(seconds, 1),
        "seconds_per_step": round(seconds / todo, 4) if todo else None,
        "loss_first": sum(hist[:k]) / k if hist else None,
        "loss_last": sum(hist[-k:]) / k if hist else None,
        "params": sum(p.numel() for p in trainer.model.parameters()),
    }
    return trainer, log


# --- 2-D --------------------------------------------------------------------------------------


def _mixture(name: str) -> Any:
    return {"8gaussians": eight_gaussians(), "mixture3": benchmark_mixture_2d()}.get(name)


def _quality_2d(
    samples: Tensor, name: str, ref: Tensor, gen: torch.Generator, logp_min: float | None
) -> dict:
    """sliced W2 to fresh data; for exact mixtures also the NLL under the truth, the
    mode-weight error, the fraction of outliers (log p below the least likely of n true
    samples: ~1/n for a perfect sampler) and the NLL of the samples that are not outliers.
    """
    s = samples.double()
    out: dict[str, Any] = {
        "sw2": float(sliced_wasserstein(s, ref, generator=gen)),
        "finite": bool(torch.isfinite(s).all()),
    }
    mix = _mixture(name)
    if mix is not None:
        ld = mean_log_density(s, mix)
        out["nll"] = float(-ld.mean)
        out["nll_se"] = float(ld.stderr)
        out["mode_err"] = float(mode_weight_error(s, mix))
        lp = mix.log_prob(s)
        inlier = lp >= logp_min
        out["outlier_frac"] = float(1 - inlier.double().mean())
        out["nll_inliers"] = float(-lp[inlier].mean()) if inlier.any() else float("nan")
    return out


def _ckdir_2d(workdir: Path, name: str, param: str) -> Path:
    # eps keeps the original directory name so existing checkpoints stay valid.
    return workdir / (f"2d_{name}" if param == "eps" else f"2d_{name}_{param}")


def run_2d(cfg: dict, workdir: Path, out: Path, seed: int = 0, param: str = DEFAULT_PARAM) -> dict:
    results: dict[str, Any] = {"config": cfg, "param": param, "datasets": {}}
    scatter: dict[str, dict[str, Tensor]] = {}
    for di, name in enumerate(cfg["datasets"]):
        gen = torch.Generator().manual_seed(seed + 100 * di)
        data = make_dataset(name, cfg["train_points"], generator=gen, dtype=torch.float32)
        model = build_model("vp", "mlp", (2,), param, net_kwargs=cfg["net_kwargs"], seed=seed)
        trainer, log = _train(model, data, cfg, _ckdir_2d(workdir, name, param), seed)
        score = trainer.ema_model
        sde = score.sde
        print(f"[2d] {name}: trained {log}", flush=True)

        n = cfg["n_samples"]
        ref = make_dataset(name, n, generator=gen, dtype=torch.float64)
        mix = _mixture(name)
        block: dict[str, Any] = {"train": log, "runs": []}
        # Reference: fresh true samples against the same metrics (the floor).
        if mix is not None:
            truth = mix.sample(n, generator=gen, dtype=torch.float64)
            ld = mean_log_density(truth, mix)
            block["data_nll"] = float(-ld.mean)
            block["data_nll_se"] = float(ld.stderr)
            block["data_mode_err"] = float(mode_weight_error(truth, mix))
            logp_min = float(mix.log_prob(truth).min())
            fl = sampling_floor(
                mix,
                n,
                lambda a, b, gen=gen: sliced_wasserstein(a, b, generator=gen),
                repeats=cfg["floor_repeats"],
                generator=gen,
            )
        else:
            logp_min = None
            vals = [
                float(
                    sliced_wasserstein(
                        make_dataset(name, n, generator=gen, dtype=torch.float64),
                        make_dataset(name, n, generator=gen, dtype=torch.float64),
                        generator=gen,
                    )
                )
                for _ in range(cfg["floor_repeats"])
            ]
            fl = (sum(vals) / len(vals), float(torch.tensor(vals).std()))
        block["sw2_floor"] = [fl[0], fl[1]]

        runs = [(nm, nfe, None) for nm, nfe in _sampler_runs(cfg)]
        runs += [(nm, None, build) for nm, build in ADAPTIVE]
        for nm, nfe, build in runs:
            try:
                sampler = build(sde) if build is not None else _build_sampler(nm, sde, nfe)
            except ValueError as err:  # e.g. PC's discrete chain needs enough steps
                block["runs"].append({"sampler": nm, "nfe_target": nfe, "error": str(err)})
                print(f"[2d] {name} {nm} nfe={nfe}: not run ({err})", flush=True)
                continue
            sg = torch.Generator().manual_seed(seed + 7)
            t0 = time.perf_counter()
            x = sampler.sample(score, (n, 2), generator=sg, dtype=torch.float32)
            secs = time.perf_counter() - t0
            q = _quality_2d(x, name, ref, gen, logp_min)
            row = {"sampler": nm, "nfe_target": nfe, "nfe": sampler.nfe, "seconds": secs, **q}
            block["runs"].append(row)
            print(f"[2d] {name} {nm} nfe={sampler.nfe}: {q}", flush=True)
            if nfe == 50 or (nfe is None and nm.startswith("ODE")):
                scatter.setdefault(name, {})[f"{nm} ({sampler.nfe} NFE)"] = x[:3000].double()
        scatter.setdefault(name, {})["data"] = ref[:3000]

        # Likelihood of held-out points: model (PF ODE, exact trace) vs the truth.
        pts = make_dataset(name, cfg["n_likelihood"], generator=gen, dtype=torch.float32)
        t0 = time.perf_counter()
        lik = dataset_log_likelihood(
            score,
            sde,
            pts,
            batch_size=cfg["n_likelihood"],
            trace="exact",
            method="dopri5",
            rtol=cfg["lik_rtol"],
            atol=cfg["lik_rtol"],
            progress=False,
        )
        block["likelihood"] = {
            "n": cfg["n_likelihood"],
            "method": f"dopri5 rtol=atol={cfg['lik_rtol']}, exact trace, eps=1e-5, float32",
            "model_nll": -lik.mean_logp,
            "model_nll_se": lik.stderr_logp,
            "model_bpd": lik.mean_bpd,
            "nfe": lik.nfe,
            "seconds": time.perf_counter() - t0,
        }
        if mix is not None:
            true_lp = mix.log_prob(pts.double())
            gap = -lik.logp.double() - (-true_lp)
            block["likelihood"].update(
                exact_nll=float(-true_lp.mean()),
                exact_bpd=float(-true_lp.mean() / (2 * math.log(2))),
                gap_mean=float(gap.mean()),
                gap_se=float(gap.std() / math.sqrt(gap.numel())),
            )
        print(f"[2d] {name} likelihood {block['likelihood']}", flush=True)
        results["datasets"][name] = block
    _plot_2d_samples(scatter, out / "trained_2d_samples.png")
    return results


STUDY_SAMPLERS: list[tuple[str, Any]] = [
    ("ODE heun, 100 steps", lambda sde: ODESampler(sde, method="heun", num_steps=100)),
    ("DPM-Solver++ 2M, 20 NFE", lambda sde: DPMSolverSampler(sde, num_steps=20, order=2)),
    ("Euler-Maruyama, 200 steps", lambda sde: EulerMaruyamaSampler(sde, num_steps=200)),
]
STUDY_RADIUS = 4.0  # |x| > 4 is far outside mixture3 (its modes lie within |x| < 2.5)
TAIL_RADIUS = 3.3  # |x_T| beyond which the prior's tail starts (~0.4% of N(0, I) in 2-D)


def _tail_eps_error(score: Any, exact: Any, sde: Any, x0: Tensor, gen: torch.Generator) -> dict:
    """RMS error of the model's eps = -sigma score against the exact one, at x = alpha x0
    + sigma z for typical z (|z| < 2, "bulk") and prior-tail z (|z| in [3.3, 4.5], "tail"),
    per t. The network is trained on the bulk; the PF ODE from a tail x_T runs in the tail.
    """
    out: dict[str, dict[str, float]] = {}
    n = x0.shape[0]
    for t in (0.2, 0.4, 0.6, 0.8, 1.0):
        tt = torch.full((n,), t)
        alpha, sigma = sde.alpha(tt)[:, None], sde.sigma(tt)[:, None]
        z = torch.randn(n, 2, generator=gen)
        unit = z / z.norm(dim=1, keepdim=True)
        radius = TAIL_RADIUS + 1.2 * torch.rand(n, 1, generator=gen)
        row = {}
        for label, zz in (("bulk", z[z.norm(dim=1) < 2]), ("tail", unit * radius)):
            m = zz.shape[0]
            x = (alpha[:m] * x0[:m] + sigma[:m] * zz).float()
            with torch.no_grad():
                got = -sigma[:m] * score(x, tt[:m]).double()
            want = -sigma[:m] * exact(x.double(), tt[:m].double())
            row[label] = float((got - want).pow(2).sum(1).mean().sqrt())
        out[f"{t:g}"] = row
    return out


def param_study(cfg: dict, workdir: Path, seed: int = 0, params: tuple[str, ...] = PARAMS) -> dict:
    """Why PF-ODE samplers throw far outliers on trained 2-D models: mixture3 models trained
    exactly as in `run_2d` with each parameterization, plus the exact score, all sampled
    from the SAME x_T by an ODE (Heun), DPM-Solver++ and Euler-Maruyama. Metrics: fraction
    of samples with |x| > 4, NLL under the true mixture with and without them, sliced W2
    to fresh data, and the model's eps error in the bulk and in the prior's tail."""
    name = "mixture3"
    di = cfg["datasets"].index(name) if name in cfg["datasets"] else 0
    gen = torch.Generator().manual_seed(seed + 100 * di)
    data = make_dataset(name, cfg["train_points"], generator=gen, dtype=torch.float32)
    mix = benchmark_mixture_2d()
    n = cfg["n_samples"]
    ref = mix.sample(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    sde = build_model("vp", "mlp", (2,), "eps", net_kwargs=cfg["net_kwargs"]).sde
    x_t = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed + 7))
    tail = x_t.norm(dim=1) >= TAIL_RADIUS
    exact = mix.score_fn(sde)
    res: dict[str, Any] = {
        "dataset": name,
        "n": n,
        "x_T_tail_frac": float(tail.double().mean()),
        "models": {},
    }

    def quality(x: Tensor) -> dict:
        s = x.double()
        far = s.norm(dim=1) > STUDY_RADIUS
        lp = mix.log_prob(s)
        return {
            "nfe": None,
            "far_frac": float(far.double().mean()),
            "far_from_tail_x_T": int((far & tail).sum()),
            "far_count": int(far.sum()),
            "max_norm": float(s.norm(dim=1).max()),
            "nll": float(-lp.mean()),
            "nll_inliers": float(-lp[~far].mean()),
            "sw2": float(sliced_wasserstein(s, ref, generator=torch.Generator().manual_seed(3))),
        }

    for param in ("exact", *params):
        if param == "exact":
            score, dtype, block = exact, torch.float64, {}
        else:
            # The raw parameterizations (what this study was made with, before ScoreModel's
            # Gaussian preconditioning; `--part precond` compares the two).
            model = build_model(
                "vp",
                "mlp",
                (2,),
                param,
                net_kwargs=cfg["net_kwargs"],
                seed=seed,
                preconditioning="none",
            )
            trainer, log = _train(model, data, cfg, _ckdir_2d(workdir, name, param), seed)
            score, dtype = trainer.ema_model, torch.float32
            x0 = mix.sample(4000, generator=torch.Generator().manual_seed(seed + 2))
            err = _tail_eps_error(score, exact, sde, x0, torch.Generator().manual_seed(seed + 4))
            block = {"train": log, "eps_error": err}
        block["runs"] = {}
        for label, build in STUDY_SAMPLERS:
            sampler = build(sde)
            x = sampler.sample(
                score,
                (n, 2),
                x_init=x_t.to(dtype),
                generator=torch.Generator().manual_seed(seed + 8),
                dtype=dtype,
            )
            q = quality(x)
            q["nfe"] = sampler.nfe
            block["runs"][label] = q
            print(f"[params] {param} {label}: {q}", flush=True)
        res["models"][param] = block
    return res


# --- preconditioning: every parameterization under every sampler (issue 11) -----------------

PRECOND = {
    "full": {
        "train_points": 20_000,
        "net_kwargs": {},  # MLPScoreNet(dim=2) defaults: width 256, 4 blocks
        "steps": 3000,
        "batch_size": 256,
        "lr": 2e-3,
        "n_samples": 4000,
        "em_steps": 500,
        "heun_steps": 50,
        "dpm_steps": 20,
    },
    "quick": {
        "train_points": 1000,
        "net_kwargs": {"hidden": 32, "num_blocks": 1, "embed_dim": 16},
        "steps": 40,
        "batch_size": 128,
        "lr": 2e-3,
        "n_samples": 300,
        "em_steps": 40,
        "heun_steps": 10,
        "dpm_steps": 10,
    },
}
PRECONDITIONINGS = ("none", "gaussian")


def weighted_ring() -> Any:
    """8 Gaussians on a circle of radius 2 (std 0.15), weights alternating 1 and 2: the
    set of issue 11."""
    from scoresde.toy import GaussianMixture

    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.tensor([1.0, 2.0] * 4), means, torch.full((8,), 0.15**2))


def _train_plain(model: Any, data: Tensor, cfg: dict, seed: int) -> dict:
    """The issue's recipe with the public API only: DSMLoss defaults, Adam, cosine decay
    of the learning rate over all steps, no EMA."""
    loss = DSMLoss(model.sde)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["steps"])
    gen = torch.Generator().manual_seed(seed + 1)
    hist = []
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        batch = data[torch.randint(0, data.shape[0], (cfg["batch_size"],), generator=gen)]
        value = loss(model, batch, generator=gen)
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        hist.append(value.detach())
    k = max(1, min(100, len(hist) // 10))
    h = torch.stack(hist)
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "loss_first": float(h[:k].mean()),
        "loss_last": float(h[-k:].mean()),
    }


def precond_study(cfg: dict, workdir: Path, out: Path, seed: int = 0) -> dict:
    """Each parameterization x {raw ("none"), Gaussian preconditioning}: the same data, seed
    and recipe; Euler-Maruyama, ODE Heun and DPM-Solver++ 2M from the SAME x_T. Metrics:
    sliced W2 to fresh data (and its floor), sample std, far samples |x| > 4 and how many of
    them started in the prior's tail, and the model's eps error in the bulk / the tail."""
    mix = weighted_ring()
    data = mix.sample(
        cfg["train_points"], generator=torch.Generator().manual_seed(seed), dtype=torch.float32
    )
    n = cfg["n_samples"]
    ref = mix.sample(n, generator=torch.Generator().manual_seed(seed + 123), dtype=torch.float64)
    floor = [
        float(
            sliced_wasserstein(
                mix.sample(n, generator=torch.Generator().manual_seed(seed + 200 + i)),
                ref,
                generator=torch.Generator().manual_seed(5),
            )
        )
        for i in range(3)
    ]
    sde = build_model("vp", "mlp", (2,)).sde
    exact = mix.score_fn(sde)
    x_T = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed + 7))
    tail = x_T.norm(dim=1) >= TAIL_RADIUS
    samplers = {
        f"Euler-Maruyama {cfg['em_steps']}": EulerMaruyamaSampler(sde, num_steps=cfg["em_steps"]),
        f"ODE heun {cfg['heun_steps']}": ODESampler(
            sde, method="heun", num_steps=cfg["heun_steps"]
        ),
        f"DPM-Solver++ 2M {cfg['dpm_steps']}": DPMSolverSampler(
            sde, num_steps=cfg["dpm_steps"], order=2
        ),
    }
    res: dict[str, Any] = {
        "config": cfg,
        "seed": seed,
        "data_std": float(data.std()),
        "sw2_floor": [sum(floor) / len(floor), float(torch.tensor(floor).std())],
        "x_T_tail_frac": float(tail.double().mean()),
        "samplers": list(samplers),
        "models": {},
    }
    scatter: dict[str, Tensor] = {"data": ref[:3000]}
    # The issue's case and every preconditioned model first, then the other raw models;
    # partial results are written after each model (a long run can be cut short).
    order = [("none", "eps")] + [("gaussian", p) for p in PARAMS]
    order += [("none", p) for p in PARAMS if p != "eps"]
    for pre, param in order:
        key = f"{param}/{pre}"
        model = build_model(
            "vp",
            "mlp",
            (2,),
            param,
            net_kwargs=cfg["net_kwargs"],
            seed=seed,
            preconditioning=pre,
        )
        ck = workdir / f"precond_{param}_{pre}.pt"
        if ck.exists():
            model.load_state_dict(torch.load(ck, weights_only=True))
            log = json.loads(ck.with_suffix(".json").read_text())
        else:
            log = _train_plain(model, data, cfg, seed)
            ck.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), ck)
            ck.with_suffix(".json").write_text(json.dumps(log))
        model.eval().requires_grad_(False)
        x0 = mix.sample(4000, generator=torch.Generator().manual_seed(seed + 2))
        err = _tail_eps_error(model, exact, sde, x0, torch.Generator().manual_seed(seed + 4))
        block: dict[str, Any] = {"train": log, "eps_error": err, "runs": {}}
        for label, sampler in samplers.items():
            x = sampler.sample(
                model, (n, 2), x_init=x_T, generator=torch.Generator().manual_seed(seed + 8)
            ).double()
            far = x.norm(dim=1) > STUDY_RADIUS
            block["runs"][label] = {
                "nfe": sampler.nfe,
                "sw2": float(
                    sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(5))
                ),
                "std": float(x.std()),
                "far_count": int(far.sum()),
                "far_from_tail_x_T": int((far & tail).sum()),
                "max_norm": float(x.norm(dim=1).max()),
            }
            if param == "eps" and label.startswith("ODE"):
                scatter[f"eps, {pre}: {label}"] = x[:3000]
            print(f"[precond] {key} {label}: {block['runs'][label]}", flush=True)
        em = next(iter(block["runs"].values()))["sw2"]
        for q in block["runs"].values():
            q["ratio_to_em"] = q["sw2"] / em
        res["models"][key] = block
        (out / "trained_precond.json").write_text(json.dumps(res, indent=1))
        _plot_precond(res, scatter, out / "trained_precond.png")
    return res


def _plot_precond(res: dict, scatter: dict[str, Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(scatter), figsize=(4.2 + 3.0 * len(scatter), 3.4))
    ax = axes[0]
    labels = list(res["models"])
    width = 0.8 / len(res["samplers"])
    for j, s in enumerate(res["samplers"]):
        vals = [res["models"][k]["runs"][s]["sw2"] for k in labels]
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=s)
    ax.axhline(res["sw2_floor"][0], color="k", ls="--", lw=1, label="two true sets")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("sliced W2 to fresh data")
    ax.set_title("parameterization / preconditioning", fontsize=9)
    ax.legend(fontsize=6)
    for ax, (label, pts) in zip(axes[1:], scatter.items(), strict=True):
        pts = pts.cpu()
        ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.4)
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _md_precond(r: dict, command: str) -> list[str]:
    c = r["config"]
    net = ", ".join(f"{k}={v}" for k, v in c["net_kwargs"].items()) or "defaults"
    ss = r["samplers"]
    lines = [
        "### Every parameterization under every sampler: ScoreModel's preconditioning",
        "",
        f"Issue 11's setup: {c['train_points']:,} points of 8 Gaussians on a circle of radius "
        "2 (std 0.15, weights alternating 1 and 2), `ScoreModel(MLPScoreNet(dim=2), "
        "VPSDE(), parameterization, preconditioning)` (network "
        f"{net}), `DSMLoss(VPSDE())` defaults, "
        f"Adam lr {c['lr']} with cosine decay over {c['steps']:,} steps, batch "
        f"{c['batch_size']}, seed {r['seed']}, no EMA, float32. {c['n_samples']:,} samples "
        "per run, every sampler from the SAME x_T. sliced W2 to fresh data (two true sets: "
        f"{_f(r['sw2_floor'][0])} +- {_f(r['sw2_floor'][1])}); ratio: to Euler-Maruyama on "
        f'the same model; data std {_f(r["data_std"], 2)}. "none" is the raw network '
        '(what ScoreModel did before); "gaussian" the default now. Command:',
        "",
        "```",
        command,
        "```",
        "",
        "| parameterization | preconditioning | "
        + " | ".join(f"{s}: sliced W2 (ratio)" for s in ss)
        + " | ODE std | far (from tail) |",
        "|---|---|" + "---|" * len(ss) + "---|---|",
    ]

    def rank(key: str) -> tuple[int, int]:
        param, pre = key.split("/")
        return PARAMS.index(param), PRECONDITIONINGS.index(pre)

    models = {k: r["models"][k] for k in sorted(r["models"], key=rank)}
    for key, b in models.items():
        param, pre = key.split("/")
        cells = [f"{_f(b['runs'][s]['sw2'])} ({_f(b['runs'][s]['ratio_to_em'], 2)})" for s in ss]
        ode = b["runs"][ss[1]]
        lines.append(
            f"| {param} | {pre} | " + " | ".join(cells) + f" | {_f(ode['std'], 2)} | "
            f"{ode['far_count']} ({ode['far_from_tail_x_T']}) |"
        )
    ts = list(next(iter(r["models"].values()))["eps_error"])
    lines += [
        "",
        "far: ODE samples with |x| > 4 (in brackets: how many started at |x_T| >= "
        f"{TAIL_RADIUS}; {100 * r['x_T_tail_frac']:.2f}% of the x_T did). The cause, "
        "measured: RMS error of the model's eps = -sigma score against the exact one at "
        "x = alpha x0 + sigma z, bulk (|z| < 2) / prior tail (|z| in [3.3, 4.5]):",
        "",
        "| model | DSM loss (last) | " + " | ".join(f"t = {t}" for t in ts) + " |",
        "|---" * (len(ts) + 2) + "|",
    ]
    for key, b in models.items():
        cells = [f"{_f(b['eps_error'][t]['bulk'])} / {_f(b['eps_error'][t]['tail'])}" for t in ts]
        lines.append(f"| {key} | {_f(b['train']['loss_last'])} | " + " | ".join(cells) + " |")
    worst = max(
        (
            b["runs"][s]["ratio_to_em"]
            for k, b in r["models"].items()
            if k.endswith("gaussian")
            for s in ss[1:]
        ),
        default=float("nan"),
    )
    lines += [
        "",
        f"With the preconditioning every parameterization's ODE and DPM-Solver++ samples are "
        f"within {_f(worst, 2)}x of Euler-Maruyama's sliced W2 (the issue asks for 1.5x). "
        "With sigma_data = 1 the four preconditioned parameterizations regress the same "
        "target up to sign and train to the same model; raw v-prediction already was that "
        "model. Figure: `trained_precond.png`.",
    ]
    return lines


def _plot_2d_samples(scatter: dict[str, dict[str, Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(scatter)
    cols = max(len(v) for v in scatter.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.3 * cols, 2.3 * len(rows)), squeeze=False)
    for i, name in enumerate(rows):
        items = [("data", scatter[name]["data"])]
        items += [(k, v) for k, v in scatter[name].items() if k != "data"]
        lim = float(scatter[name]["data"].abs().max()) * 1.25
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(items):
                ax.axis("off")
                continue
            label, pts = items[j]
            pts = pts.cpu()
            ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.4)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_title(f"{name}: {label}" if j == 0 else label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- digits -----------------------------------------------------------------------------------

NUM_BINS = 17  # digit pixels take the levels 0..16, mapped to [-1, 1]
DATA_RANGE = (-1.0, 1.0)
BIN = (DATA_RANGE[1] - DATA_RANGE[0]) / (NUM_BINS - 1)  # 0.125: the "levels" convention


def _se(v: Tensor) -> float:
    return float(v.std() / math.sqrt(v.numel()))


def _summary(bpd: Tensor) -> dict[str, float]:
    return {"bpd": float(bpd.mean()), "bpd_se": _se(bpd), "bpd_median": float(bpd.median())}


# sigma(eps) of the VP SDE at the likelihood's start time eps = 1e-5: sqrt(1 - e^{-beta_min
# eps + O(eps^2)}) = 1.0e-3. The model's density p_eps is a smoothing of its data
# distribution at this scale, so a Gaussian with this std floor is the like-for-like match.
SIGMA_EPS = 1e-3
FLOOR_BIN = BIN / math.sqrt(2 * math.pi)  # density at the mean <= 1/Delta: p Delta <= 1


def gaussian_baselines(x_train: Tensor, x_test: Tensor) -> dict[str, Tensor]:
    """Per-pixel and full-covariance Gaussians fitted on the train split: per-image test
    bits/dim `[N]` by name.

    Continuous variants use the SAME convention as the model: bpd = -log p(x) / (D ln 2)
    + log2(1/Delta) with p the Gaussian density at the (un-dequantized) test points. A
    density can exceed 1/Delta on a nearly constant pixel, so that number is not a bound on
    the discrete likelihood and it depends on the std floor; the per-pixel Gaussian is
    therefore also reported *discretized* (the exact probability mass of each pixel's bin,
    edges at the half levels, outer bins open: a proper discrete model).
    """
    tr = x_train.flatten(1).double()
    te = x_test.flatten(1).double()
    d = tr.shape[1]
    mean = tr.mean(0)
    out: dict[str, Tensor] = {}
    floors = (("std floor Delta/sqrt(2 pi)", FLOOR_BIN), ("std floor sigma(eps)=1e-3", SIGMA_EPS))
    for label, floor in floors:
        std = tr.std(0).clamp_min(floor)
        normal = torch.distributions.Normal(mean, std)
        logp = normal.log_prob(te).sum(1)
        out[f"per-pixel Gaussian, continuous, {label}"] = bits_per_dim(
            logp, x_test, NUM_BINS, DATA_RANGE
        )
        lo = torch.where(te <= DATA_RANGE[0] + 1e-6, -math.inf, te - BIN / 2)
        hi = torch.where(te >= DATA_RANGE[1] - 1e-6, math.inf, te + BIN / 2)
        mass = (normal.cdf(hi) - normal.cdf(lo)).clamp_min(1e-300)
        out[f"per-pixel Gaussian, discretized, {label}"] = -mass.log().sum(1) / (d * math.log(2))
    # Full covariance, shrunk toward its (floored) diagonal by a fixed amount.
    cov = torch.cov(tr.T)
    for shrink, floor, label in (
        (0.05, FLOOR_BIN, "std floor Delta/sqrt(2 pi)"),
        (0.2, FLOOR_BIN, "std floor Delta/sqrt(2 pi)"),
        (0.05, SIGMA_EPS, "std floor sigma(eps)=1e-3"),
    ):
        diag = torch.diag(cov.diagonal().clamp_min(floor**2))
        c = (1 - shrink) * cov + shrink * diag
        c = c + torch.diag((floor**2 - c.diagonal()).clamp_min(0))
        mvn = torch.distributions.MultivariateNormal(mean, covariance_matrix=c)
        out[f"full-covariance Gaussian, continuous, shrinkage {shrink}, {label}"] = bits_per_dim(
            mvn.log_prob(te), x_test, NUM_BINS, DATA_RANGE
        )
    return out


def _paired(model_bpd: Tensor, base_bpd: Tensor) -> dict[str, float]:
    """Per-image difference model - baseline: mean, s.e. and the fraction of images won."""
    diff = model_bpd.double() - base_bpd.double()
    return {
        "diff_mean": float(diff.mean()),
        "diff_se": _se(diff),
        "diff_median": float(diff.median()),
        "model_wins": float((diff < 0).double().mean()),
    }


def _grid(x: Tensor, nrow: int) -> Tensor:
    """[N, 1, 8, 8] in [-1, 1] -> one [rows*9, nrow*9] image in [0, 1]."""
    x = ((x.clamp(-1, 1) + 1) / 2)[:, 0]
    n = x.shape[0]
    rows = math.ceil(n / nrow)
    img = torch.ones(rows * 9 + 1, nrow * 9 + 1)
    for i in range(n):
        r, c = divmod(i, nrow)
        img[1 + 9 * r : 9 * r + 9, 1 + 9 * c : 9 * c + 9] = x[i]
    return img


def run_digits(cfg: dict, workdir: Path, out: Path, seed: int = 0) -> dict:
    split = load_digits_split()
    x_train, x_test = split.x_train, split.x_test
    if cfg["n_test"] is not None:
        x_test = x_test[: cfg["n_test"]]
    model = build_model(
        "vp", "unet", (1, 8, 8), "eps", net_kwargs={"channels": cfg["channels"]}, seed=seed
    )
    trainer, log = _train(model, x_train, cfg, workdir / "digits", seed)
    print(f"[digits] trained {log}", flush=True)
    score, sde = trainer.ema_model, trainer.ema_model.sde
    res: dict[str, Any] = {
        "config": {k: v for k, v in cfg.items() if k != "grid_runs"},
        "train": log,
        "n_train": x_train.shape[0],
        "n_test": x_test.shape[0],
        "offset_bits": dequantization_offset(NUM_BINS, DATA_RANGE),
    }
    baselines = gaussian_baselines(x_train, x_test)
    res["baselines"] = {k: _summary(v) for k, v in baselines.items()}
    print(f"[digits] baselines {res['baselines']}", flush=True)

    # Test bits/dim by the probability-flow ODE on the EMA model.
    t0 = time.perf_counter()
    lik = dataset_log_likelihood(
        score,
        sde,
        x_test,
        batch_size=128,
        num_bins=NUM_BINS,
        data_range=DATA_RANGE,
        trace="hutchinson",
        probe="rademacher",
        num_probes=cfg["num_probes"],
        method="dopri5",
        rtol=cfg["lik_rtol"],
        atol=cfg["lik_rtol"],
        generator=torch.Generator().manual_seed(seed + 3),
        progress=False,
    )
    res["model"] = {
        **_summary(lik.bpd),
        "continuous_bpd": -lik.mean_logp / (64 * math.log(2)),
        "nfe_total": lik.nfe,
        "batches": math.ceil(x_test.shape[0] / 128),
        "seconds": time.perf_counter() - t0,
        "method": (
            f"EMA model, dopri5 rtol=atol={cfg['lik_rtol']} (batch of 128 shares steps), "
            f"Hutchinson trace with {cfg['num_probes']} Rademacher probes, eps=1e-5, float32"
        ),
    }
    res["model_bpd_per_image"] = [round(v, 4) for v in lik.bpd.tolist()]
    res["paired"] = {k: _paired(lik.bpd, v) for k, v in baselines.items()}
    print(f"[digits] model {res['model']}", flush=True)
    # Solver-tolerance check: the first batch again at 10x tighter tolerances, same probes.
    nchk = min(128, x_test.shape[0])
    t0 = time.perf_counter()
    chk = dataset_log_likelihood(
        score,
        sde,
        x_test[:nchk],
        batch_size=128,
        num_bins=NUM_BINS,
        data_range=DATA_RANGE,
        trace="hutchinson",
        num_probes=cfg["num_probes"],
        method="dopri5",
        rtol=cfg["lik_rtol"] / 10,
        atol=cfg["lik_rtol"] / 10,
        generator=torch.Generator().manual_seed(seed + 3),
        progress=False,
    )
    res["tolerance_check"] = {
        "n": nchk,
        "rtol": cfg["lik_rtol"] / 10,
        "bpd": chk.mean_bpd,
        "bpd_at_main_rtol": float(lik.bpd[:nchk].mean()),
        "max_abs_diff": float((chk.bpd - lik.bpd[:nchk]).abs().max()),
        "nfe": chk.nfe,
        "seconds": time.perf_counter() - t0,
    }
    print(f"[digits] tolerance check {res['tolerance_check']}", flush=True)

    # Sample quality against NFE: Frechet distance in pixel space to the test set.
    fd_ref = float(frechet_distance(x_train.double(), x_test.double()))
    res["fd_train_vs_test"] = fd_ref
    n = cfg["n_samples"]
    res["fd_runs"] = []
    grids: dict[str, Tensor] = {}
    wanted = {(a, b) for a, b in cfg["grid_runs"]}
    names = ("DDIM", "DPM-Solver++ 2M", "EDM Heun", "PC", "Euler-Maruyama")
    runs = _sampler_runs({**cfg, "long_nfes": []}, names)
    for nm, nfe in runs:
        try:
            sampler = _build_sampler(nm, sde, nfe)
        except ValueError as err:  # e.g. PC's discrete chain needs enough steps
            res["fd_runs"].append({"sampler": nm, "nfe_target": nfe, "error": str(err)})
            continue
        t0 = time.perf_counter()
        x = sampler.sample(score, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed + 11))
        secs = time.perf_counter() - t0
        fd = float(frechet_distance(x.double().clamp(-1, 1), x_test.double()))
        res["fd_runs"].append({"sampler": nm, "nfe": sampler.nfe, "fd": fd, "seconds": secs})
        print(f"[digits] {nm} nfe={sampler.nfe} FD={fd:.3f} ({secs:.1f}s)", flush=True)
        if (nm, nfe) in wanted:
            grids[f"{nm}, {sampler.nfe} NFE"] = x[:64]
    grids = {"test data": x_test[:64], **grids}
    _plot_digit_grids(grids, out / "trained_digits_samples.png")
    return res


def dequantized_bound(cfg: dict, workdir: Path, seed: int = 0) -> dict:
    """A true upper bound on the digits model's *discrete* test bits/dim.

    For any q(u | x) supported inside x's bin, log P(x) = log int_bin p(x + u) du
    >= E_q[log p(x + u)] - E_q[log q(u)] (Jensen). With u uniform on (-a, a)^D, a <= Delta/2:

        bpd <= -E_u[log p_eps(x + u)] / (D ln 2) - log2(2 a).

    a = Delta/2 is the usual uniform dequantization; a smaller a suits a model whose
    density has learned that the data sit on the 17 levels (spikes much narrower than
    Delta). One draw of u per image (unbiased for the expectation).
    """
    split = load_digits_split()
    x_test = split.x_test[: min(128, cfg["n_test"] or split.x_test.shape[0])]
    model = build_model(
        "vp", "unet", (1, 8, 8), "eps", net_kwargs={"channels": cfg["channels"]}, seed=seed
    )
    trainer, _ = _train(model, split.x_train, cfg, workdir / "digits", seed)
    score, sde = trainer.ema_model, trainer.ema_model.sde
    out: dict[str, Any] = {"n": x_test.shape[0], "bounds": []}
    gen = torch.Generator().manual_seed(seed + 5)
    for a in (BIN / 2, 4e-3):
        u = (torch.rand(x_test.shape, generator=gen) * 2 - 1) * a
        t0 = time.perf_counter()
        lik = dataset_log_likelihood(
            score,
            sde,
            x_test + u,
            batch_size=128,
            trace="hutchinson",
            num_probes=cfg["num_probes"],
            method="dopri5",
            rtol=cfg["lik_rtol"],
            atol=cfg["lik_rtol"],
            generator=torch.Generator().manual_seed(seed + 3),
            progress=False,
        )
        bound = -lik.logp.double() / (64 * math.log(2)) - math.log2(2 * a)
        row = {"a": a, **_summary(bound), "nfe": lik.nfe, "seconds": time.perf_counter() - t0}
        out["bounds"].append(row)
        print(f"[digits-bound] {row}", flush=True)
    return out


def _plot_digit_grids(grids: dict[str, Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(2.8 * len(grids), 3.0), squeeze=False)
    for ax, (label, x) in zip(axes[0], grids.items(), strict=True):
        ax.imshow(_grid(x.cpu().float(), 8), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- report -----------------------------------------------------------------------------------


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _md_2d(res: dict) -> list[str]:
    lines: list[str] = []
    for name, b in res["datasets"].items():
        tr = b["train"]
        lines += [
            f"### {name}",
            "",
            f"MLPScoreNet({res['config']['net_kwargs']}) ({tr['params']:,} parameters), VP SDE, "
            f"{res.get('param', 'eps')} parameterization, {tr['steps']} steps of batch "
            f"{res['config']['batch_size']} "
            f"(lr {res['config']['lr']}, cosine decay), "
            + (
                "resumed from its checkpoint"
                if tr["resumed_from_step"] >= tr["steps"]
                else f"trained in {_f(tr['train_seconds_this_run'], 0)} s"
            )
            + "; DSM loss "
            f"{_f(tr['loss_first'])} -> {_f(tr['loss_last'])}. {res['config']['n_samples']:,} "
            f"samples per run (EMA weights, float32). sliced W2 floor (two true sets): "
            f"{_f(b['sw2_floor'][0])} +- {_f(b['sw2_floor'][1])}"
            + (
                f"; NLL of true samples under the mixture: {_f(b['data_nll'])} "
                f"+- {_f(b['data_nll_se'])}; their mode-weight error {_f(b['data_mode_err'])}. "
                "Outliers: samples less likely under the truth than the least likely of "
                f"{res['config']['n_samples']:,} true samples (a perfect sampler: ~0.02%)."
                if "data_nll" in b
                else "."
            ),
            "",
        ]
        exact = "data_nll" in b
        head = "| sampler | NFE | sliced W2 |" + (
            " NLL | outliers | NLL w/o outliers | mode err |" if exact else ""
        )
        lines += [head, "|---" * (head.count("|") - 1) + "|"]
        for r in b["runs"]:
            if "error" in r:
                lines.append(f"| {r['sampler']} | ({r['nfe_target']}) | not run: too few steps |")
                continue
            row = f"| {r['sampler']} | {r['nfe']} | {_f(r['sw2'])} |"
            if exact:
                row += (
                    f" {_f(r['nll'])} | {100 * r['outlier_frac']:.2f}% | "
                    f"{_f(r['nll_inliers'])} | {_f(r['mode_err'])} |"
                )
            lines.append(row)
        ode = [
            r["sw2"]
            for r in b["runs"]
            if "error" not in r
            and r["sampler"] not in (*SDE_SAMPLERS, "AdaptiveSDE")
            and (r["nfe"] or 0) >= 80
        ]
        sdes = [
            r["sw2"]
            for r in b["runs"]
            if "error" not in r
            and r["sampler"] in (*SDE_SAMPLERS, "AdaptiveSDE")
            and (r["nfe"] or 0) >= 100
        ]
        if ode and sdes and min(ode) > 3 * max(b["sw2_floor"][0], min(sdes)):
            lines += [
                "",
                f"Every probability-flow ODE sampler (>= 80 NFE) converges to sliced W2 "
                f"{_f(min(ode))}..{_f(max(ode))} while the SDE samplers reach {_f(min(sdes))} "
                f"(floor {_f(b['sw2_floor'][0])}): the ODE solutions agree with each other, so "
                "this is the learned model's flow, not a solver error. A few samples (about "
                "1%) are carried far out; they start in the prior's tail (|x_T| > ~3.3), where "
                "the network was rarely trained at intermediate t; the SDE samplers' noise "
                "and contraction correct such errors, the deterministic flow does not (see "
                '"Parameterization and ODE samplers": an eps-model problem).',
            ]
        lk = b["likelihood"]
        lines += [
            "",
            f"Held-out likelihood ({lk['n']} fresh points, {lk['method']}, "
            f"{lk['nfe']} NFE): model NLL {_f(lk['model_nll'])} +- "
            f"{_f(lk['model_nll_se'])} nats"
            + (
                f", exact mixture NLL {_f(lk['exact_nll'])}; gap (model - exact) "
                f"{_f(lk['gap_mean'])} +- {_f(lk['gap_se'])} nats "
                f"({_f(lk['gap_mean'] / (2 * math.log(2)))} bits/dim)."
                if "exact_nll" in lk
                else "."
            ),
            "",
        ]
    return lines


def _md_params(r: dict, command: str) -> list[str]:
    lines = [
        "### Parameterization and ODE samplers",
        "",
        "Why every probability-flow ODE sampler threw ~1% far outliers (|x| up to 60-90, "
        "more NFE no help) on raw eps-models, the parameterization this benchmark first used, "
        f"while SDE samplers did not. {r['dataset']} models trained exactly as in the 2-D "
        "part (same data, seed, network and steps) with each parameterization, and the "
        "exact score, sampled from "
        f"the SAME {r['n']:,} x_T ({100 * r['x_T_tail_frac']:.2f}% of them with |x_T| >= "
        f"{TAIL_RADIUS}). far: |x| > {STUDY_RADIUS} (mixture3's modes lie within |x| < 2.5; "
        '"from tail": how many of those started at |x_T| >= '
        f"{TAIL_RADIUS}). NLL under the true mixture (true samples: ~1.26), NLL without "
        "the far samples, sliced W2 to fresh data (floor ~0.07). Command:",
        "",
        "```",
        command,
        "```",
        "",
        "| score | sampler | NFE | far | from tail | max abs x | NLL | NLL w/o far | sliced W2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for param, b in r["models"].items():
        label = "exact (no model)" if param == "exact" else f"{param}-model"
        for sname, q in b["runs"].items():
            lines.append(
                f"| {label} | {sname} | {q['nfe']} | {100 * q['far_frac']:.2f}% | "
                f"{q['far_from_tail_x_T']}/{q['far_count']} | {_f(q['max_norm'], 1)} | "
                f"{_f(q['nll'])} | {_f(q['nll_inliers'])} | {_f(q['sw2'])} |"
            )
    models = {k: v for k, v in r["models"].items() if "eps_error" in v}
    if models:
        ts = list(next(iter(models.values()))["eps_error"])
        lines += [
            "",
            "RMS error of the model's eps = -sigma score against the exact one at x = alpha "
            "x0 + sigma z, for bulk noise (|z| < 2) / prior-tail noise (|z| in [3.3, 4.5]):",
            "",
            "| model | DSM loss (last) | " + " | ".join(f"t = {t}" for t in ts) + " |",
            "|---" * (len(ts) + 2) + "|",
        ]
        for param, b in models.items():
            cells = [
                f"{_f(b['eps_error'][t]['bulk'])} / {_f(b['eps_error'][t]['tail'])}" for t in ts
            ]
            lines.append(f"| {param} | {_f(b['train']['loss_last'])} | " + " | ".join(cells) + " |")
    eps, v = r["models"].get("eps"), r["models"].get("v")
    if eps and v and "ODE heun, 100 steps" in eps["runs"]:
        q_eps, q_v = eps["runs"]["ODE heun, 100 steps"], v["runs"]["ODE heun, 100 steps"]
        n_tail = round(r["x_T_tail_frac"] * r["n"])
        hi = [t for t in eps["eps_error"] if float(t) >= 0.6]
        e_eps = [eps["eps_error"][t]["tail"] for t in hi]
        e_v = [v["eps_error"][t]["tail"] for t in hi]
        lines += [
            "",
            "Reading: the exact score from the same x_T puts no sample beyond |x| = "
            f"{STUDY_RADIUS:g} with any solver, so the solvers are not the cause. The eps-model's "
            f"ODE and DPM-Solver++ runs both throw {q_eps['far_count']} samples far out (up "
            f"to |x| = {_f(q_eps['max_norm'], 0)}), and {q_eps['far_from_tail_x_T']} of them "
            f"start among the {n_tail} x_T with |x_T| >= {TAIL_RADIUS}; Euler-Maruyama from the "
            "same x_T does not. In the prior's tail at high noise the eps-network must output "
            "eps ~ sigma x, outside what it saw in training: its tail eps error at t >= 0.6 is "
            f"{_f(min(e_eps), 2)}..{_f(max(e_eps), 2)} against ~0.01-0.03 in the bulk. The "
            "probability-flow ODE run backward, dx/ds = (beta/2) (x - eps/sigma), is neutral "
            "there (N(0, I) flows to itself) and does not damp that error; a too-small eps "
            "pushes x outward, and through x0 = (x - sigma eps) / alpha an eps error e at "
            "t = T moves the end point by up to e / alpha(T) ~ 150 e. The reverse SDE's "
            "drift, (beta/2) x - beta eps/sigma, contracts at rate ~beta/2 there, hence its "
            "clean samples. v-prediction writes eps = sigma x + alpha v (VP): the part the tail "
            "needs is exact and the network's error is scaled by alpha (0.007 at t = T), so its "
            f"tail eps error at t >= 0.6 is {_f(min(e_v), 3)}..{_f(max(e_v), 3)} and no sample "
            f"goes far (ODE NLL {_f(q_v['nll'])}, sliced W2 {_f(q_v['sw2'])}). x0-prediction "
            "also has no far samples but a worse sliced W2 under the ODE; score-prediction "
            "still has a few. One seed and one training budget; the 2-D part above therefore "
            "trains v-models by default (`--param v`). These are raw networks "
            '(`preconditioning="none"`); ScoreModel\'s Gaussian preconditioning, the default '
            "now, gives every parameterization what v had (next section).",
        ]
    return lines


EPS_VS_RUNS = (
    ("ODE heun", 100),
    ("DPM-Solver++ 2M", 20),
    ("EDM Heun", 100),
    ("ODE dopri5 rtol=1e-3", None),
    ("Euler-Maruyama", 1000),
)


def _md_eps_vs(eps: dict, other: dict) -> list[str]:
    """The whole 2-D part with eps-models (trained_2d_eps.json) against the default."""
    param = other.get("param", "eps")
    lines = [
        f"The full 2-D part with eps-models against the {param}-models above (same data, seed, "
        "network, training and x_T), made by `python benchmarks/trained.py --part 2d --param "
        "eps --out /tmp/eps && cp /tmp/eps/trained_2d.json "
        "benchmarks/results/trained_2d_eps.json`. Cells: eps / "
        f"{param}.",
        "",
        "| dataset | sampler | NFE | sliced W2 | NLL | outliers |",
        "|---|---|---|---|---|---|",
    ]
    for name, b_eps in eps["datasets"].items():
        b_oth = other["datasets"].get(name)
        if b_oth is None:
            continue
        for sname, target in EPS_VS_RUNS:
            pair = []
            for b in (b_eps, b_oth):
                rows = [
                    r
                    for r in b["runs"]
                    if "error" not in r
                    and r["sampler"] == sname
                    and (target is None or abs(r["nfe_target"] - target) <= 1)
                ]
                pair.append(rows[0] if rows else None)
            if None in pair:
                continue
            a, c = pair
            nfe = a["nfe"] if a["nfe"] == c["nfe"] else f"{a['nfe']} / {c['nfe']}"
            row = f"| {name} | {sname} | {nfe} | {_f(a['sw2'])} / {_f(c['sw2'])} |"
            if "nll" in a:
                row += (
                    f" {_f(a['nll'])} / {_f(c['nll'])} | {100 * a['outlier_frac']:.2f}% / "
                    f"{100 * c['outlier_frac']:.2f}% |"
                )
            else:
                row += " - | - |"
            lines.append(row)
        lk_e, lk_o = b_eps["likelihood"], b_oth["likelihood"]
        lines.append(
            f"| {name} | held-out NLL (PF ODE) | | | {_f(lk_e['model_nll'])} / "
            f"{_f(lk_o['model_nll'])} | |"
        )
    return lines


def _md_digits(d: dict) -> list[str]:
    tr, m = d["train"], d["model"]
    c = d["config"]
    lines = [
        f"U-Net (channels {c['channels']}, {tr['params']:,} parameters, unconditional, VP, "
        f"eps) trained {tr['steps']} steps, batch {c['batch_size']}, lr {c['lr']} (warm-up "
        f"{c['warmup']}, cosine decay), DSM loss {_f(tr['loss_first'])} -> "
        f"{_f(tr['loss_last'])}, {_f(tr['seconds_per_step'])} s/step wall clock on a 2-core "
        "CPU shared with other jobs (load average ~5-7). "
        f"Train split {d['n_train']} images, test split {d['n_test']}.",
        "",
        "Bits/dim convention: the 17 pixel levels 0..16 are mapped to [-1, 1] (bin width "
        f"Delta = 2/16), bpd = -log p(x) / (64 ln 2) + log2(1/Delta) = ... + "
        f"{_f(d['offset_bits'])} (`bits_per_dim(logp, x, num_bins=17, data_range=(-1, 1))`, "
        '"levels" convention), p the continuous density at the test points. The same '
        "offset is applied to every continuous model below.",
        "",
        "| model (test split) | mean bits/dim +- s.e. | median | model - this, per image "
        "(mean +- s.e.) | images where the model is better |",
        "|---|---|---|---|---|",
        f"| **diffusion U-Net, PF-ODE** ({m['nfe_total']} NFE over {m['batches']} batches, "
        f"{_f(m['seconds'], 0)} s) | **{_f(m['bpd'])} +- {_f(m['bpd_se'])}** | "
        f"{_f(m.get('bpd_median'))} | | |",
    ]
    for k, v in d["baselines"].items():
        pr = d.get("paired", {}).get(k)
        cmp = (
            f"{_f(pr['diff_mean'])} +- {_f(pr['diff_se'])} | {100 * pr['model_wins']:.0f}%"
            if pr
            else "- | -"
        )
        lines.append(
            f"| {k} | {_f(v['bpd'])} +- {_f(v['bpd_se'])} | {_f(v.get('bpd_median'))} | {cmp} |"
        )
    lines += [
        "",
        'Reading the table: "continuous" numbers (the diffusion model\'s and the '
        "Gaussians') evaluate a density at the 17 levels themselves and add log2(1/Delta) "
        "= 3 bits. That is the usual convention, but not a bound on a discrete likelihood: a "
        "density narrower than a bin (p Delta > 1) earns negative bits. The diffusion "
        "model's p_eps (eps = 1e-5, sigma(eps) = 1e-3) has learned that pixels sit on the "
        "levels: its -log p / (64 ln 2) alone is "
        f"{_f(m.get('continuous_bpd'))} bits/dim, so its number in this convention is "
        "optimistic; the uniform-dequantization bound below is the honest one. The "
        '"discretized" per-pixel Gaussian integrates each pixel\'s density over its bin: a '
        "proper discrete model, whose bits/dim is a true code length. A Gaussian std floor "
        "of Delta/sqrt(2 pi) keeps p Delta <= 1 per pixel; 1e-3 = sigma(eps) matches the "
        "model's smoothing but lets a Gaussian collapse on blank border pixels (one test "
        "image has ink on a pixel that is blank in all 1438 training images: its mean "
        "explodes, hence the medians and the per-image paired differences).",
    ]
    db = d.get("dequantized_bound")
    if db:
        lines += [
            "",
            f"A true upper bound on the model's discrete bits/dim (first {db['n']} test "
            "images): bpd <= -E_u[log p_eps(x + u)] / (64 ln 2) - log2(2a), u uniform on "
            "(-a, a)^64 inside each pixel's bin (Jensen; one draw of u per image, same ODE "
            "settings). a = Delta/2 is plain uniform dequantization.",
            "",
            "| a | bits/dim bound +- s.e. | median | NFE |",
            "|---|---|---|---|",
        ]
        for b in db["bounds"]:
            lines.append(
                f"| {b['a']:g} | {_f(b['bpd'])} +- {_f(b['bpd_se'])} | {_f(b['bpd_median'])} "
                f"| {b['nfe']} |"
            )
        same = db.get("baselines_same_images", {})
        if same:
            lines += ["", f"The baselines on the same {db['n']} images:", ""]
            lines += [f"- {k}: {_f(v['bpd'])} +- {_f(v['bpd_se'])}" for k, v in same.items()]
    tc = d.get("tolerance_check")
    if tc:
        lines += [
            "",
            f"Solver check: the first {tc['n']} test images again at rtol=atol={tc['rtol']} "
            f"(same probes): {_f(tc['bpd'])} bits/dim vs {_f(tc['bpd_at_main_rtol'])}, "
            f"largest per-image change {_f(tc['max_abs_diff'])} ({tc['nfe']} NFE, "
            f"{_f(tc['seconds'], 0)} s).",
        ]
    lines += [
        "",
        f"Likelihood method: {m['method']}.",
        "",
        "Sample quality: squared Frechet distance in pixel space (64-D Gaussians fitted to "
        f"{c['n_samples']} samples vs the test split; samples clamped to [-1, 1]). Floor: "
        f"train split vs test split = {_f(d['fd_train_vs_test'])}.",
        "",
        "| sampler | NFE | FD | seconds |",
        "|---|---|---|---|",
    ]
    for r in d["fd_runs"]:
        if "error" in r:
            lines.append(f"| {r['sampler']} | ({r['nfe_target']}) | not run: too few steps | - |")
            continue
        lines.append(f"| {r['sampler']} | {r['nfe']} | {_f(r['fd'])} | {_f(r['seconds'], 1)} |")
    return lines


def _plot_summary(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "2d" in res:
        for name, b in res["2d"]["datasets"].items():
            key = "nll_inliers" if "data_nll" in b else "sw2"
            panels.append((name, b, key))
    has_digits = "digits" in res
    ncol = len(panels) + int(has_digits)
    fig, axes = plt.subplots(1, max(ncol, 1), figsize=(4.2 * max(ncol, 1), 3.6), squeeze=False)
    for ax, (name, b, key) in zip(axes[0], panels, strict=False):
        by: dict[str, list[tuple[int, float]]] = {}
        for r in b["runs"]:
            if "error" in r:
                continue
            if r["nfe_target"] is not None and math.isfinite(r[key]):
                by.setdefault(r["sampler"], []).append((r["nfe"], r[key]))
        for s, pts in by.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=s)
        for r in b["runs"]:
            if "error" not in r and r["nfe_target"] is None and math.isfinite(r[key]):
                ax.scatter([r["nfe"]], [r[key]], marker="*", s=60, label=r["sampler"])
        if key == "nll_inliers":
            ax.axhline(b["data_nll"], color="k", ls="--", lw=1, label="true samples")
            ax.set_ylabel("NLL under the true mixture (outliers removed)")
        else:
            ax.axhline(b["sw2_floor"][0], color="k", ls="--", lw=1, label="floor")
            ax.set_ylabel("sliced W2 to fresh data")
        if by:
            ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(f"{name} (trained MLP)")
        ax.legend(fontsize=6)
    if has_digits:
        ax = axes[0][-1]
        d = res["digits"]
        by = {}
        for r in d["fd_runs"]:
            if "error" in r:
                continue
            by.setdefault(r["sampler"], []).append((r["nfe"], r["fd"]))
        for s, pts in by.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=s)
        ax.axhline(d["fd_train_vs_test"], color="k", ls="--", lw=1, label="train vs test")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("pixel-space Frechet distance to test set")
        ax.set_title("8x8 digits (trained U-Net)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, commands: list[str], quick: bool = False) -> dict:
    res: dict[str, Any] = {
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        }
    }
    for part in ("2d", "digits", "digits_bound", "params", "2d_eps", "precond"):
        p = out / f"trained_{part}.json"
        if p.exists():
            res[part] = json.loads(p.read_text())
    if "digits" in res and "digits_bound" in res:
        db = res["digits"]["dequantized_bound"] = res.pop("digits_bound")
        split = load_digits_split()
        same = gaussian_baselines(split.x_train, split.x_test[: db["n"]])
        db["baselines_same_images"] = {k: _summary(v) for k, v in same.items()}
    if "2d" in res:  # the parameterization the 2-D JSON was made with, not today's default
        param = res["2d"].get("param", "eps")
        commands = [c + f" --param {param}" if c.endswith("--part 2d") else c for c in commands]
    res["commands"] = commands
    (out / "trained.json").write_text(json.dumps(res, indent=1))
    lines = [
        "## Trained models: learned scores on 2-D sets and the 8x8 digits",
        "",
        "Commands (one thread; the parts can run side by side, then merge):",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    if "digits" in res:
        lines += [
            "### 8x8 digits: test bits/dim and sample quality",
            "",
            *_md_digits(res["digits"]),
            "",
        ]
    if "2d" in res:
        lines += ["### 2-D sets: sample quality against NFE", "", *_md_2d(res["2d"])]
    if "params" in res:
        cmd = f"python benchmarks/trained.py{' --quick' if quick else ''} --part params"
        lines += [*_md_params(res["params"], cmd), ""]
    if "2d_eps" in res and "2d" in res:
        lines += [*_md_eps_vs(res["2d_eps"], res["2d"]), ""]
    if "precond" in res:
        cmd = f"python benchmarks/trained.py{' --quick' if quick else ''} --part precond"
        lines += [*_md_precond(res["precond"], cmd), ""]
    lines += [
        "Figures: `trained.png` (quality against NFE), `trained_2d_samples.png`, "
        "`trained_digits_samples.png`.",
        "",
    ]
    (out / "trained.md").write_text("\n".join(lines))
    _plot_summary(res, out / "trained.png")
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size (< 1 minute)")
    parser.add_argument(
        "--part",
        choices=("all", "2d", "digits", "digits-bound", "params", "precond", "report"),
        default="all",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="checkpoints (resumed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--param",
        choices=PARAMS,
        default=DEFAULT_PARAM,
        help="parameterization of the 2-D models (the digits U-Net stays eps)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if args.quick else FULL
    workdir = args.workdir or Path(tempfile.gettempdir()) / (
        "scoresde_trained_quick" if args.quick else "scoresde_trained"
    )
    q = " --quick" if args.quick else ""
    commands = [
        f"python benchmarks/trained.py{q} --part 2d",
        f"python benchmarks/trained.py{q} --part digits",
        f"python benchmarks/trained.py{q} --part digits-bound",
        f"python benchmarks/trained.py{q} --part params",
        f"python benchmarks/trained.py{q} --part precond",
        f"python benchmarks/trained.py{q} --part report",
    ]
    if args.part in ("all", "2d"):
        r = run_2d(cfg["2d"], workdir, args.out, args.seed, args.param)
        (args.out / "trained_2d.json").write_text(json.dumps(r, indent=1))
    if args.part in ("all", "digits"):
        r = run_digits(cfg["digits"], workdir, args.out, args.seed)
        (args.out / "trained_digits.json").write_text(json.dumps(r, indent=1))
    if args.part in ("all", "digits-bound"):
        r = dequantized_bound(cfg["digits"], workdir, args.seed)
        (args.out / "trained_digits_bound.json").write_text(json.dumps(r, indent=1))
    if args.part in ("all", "params"):
        r = param_study(cfg["2d"], workdir, args.seed)
        (args.out / "trained_params.json").write_text(json.dumps(r, indent=1))
    if args.part in ("all", "precond"):
        r = precond_study(PRECOND["quick" if args.quick else "full"], workdir, args.out, args.seed)
        (args.out / "trained_precond.json").write_text(json.dumps(r, indent=1))
    if args.part in ("all", "report"):
        report(args.out, commands, args.quick)


if __name__ == "__main__":
    main()
