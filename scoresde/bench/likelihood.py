"""The likelihood suite: probability-flow log-likelihoods against the exact log-density.

On true samples x of a target mixture, with the exact score, the only errors of
`scoresde.log_likelihood` are the ODE solver's and (for Hutchinson) the trace estimator's,
so the estimate is compared with the exact log p_eps(x) (the density the ODE defines at its
start time eps) and with log p_0(x). The peer is what a user would write with torchdiffeq:
the same augmented ODE with the exact divergence by autograd (FFJORD-style), one
vector-Jacobian product per dimension.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde.bench.peers import CountingScore
from scoresde.bench.targets import TARGETS, at_one_time, make_sde, schedule_coefficients
from scoresde.flow import ProbabilityFlow
from scoresde.sdes import SDE

__all__ = ["run_likelihood", "torchdiffeq_log_likelihood"]


def torchdiffeq_log_likelihood(
    score: CountingScore, sde: SDE, x: Tensor, *, rtol: float, eps: float = 1e-5
) -> Tensor:
    """log p_eps(x) `[B]` by torchdiffeq's dopri5 on (x, delta) with the exact divergence.

    d/dt [x, delta] = [v, div v], v = f x - g^2 score / 2, from eps to T; then
    log p_eps(x) = log N(x_T; 0, prior_std^2 I) + delta(T).
    """
    from torchdiffeq import odeint

    dim = x.shape[1]
    flow = ProbabilityFlow(sde, at_one_time(score), coefficients=schedule_coefficients(sde))

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        y = state[0]
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            v = flow(t, y)
            div = sum(
                torch.autograd.grad(v[:, i].sum(), y, retain_graph=i < dim - 1)[0][:, i]
                for i in range(dim)
            )
        return v.detach(), div.detach()

    ts = torch.tensor([eps, sde.T], dtype=x.dtype, device=x.device)
    zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    z, delta = odeint(rhs, (x, zero), ts, rtol=rtol, atol=rtol, method="dopri5")
    return sde.prior_logp(z[-1]) + delta[-1]


def song_log_likelihood(
    score: CountingScore,
    sde: SDE,
    x: Tensor,
    *,
    rtol: float = 1e-5,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """log p_eps(x) `[B]` the way Song et al.'s likelihood code computes it (written from its
    description): scipy's RK45 (`solve_ivp`) on the flattened float64 numpy state (x, delta),
    the probability-flow drift from `sde.reverse(score, probability_flow=True)` and its
    divergence by one fixed Rademacher Hutchinson probe and autograd, in float32, with
    numpy <-> torch round trips at every evaluation."""
    import numpy as np
    from scipy import integrate

    shape, B = x.shape, x.shape[0]
    data = x.detach().to(torch.float32)
    probe = torch.randint(0, 2, shape, generator=generator).to(data) * 2 - 1
    rsde = sde.reverse(score, probability_flow=True)

    def ode_func(t: float, y: Any) -> Any:
        sample = torch.from_numpy(y[:-B]).reshape(shape).to(torch.float32)
        vec_t = torch.full((B,), t, dtype=torch.float32)
        with torch.enable_grad():
            sample.requires_grad_(True)
            drift = rsde.sde(sample, vec_t)[0]
            (grad,) = torch.autograd.grad((drift * probe).sum(), sample)
        div = (grad * probe).reshape(B, -1).sum(1)
        return np.concatenate([drift.detach().reshape(-1).numpy(), div.numpy()])

    init = np.concatenate([data.reshape(-1).numpy(), np.zeros(B)])
    sol = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=rtol, method="RK45")
    z = torch.from_numpy(sol.y[:-B, -1]).reshape(shape).to(x)
    delta = torch.from_numpy(sol.y[-B:, -1]).to(x)
    return sde.prior_logp(z) + delta


def _stats(est: Tensor, exact: Tensor) -> dict[str, float]:
    diff = est - exact
    return {
        "rms_err": float(diff.pow(2).mean().sqrt()),
        "mean_abs_err": float(diff.abs().mean()),
        "bias": float(diff.mean()),
        "std": float(diff.std()) if diff.numel() > 1 else 0.0,
        "max_abs_err": float(diff.abs().max()),
    }


def _measure(
    fn, score: CountingScore, exact_eps: Tensor, exact_0: Tensor, tight: Tensor | None
) -> dict[str, Any]:
    """Run one estimator and compare it with the exact log-densities and, where given, with
    a tight solve of the same ODE (its solver-only error). Failures are reported."""
    score.nfe = 0
    score.evals = 0
    row: dict[str, Any] = {}
    try:
        start = time.perf_counter()
        est = fn()
        row["seconds"] = time.perf_counter() - start
        row["nfe"] = score.nfe
        # Score evaluations per sample: below the NFE when samples leave the batch early
        # (the per-sample solver) -- what one sample alone would cost.
        row["evals_per_sample"] = score.evals / est.shape[0]
        row["vs_p_eps"] = _stats(est, exact_eps)
        row["vs_p_0"] = _stats(est, exact_0)
        if tight is not None:
            row["vs_tight"] = _stats(est, tight)
        row["mean_nll"] = float(-est.mean())
    except Exception as err:  # reported, not fatal
        row["error"] = f"{type(err).__name__}: {err}"
    return row


# (label, log_likelihood keyword arguments) per mode; the torchdiffeq peer at PEER_RTOLS.
FULL_RUNS: list[tuple[str, dict[str, Any]]] = [
    *[("exact", dict(method="dopri5", rtol=r, atol=r)) for r in (5e-3, 1e-3, 1e-4, 1e-5)],
    *[
        ("exact", dict(method="dopri5_per_sample", rtol=r, atol=r))
        for r in (3e-3, 2e-3, 1e-3, 3e-4, 1e-4, 3e-5)
    ],
    *[
        ("hutchinson", dict(method="dopri5_per_sample", rtol=1e-4, atol=1e-4, num_probes=k))
        for k in (1, 4, 16)
    ],
]
QUICK_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("exact", dict(method="dopri5", rtol=1e-3, atol=1e-3)),
    ("exact", dict(method="dopri5_per_sample", rtol=1e-3, atol=1e-3)),
    ("hutchinson", dict(method="dopri5_per_sample", rtol=1e-3, atol=1e-3, num_probes=1)),
]
TIGHT_RTOL = 1e-9
# Above 2-D the exact trace costs D vector-Jacobian products per evaluation and the tight
# reference solve hundreds of evaluations, so fewer samples there.
HIGH_DIM_N = 300


def _setting(kw: dict[str, Any]) -> str:
    text = f"{kw['method']} rtol=atol={kw['rtol']:g}"
    return text + (f", {kw['num_probes']} probe(s)" if "num_probes" in kw else "")


def _likelihood_block(
    name: str,
    n: int,
    runs: list[tuple[str, dict[str, Any]]],
    peer_rtols: tuple[float, ...],
    seed: int,
    eps: float,
    lik: Any,
) -> dict[str, Any]:
    mixture = TARGETS[name].mixture()
    sde = make_sde("vp")
    x = mixture.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact_eps = mixture.log_prob_fn(sde)(x, eps)
    exact_0 = mixture.log_prob(x)
    score = CountingScore(sde, mixture)
    tight = None
    if lik is not None:
        # The same ODE solved far tighter: the difference to it is the solver's error alone
        # (the rest, vs the exact density, is the N(0, I) prior's mismatch with p_T).
        tight = lik.log_likelihood(
            score, sde, x, trace="exact", rtol=TIGHT_RTOL, atol=TIGHT_RTOL, eps=eps
        ).logp
    labelled: list[tuple[str, str, Any]] = []
    for trace, kw in runs if lik is not None else []:

        def scoresde_run(trace=trace, kw=kw) -> Tensor:
            gen = torch.Generator().manual_seed(seed)
            res = lik.log_likelihood(score, sde, x, trace=trace, eps=eps, generator=gen, **kw)
            return res.logp

        labelled.append((f"scoresde log_likelihood ({trace})", _setting(kw), scoresde_run))
    for rtol in peer_rtols:

        def peer_run(rtol=rtol) -> Tensor:
            return torchdiffeq_log_likelihood(score, sde, x, rtol=rtol, eps=eps)

        labelled.append(
            ("torchdiffeq + autograd (exact trace)", f"dopri5 rtol=atol={rtol:g}", peer_run)
        )
    if len(peer_rtols) > 1 and importlib.util.find_spec("scipy") is not None:  # full mode

        def song_run() -> Tensor:
            gen = torch.Generator().manual_seed(seed)
            return song_log_likelihood(score, sde, x, eps=eps, generator=gen)

        labelled.append(
            ("Song et al.'s likelihood code (emulated)", "RK45 rtol=atol=1e-05, 1 probe", song_run)
        )
    if lik is not None and hasattr(lik, "ddpm_vlb"):

        def vlb_run() -> Tensor:
            return -lik.ddpm_vlb(score, sde, x, generator=torch.Generator().manual_seed(seed))

        labelled.append(("scoresde ddpm_vlb (bound: -vlb <= log p)", "1000-step chain", vlb_run))
    rows = [
        {"method": label, "setting": setting, **_measure(fn, score, exact_eps, exact_0, tight)}
        for label, setting, fn in labelled
    ]
    return {
        "target": name,
        "dim": TARGETS[name].dim,
        "n": n,
        "eps": eps,
        "tight_rtol": TIGHT_RTOL,
        "exact_mean_nll_p0": float(-exact_0.mean()),
        "exact_mean_nll_p_eps": float(-exact_eps.mean()),
        "rows": rows,
    }


def run_likelihood(
    targets: list[str],
    *,
    n: int,
    full: bool = False,
    seed: int = 0,
    eps: float = 1e-5,
) -> list[dict[str, Any]]:
    """For each target, on n true samples: scoresde's log_likelihood (exact trace with the
    batch-wide and the per-sample dopri5 over a range of tolerances; Hutchinson with 1, 4 and
    16 Rademacher probes) and the torchdiffeq peer, against the exact log p_eps and log p_0
    and against a rtol=1e-9 solve of the same ODE (solver error only); plus DDPM's
    variational bound where scoresde provides it. Quick mode: three runs at rtol 1e-3."""
    try:
        from scoresde import likelihood as lik
    except ImportError:
        lik = None
    runs = FULL_RUNS if full else QUICK_RUNS
    peer_rtols = (1e-3, 1e-4, 1e-5) if full else (1e-3,)
    return [
        _likelihood_block(
            name,
            n if TARGETS[name].dim <= 2 else min(n, HIGH_DIM_N),
            runs,
            peer_rtols,
            seed,
            eps,
            lik,
        )
        for name in targets
    ]
