"""The likelihood suite: probability-flow log-likelihoods against the exact log-density.

On true samples x of a target mixture, with the exact score, the only errors of
`scoresde.log_likelihood` are the ODE solver's and (for Hutchinson) the trace estimator's,
so the estimate is compared with the exact log p_eps(x) (the density the ODE defines at its
start time eps) and with log p_0(x). The peer is what a user would write with torchdiffeq:
the same augmented ODE with the exact divergence by autograd (FFJORD-style), one
vector-Jacobian product per dimension.

`run_song_comparison` times scoresde against Song et al.'s likelihood code
(`song_log_likelihood`, emulated as their code runs) on the same model and the same points,
and `run_time_variables` compares log_likelihood's time variables t and sigma.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde.bench.peers import CountingScore
from scoresde.bench.targets import TARGETS, at_one_time, make_sde, schedule_coefficients
from scoresde.calibration import CountingFn
from scoresde.flow import ProbabilityFlow
from scoresde.sdes import SDE

__all__ = [
    "run_likelihood",
    "run_song_comparison",
    "song_log_likelihood",
    "torchdiffeq_log_likelihood",
]


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
    score: Any,
    sde: SDE,
    x: Tensor,
    *,
    rtol: float = 1e-5,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    one_call: bool = False,
) -> Tensor:
    """log p_eps(x) `[B]` the way Song et al.'s likelihood code (score_sde_pytorch's
    `likelihood.py`) computes it: scipy's RK45 (`solve_ivp`, rtol = atol = 1e-5 by default)
    on the flattened float64 numpy state (x, delta), the probability-flow drift from
    `sde.reverse(score, probability_flow=True)` in float32, its divergence by one Rademacher
    Hutchinson probe (drawn once) and autograd, with numpy <-> torch round trips at every
    evaluation.

    Their `ode_func` calls the model twice per evaluation: `drift_fn` (under no_grad) and
    `div_fn`, which runs the drift again with grad to take the vector-Jacobian product.
    `one_call=True` reuses the second call's drift instead (a leaner variant of their code,
    one model call per evaluation)."""
    import numpy as np
    from scipy import integrate

    shape, B = x.shape, x.shape[0]
    data = x.detach().to(torch.float32)
    probe = torch.randint(0, 2, shape, generator=generator).to(data) * 2 - 1
    rsde = sde.reverse(score, probability_flow=True)

    def ode_func(t: float, y: Any) -> Any:
        sample = torch.from_numpy(y[:-B]).reshape(shape).to(torch.float32)
        vec_t = torch.full((B,), t, dtype=torch.float32)
        if not one_call:
            with torch.no_grad():
                drift = rsde.sde(sample, vec_t)[0]
        with torch.enable_grad():
            sample.requires_grad_(True)
            fn = rsde.sde(sample, vec_t)[0]
            (grad,) = torch.autograd.grad((fn * probe).sum(), sample)
        if one_call:
            drift = fn
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
    *[
        ("exact", dict(method="dopri5", rtol=r, atol=r))
        for r in (3e-2, 1e-2, 5e-3, 1e-3, 1e-4, 1e-5)
    ],
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
    blocks = [
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
    return blocks


# --- against Song et al.'s likelihood code, same model, same points ---------------------------

# (target, number of points): the exact scores of the 2-D and 16-D mixtures and an MLP
# ScoreModel trained on the 2-D mixture (fewer points there: its reference solve is costly).
SONG_TARGETS: dict[str, int] = {"mixture2d": 2_000, "mix16d": 300, "mlp2d": 500}
# The trained network's reference: a float64 solve of its ODE with the exact trace.
TRAINED_REF_RTOL = 1e-6
# scoresde's settings against Song et al.'s default (label, log_likelihood keywords, dtype).
SONG_CONTESTANTS: list[tuple[str, dict[str, Any], torch.dtype]] = [
    ("scoresde defaults (Hutchinson, 1 probe)", dict(), torch.float32),
    *[
        ("scoresde Hutchinson, 1 probe", dict(trace="hutchinson", rtol=r, atol=r), torch.float32)
        for r in (1e-2, 1e-3)
    ],
    # Two probes halve the estimator's variance for about one more VJP per evaluation: in
    # 16-D (where the exact trace costs 16) the cheapest setting at least as accurate.
    (
        "scoresde Hutchinson, 2 probes",
        dict(trace="hutchinson", num_probes=2, rtol=3e-2, atol=3e-2),
        torch.float32,
    ),
    ("scoresde exact trace", dict(trace="exact", rtol=5e-3, atol=5e-3), torch.float32),
    ("scoresde exact trace", dict(trace="exact", rtol=5e-3, atol=5e-3), torch.float64),
    ("scoresde exact trace", dict(trace="exact", rtol=3e-2, atol=3e-2), torch.float32),
    # Every sample its own steps: finished samples leave the batch (fewer evaluations per
    # sample than the batch-wide solve at a similar worst case).
    (
        "scoresde exact trace, per-sample steps",
        dict(trace="exact", method="dopri5_per_sample", rtol=2e-3, atol=2e-3),
        torch.float32,
    ),
    (
        "scoresde exact trace, time_variable=sigma",
        dict(trace="exact", rtol=1e-2, atol=1e-2, time_variable="sigma"),
        torch.float32,
    ),
]


def train_mlp_2d(full: bool, seed: int = 0) -> tuple[torch.nn.Module, SDE, Any, float]:
    """A small MLP ScoreModel trained on the 2-D benchmark mixture (VP SDE), frozen in eval
    mode: (EMA model, sde, mixture, training seconds). Full mode: hidden 128, 3 blocks,
    1,500 steps (~20 s on one core); quick: hidden 32, 1 block, 100 steps."""
    from scoresde.losses import DSMLoss
    from scoresde.recipes import build_model
    from scoresde.toy import benchmark_mixture_2d
    from scoresde.training import Trainer

    mixture, sde = benchmark_mixture_2d(), make_sde("vp")
    data = mixture.sample(20_000, generator=torch.Generator().manual_seed(seed + 1))
    hidden, blocks, steps = (128, 3, 1_500) if full else (32, 1, 100)
    model = build_model(
        sde, "mlp", (2,), net_kwargs={"hidden": hidden, "num_blocks": blocks}, seed=seed
    )
    trainer = Trainer(
        model, DSMLoss(sde), lr=2e-3, batch_size=256, warmup_steps=min(100, steps // 2),
        decay_steps=steps, ema_decay=0.995, progress=False, seed=seed,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(data, steps, progress=False)
    seconds = time.perf_counter() - start
    ema = trainer.ema_model.eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema, sde, mixture, seconds


_TARGET_CACHE: dict[tuple, dict[str, Any]] = {}


def _song_target(name: str, n: int, full: bool, seed: int, lik: Any) -> dict[str, Any]:
    """(score, sde, points float64, reference log p_eps float64, description); made once
    per run (the trained network and its reference solve are shared by the tables)."""
    key = (name, n, full, seed)
    if key not in _TARGET_CACHE:
        _TARGET_CACHE[key] = _make_target(name, n, full, seed, lik)
    return _TARGET_CACHE[key]


def _make_target(name: str, n: int, full: bool, seed: int, lik: Any, kind: str = "vp") -> dict:
    if name == "mlp2d":
        model, sde, mixture, train_s = train_mlp_2d(full, seed)
        x = mixture.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        import copy

        model64 = copy.deepcopy(model).double()
        ref = lik.log_likelihood(
            model64, sde, x, trace="exact", rtol=TRAINED_REF_RTOL, atol=TRAINED_REF_RTOL
        )
        what = (
            f"MLP ScoreModel trained on the 2-D mixture ({train_s:.0f} s); reference: its "
            f"own ODE solved in float64 with the exact trace at rtol=atol="
            f"{TRAINED_REF_RTOL:g} ({ref.nfe} NFE)"
        )
        return {"score": model, "sde": sde, "x": x, "ref": ref.logp, "what": what}
    mixture, sde = TARGETS[name].mixture(), make_sde(kind)
    x = mixture.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = mixture.log_prob_fn(sde)(x, 1e-5)
    what = f"exact score of {TARGETS[name].description}; reference: the exact log p_eps"
    return {"score": CountingScore(sde, mixture), "sde": sde, "x": x, "ref": ref, "what": what}


def _song_block(name: str, n: int, full: bool, seed: int, repeats: int, lik: Any) -> dict[str, Any]:
    tgt = _song_target(name, n, full, seed, lik)
    sde, x, ref = tgt["sde"], tgt["x"], tgt["ref"]
    score = CountingFn(tgt["score"])
    runs: list[tuple[str, str, str, Any]] = []
    for label, one_call in (("Song et al. (emulated)", False), ("Song et al., 1 call", True)):

        def song(one_call=one_call) -> Tensor:
            gen = torch.Generator().manual_seed(seed)
            return song_log_likelihood(score, sde, x, generator=gen, one_call=one_call)

        calls = "1 model call" if one_call else "2 model calls"
        runs.append((label, f"RK45 rtol=atol=1e-05, 1 probe, {calls}/eval", "float32", song))
    for label, kw, dtype in SONG_CONTESTANTS if lik is not None else []:
        if dtype == torch.float64 and name == "mlp2d":
            continue  # the trained network runs in float32, as in Song et al.'s code

        def ours(kw=kw, dtype=dtype) -> Tensor:
            gen = torch.Generator().manual_seed(seed)
            res = lik.log_likelihood(score, sde, x.to(dtype), generator=gen, **kw)
            return res.logp.to(torch.float64)

        setting = f"{kw.get('method', 'dopri5')} rtol=atol={kw.get('rtol', 1e-5):g}"
        runs.append((label, setting, str(dtype).replace("torch.", ""), ours))
    rows: list[dict[str, Any]] = []
    for label, setting, dtype, fn in runs:  # one untimed run each: warm-up, calls, errors
        score.nfe = 0
        try:
            est = fn()
        except Exception as err:  # reported, not fatal
            rows.append({"method": label, "setting": setting, "dtype": dtype, "error": str(err)})
            continue
        diff = (est - ref).abs()
        rows.append(
            {
                "method": label, "setting": setting, "dtype": dtype, "calls": score.nfe,
                "mean_abs_err": float(diff.mean()), "max_abs_err": float(diff.max()),
                "times": [],
            }
        )  # fmt: skip
    # Interleaved rounds, so that load on a shared machine hits all alike, timed in this
    # process's CPU time (one thread: the work itself, not the wait for a busy core).
    for _ in range(repeats):
        for row, (_, _, _, fn) in zip(rows, runs, strict=True):
            if "error" in row:
                continue
            start = time.process_time()
            fn()
            row["times"].append(time.process_time() - start)
    for row in rows:
        if "error" not in row:
            row["seconds"] = min(row["times"])
    base, lean = rows[0], rows[1]
    for row in rows:
        if "error" in row or "error" in base:
            continue
        row["ratio"] = row["seconds"] / base["seconds"]
        if "error" not in lean:
            row["ratio_one_call"] = row["seconds"] / lean["seconds"]
        row["as_accurate"] = bool(
            row["mean_abs_err"] <= base["mean_abs_err"]
            and row["max_abs_err"] <= base["max_abs_err"]
        )
    return {"target": name, "n": n, "what": tgt["what"], "repeats": repeats, "rows": rows}


def run_song_comparison(
    targets: list[str] | None = None,
    *,
    full: bool = False,
    n: int | None = None,
    seed: int = 0,
    repeats: int | None = None,
) -> list[dict[str, Any]]:
    """Wall time of scoresde's log_likelihood against Song et al.'s likelihood code
    (`song_log_likelihood`) on the same model and the same points, one block per target
    (`SONG_TARGETS`): each contestant runs once untimed (warm-up; its score calls and its
    error against the reference), then `repeats` interleaved timed rounds (CPU time of the
    process); seconds are the fastest round and ratios are to Song et al.'s time. A setting
    is "as accurate" when both its mean and its largest |error| are at most Song et al.'s."""
    if importlib.util.find_spec("scipy") is None:
        return []
    try:
        from scoresde import likelihood as lik
    except ImportError:
        lik = None
    names = targets if targets is not None else (list(SONG_TARGETS) if full else ["mixture2d"])
    reps = repeats if repeats is not None else (5 if full else 1)
    return [
        _song_block(name, n or (SONG_TARGETS[name] if full else 100), full, seed, reps, lik)
        for name in names
    ]


# --- the time variable: t against sigma / alpha (EDM's ODE) ------------------------------------

# (target, SDE kind, points) and the tolerances of the exact-trace dopri5 solves.
TIME_VARIABLE_TARGETS: list[tuple[str, str, int]] = [
    ("mixture2d", "vp", 500),
    ("mixture2d", "subvp", 500),
    ("mixture2d", "ve", 500),
    ("mix16d", "vp", 100),
    ("mlp2d", "vp", SONG_TARGETS["mlp2d"]),
]
TIME_VARIABLE_RTOLS = (1e-2, 5e-3, 1e-3)


def run_time_variables(*, full: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """NFE and error of `log_likelihood(trace="exact", method="dopri5")` with
    time_variable "t" and "sigma" at TIME_VARIABLE_RTOLS, per target and SDE, against the
    exact log p_eps (mixtures, float64) or the trained network's float64 reference solve
    (its solves in float32). Quick mode: the 2-D mixture under VP, 100 points, one rtol."""
    try:
        from scoresde import likelihood as lik
    except ImportError:
        return []
    if not hasattr(lik, "TIME_VARIABLES"):
        return []
    cases = TIME_VARIABLE_TARGETS if full else [("mixture2d", "vp", 100)]
    rtols = TIME_VARIABLE_RTOLS if full else (1e-2,)
    blocks = []
    for name, kind, n in cases:
        if name == "mlp2d":
            tgt = _song_target(name, n, full, seed, lik)
        else:
            tgt = _make_target(name, n, full, seed, lik, kind)
        dtype = torch.float32 if name == "mlp2d" else torch.float64
        score, sde, x, ref = CountingFn(tgt["score"]), tgt["sde"], tgt["x"].to(dtype), tgt["ref"]
        rows = []
        for rtol in rtols:
            for variable in lik.TIME_VARIABLES:
                score.nfe = 0
                start = time.perf_counter()
                res = lik.log_likelihood(
                    score, sde, x, trace="exact", rtol=rtol, atol=rtol, time_variable=variable
                )
                seconds = time.perf_counter() - start
                diff = (res.logp.to(torch.float64) - ref).abs()
                rows.append(
                    {
                        "time_variable": variable, "rtol": rtol, "nfe": res.nfe,
                        "mean_abs_err": float(diff.mean()), "max_abs_err": float(diff.max()),
                        "seconds": seconds,
                    }
                )  # fmt: skip
        blocks.append(
            {"target": name, "sde": kind, "n": n, "dtype": str(dtype).replace("torch.", ""),
             "rows": rows}
        )  # fmt: skip
    return blocks
