"""Likelihoods: the probability-flow ODE's exact log-density, bits/dim, and DDPM's bound.

Probability flow (Song et al. 2021, Sec. 4.3 and App. D.2). The ODE

    dx/dt = v(x, t) = f(t) x - g(t)^2 s(x, t) / 2,        s ~ grad_x log p_t,

transports p_eps to p_T, and along a trajectory d log p_t(x_t)/dt = -div_x v(x_t, t)
(the instantaneous change of variables of neural ODEs). Integrating from t = eps to T:

    log p_eps(x) = log p_T(z) + int_eps^T div_x v(x_t, t) dt,     z = x_T,

with log p_T replaced by the prior's log-density (`sde.prior_logp`). The divergence is
div_x v = f(t) D - g(t)^2 div_x s / 2, computed exactly (D vector-Jacobian products,
batched) or by Hutchinson's estimator E_v[v^T (ds/dx) v] with probes fixed for the solve.

Everything runs on x's device and dtype (`scoresde.flow`: the field and its divergence, the
method table and the solve; no numpy round trips).

Accuracy (exact score of the 2-D benchmark mixture, VP, float64, exact trace, solver
error only; the adaptive step is shared by the batch, so a batch costs more NFE than one
sample): dopri5 rtol=atol=1e-3: 500 points in one solve 74 NFE, mean |error| 2.6e-4
nats, max 2.2e-2; one point per solve 39 NFE on average, max 2.8e-2. 1e-4: 122 NFE,
max 2.2e-3 (batch); 51 NFE, max 2.4e-3 (single). 1e-5: 170 NFE, max 1.7e-4 (batch);
70 NFE, max 2.1e-4 (single). Fixed steps in t are far worse (rk4, 100 NFE: max 8e-2).
"dopri5_per_sample", same 500 points in one solve (NFE = the hardest sample's):
rtol=atol=1e-3: 68 NFE, mean 1.0e-3, max 7.8e-2; 3e-4: 80 NFE, max 1.2e-2; 1e-4: 92
NFE, mean 1.4e-4, max 4.0e-3; 3e-5: 110 NFE, max 3.4e-4. Against the exact density
the N(0, I) prior's mismatch with p_T adds ~3e-3 nats on average (up to ~1.1e-2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scoresde._typing import ScoreFn, Tensor
from scoresde._validation import (
    check_bool,
    check_choice,
    check_data,
    check_eps,
    check_finite,
    check_positive,
    check_positive_int,
    expand_like,
)
from scoresde.bpd import bits_per_dim, dequantization_offset
from scoresde.flow import (
    DEFAULT_MAX_STEPS,
    METHODS,
    PER_SAMPLE_METHODS,
    TORCHDIFFEQ_METHODS,
    ProbabilityFlow,
    draw_probes,
    one_hot_chunks,
    select_rows,
    solve,
)
from scoresde.flow import FIXED_METHODS as FLOW_FIXED
from scoresde.sdes import SDE
from scoresde.vlb import (  # noqa: F401  (re-exported: ddpm_vlb lives in scoresde.vlb)
    _chain_times,
    _check_generator,
    _check_score_fn,
    _check_sde,
    _discretized_gaussian_nll,
    ddpm_vlb,
)

__all__ = [
    "LikelihoodResult",
    "DatasetLikelihood",
    "log_likelihood",
    "bits_per_dim",
    "dequantization_offset",
    "ddpm_vlb",
    "dataset_log_likelihood",
]

# The one table of methods lives in scoresde.flow; these are its views used here.
ADAPTIVE_METHODS = TORCHDIFFEQ_METHODS
FIXED_METHODS = {name: METHODS[name].torchdiffeq for name in FLOW_FIXED}
_one_hot_chunks = one_hot_chunks  # the tests' name for it
TRACES = ("exact", "hutchinson")
TIME_VARIABLES = ("t", "sigma")
PROBES = ("rademacher", "gaussian")


@dataclass
class LikelihoodResult:
    """The output of `log_likelihood`.

    Attributes:
        logp: `[B]` log p_eps(x) in nats, summed over the D data dimensions.
        bpd: `[B]` -logp / (D ln 2): bits per dimension of the continuous density, with no
            dequantization offset (see `bits_per_dim` for discrete data).
        z: the latent x_T, shaped like x.
        prior_logp: `[B]` log p_T(z) under the SDE's prior.
        delta_logp: `[B]` int_eps^T div v dt, so logp = prior_logp + delta_logp.
        nfe: evaluations of the ODE's right-hand side; each is exactly one score_fn call on
            the batch (`score_calls`), the API's NFE.
        vjps: vector-Jacobian products of the score taken for the divergence, in total
            (D per evaluation for the exact trace, `num_probes` for Hutchinson's).
    """

    logp: Tensor
    bpd: Tensor
    z: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    nfe: int
    vjps: int

    @property
    def score_calls(self) -> int:
        """score_fn calls: one per right-hand-side evaluation (the divergence reuses it)."""
        return self.nfe


# --- argument checks ---------------------------------------------------------------------------


def _check_batch(x: Tensor) -> None:
    """log_likelihood needs a non-empty finite batch in float32 or float64 (the solvers'
    tolerances and the divergence's autograd are not meaningful in half precision)."""
    if check_data("x", x).shape[0] == 0:
        raise ValueError(f"x must hold at least one sample, got shape {tuple(x.shape)}")
    check_finite("x", x)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64 for log_likelihood, got dtype {x.dtype}")


def _check_method(method: Any, num_steps: Any) -> tuple[str, int | None]:
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    allowed = ADAPTIVE_METHODS + PER_SAMPLE_METHODS + tuple(FIXED_METHODS)
    check_choice("method", method, allowed)
    if method in FIXED_METHODS:
        if num_steps is None:
            raise ValueError(
                f"num_steps is required with the fixed-step method {method!r} "
                f"(adaptive methods {ADAPTIVE_METHODS + PER_SAMPLE_METHODS} use rtol/atol "
                "instead)"
            )
        num_steps = check_positive_int("num_steps", num_steps)
    elif num_steps is not None:
        raise ValueError(
            f"num_steps applies only to the fixed-step methods {tuple(FIXED_METHODS)}, "
            f"got num_steps={num_steps!r} with the adaptive method {method!r}"
        )
    return method, num_steps


# --- the probability-flow ODE ------------------------------------------------------------------


def _make_rhs(
    flow: ProbabilityFlow,
    batch: int,
    trace: str | None,
    cotangents: Any,
    progress_cb: Callable[[Tensor], None] | None,
) -> Callable[..., Any]:
    """The right-hand side: t, x -> dx/dt, or t, (x, delta) -> (dx/dt, div v).

    t is a scalar (torchdiffeq) or `[Ba]` per sample (`solve_per_sample`, which also passes
    idx `[Ba]`, the rows of the batch being evaluated, to pick their Hutchinson probes).
    """

    def rhs(t: Tensor, state: Any, idx: Tensor | None = None) -> Any:
        if progress_cb is not None:
            progress_cb(t)
        x = state if trace is None else state[0]
        if trace is None:
            return flow(t, x)
        Ba = x.shape[0]
        cots = cotangents if Ba == batch else select_rows(cotangents, trace, idx, Ba)
        return flow.with_divergence(t, x, trace, cots)

    return rhs


def _sigma_ends(sde: SDE, eps: float, x: Tensor) -> tuple[float, float, float, float]:
    """(sigma_bar(eps), sigma_bar(T), alpha(eps), alpha(T)) in float64; sigma_bar = sigma/alpha."""
    ts = torch.tensor([eps, sde.T], dtype=torch.float64)
    alpha, sigma = sde.alpha(ts), sde.sigma(ts)
    sb = sigma / alpha
    return float(sb[0]), float(sb[1]), float(alpha[0]), float(alpha[1])


def _make_sigma_rhs(
    flow: ProbabilityFlow,
    batch: int,
    trace: str,
    cotangents: Any,
    progress_cb: Callable[[Tensor], None] | None,
) -> Callable[..., Any]:
    """The right-hand side over sigma_bar = sigma / alpha: (sb, (y, delta)) ->
    (dy/dsb, d delta/dsb) with y = x / alpha(t) and t = t(sb).

    With g^2 / 2 = alpha^2 sb dsb/dt (for every SDE whose kernel is N(alpha x0,
    sigma^2 I)), dx/dt = f x - (g^2 / 2) s becomes dy/dsb = -alpha sb s(alpha y, t),
    and div_x v dt = f D dt - alpha^2 sb div_x s dsb: the first term is added in closed
    form by the caller, the second is integrated here. sb is a scalar or `[Ba]`.
    """
    sde = flow.sde

    def rhs(sb: Tensor, state: Any, idx: Tensor | None = None) -> Any:
        if progress_cb is not None:
            progress_cb(sb)
        y = state[0]
        t = flow._time(sde.t_from_log_snr(-2 * torch.log(sb)), y)
        alpha = sde.alpha(t).to(y.dtype)
        Ba = y.shape[0]
        cots = cotangents if Ba == batch else select_rows(cotangents, trace, idx, Ba)
        s, div_s = flow.score_with_divergence(t, expand_like(alpha, y) * y, trace, cots)
        k = alpha * sb
        return -expand_like(k, y) * s, -(k * alpha) * div_s

    return rhs


def _sample_norm(state: Any) -> Tensor:
    """`[B]` each sample's error norm: max(RMS over x, |error of delta|).

    The log-density increment gets its own weight (not 1 / (D + 1) of an RMS) because it
    is the quantity the user asked for, in nats.
    """
    if isinstance(state, tuple):
        y, delta = state
        B = delta.shape[0]
        return torch.maximum(y.reshape(B, -1).pow(2).mean(1).sqrt(), delta.abs())
    B = state.shape[0]
    return state.reshape(B, -1).pow(2).mean(1).sqrt()


def _per_sample_norm(state: Any) -> Tensor:
    """Error norm for the adaptive step: the worst sample's RMS over its state.

    torchdiffeq's default RMS over the whole batch lets easy samples hide a hard one; taking
    the max over samples keeps every sample within rtol/atol. The log-density increment is
    compared on its own (it is in nats, the quantity the user asked for).
    """
    return _sample_norm(state).max()


def _solve(
    rhs: Callable[..., Any],
    state0: Any,
    t0: float,
    t1: float,
    method: str,
    rtol: float,
    atol: float,
    num_steps: int | None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> Any:
    """Integrate the state from t0 to t1 (either direction) and return it at t1."""
    return solve(
        rhs, state0, t0, t1, method, rtol=rtol, atol=atol, num_steps=num_steps,
        norm=_per_sample_norm, sample_norm=_sample_norm, max_steps=max_steps,
        with_index=True,
    )  # fmt: skip


def _progress_callback(
    progress: bool, t0: float, t1: float, desc: str
) -> tuple[Callable[[Tensor], None] | None, Any]:
    """A tqdm bar following the fraction of [t0, t1] covered (reads t: a sync, only if asked)."""
    if not progress:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=1000, desc=desc, leave=False)
    done = [0]

    def cb(t: Tensor) -> None:
        # t is a scalar or per sample `[Ba]`: follow the sample furthest behind.
        frac = min(max(float(((t - t0) / (t1 - t0)).min()), 0.0), 1.0)
        now = int(1000 * frac)
        if now > done[0]:
            bar.update(now - done[0])
            done[0] = now

    return cb, bar


# --- public API --------------------------------------------------------------------------------


def log_likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    trace: str = "hutchinson",
    probe: str = "rademacher",
    num_probes: int = 1,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    batch_invariant: bool = False,
    sample_offset: int = 0,
    max_steps: int = DEFAULT_MAX_STEPS,
    time_variable: str = "t",
) -> LikelihoodResult:
    """log p_eps(x) by the probability-flow ODE (Song et al. 2021, App. D.2).

    Solves jointly, from t = eps to T,

        dx/dt = f(t) x - g(t)^2 s(x, t) / 2,      d delta/dt = f(t) D - g(t)^2 div_x s / 2,

    with delta(eps) = 0, and returns logp = sde.prior_logp(x_T) + delta(T): the density
    decreases along the flow at the rate div v, so the data point is more likely than its
    latent by the integrated divergence.

    Args:
        score_fn: s(x `[B, *D]`, t `[B]`) -> `[B, *D]`. It must act on samples
            independently (the exact trace reads the per-sample Jacobian diagonal off a
            batched product). Its parameters get no gradients from this call.
        sde: the forward SDE the score belongs to.
        x: data `[B, *D]` (any rank >= 2); results follow its device and dtype.
        trace: "exact" (D batched vector-Jacobian products per evaluation, fine for D up to
            a few hundred) or "hutchinson" (unbiased estimate E_v[v^T (ds/dx) v]).
        probe: Hutchinson probe distribution, "rademacher" (lower variance) or "gaussian".
        num_probes: probes averaged per evaluation (Hutchinson only). They are drawn once
            per solve from `generator` and held fixed, so the adaptive solver sees one
            smooth, deterministic ODE.
        method: adaptive "dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"
            (torchdiffeq's rule, one step for the batch; "dopri5" in scoresde's loop), adaptive
            "dopri5_per_sample" (Dormand-Prince 5(4) where every sample takes its own
            steps, `scoresde._ode.solve_per_sample`: a sample's result does not depend on
            the rest of the batch, finished samples leave the batch, and the NFE is that of
            the hardest sample), or fixed-step "euler", "midpoint", "heun", "heun3", "rk4"
            with `num_steps` steps uniform in t.
        rtol, atol: tolerances of adaptive methods. A sample's error norm is the larger of
            its RMS error over x and the |error| of its log-density increment (in nats);
            the batch-wide methods take the worst sample's, "dopri5_per_sample" each
            sample's own. So every sample, not the batch average, meets them.
        eps: start time (the likelihood is that of the marginal p_eps), 0 < eps < T.
        num_steps: steps of a fixed-step method (required there, refused otherwise).
        generator: source of the Hutchinson probes.
        progress: show a progress bar over [eps, T].
        batch_invariant: draw each point's Hutchinson probes from its own Philox stream
            (keyed by one draw of `generator`), so a point's probes do not depend on the
            batch; `sample_offset` is then the global index of x's first point (for data
            sets split into batches or over processes).
        max_steps: the most steps of an adaptive method (RuntimeError beyond).
        time_variable: what the solver integrates over. "t": the ODE above, state
            (x, delta). "sigma": the same ODE after the exact change of variables to
            sigma_bar = sigma(t) / alpha(t) and y = x / alpha(t) (the ODE of Karras et al.'s
            EDM, dy/dsigma_bar = -alpha sigma_bar s(alpha y, t), with
            d delta/dsigma_bar = -alpha^2 sigma_bar div_x s and the drift's share of delta,
            D log(alpha(T) / alpha(eps)), added in closed form); needs the SDE's
            `t_from_log_snr`. Both give the same log p_eps up to the solver's error; rtol/atol
            then apply to y instead of x. Measured (benchmarks/results/likelihood.md): on a
            trained MLP and under the VE SDE it needs fewer evaluations for the same
            error, on the exact score of the VP 2-D mixture more.

    Raises:
        NonFiniteError (`scoresde.samplers.NonFiniteError`): the score returned NaN/Inf;
        the message names the time. The score is only evaluated on [eps, T].

    Returns:
        `LikelihoodResult`: logp `[B]` (nats), bpd `[B]` (-logp / (D ln 2)), z (x_T),
        prior_logp, delta_logp, nfe (score_fn calls) and vjps. All tensors are detached.
    """
    _check_score_fn(score_fn)
    _check_sde(sde)
    _check_batch(x)
    check_choice("trace", trace, TRACES)
    check_choice("probe", probe, PROBES)
    num_probes = check_positive_int("num_probes", num_probes)
    method, num_steps = _check_method(method, num_steps)
    rtol, atol = check_positive("rtol", rtol), check_positive("atol", atol)
    eps = check_eps(eps, sde)
    _check_generator(generator)
    batch_invariant = check_bool("batch_invariant", batch_invariant)
    sample_offset = check_positive_int("sample_offset", sample_offset, minimum=0)
    max_steps = check_positive_int("max_steps", max_steps)
    check_choice("time_variable", time_variable, TIME_VARIABLES)

    return _solve_likelihood(
        score_fn, sde, x, trace, probe, num_probes, method, rtol, atol, eps, num_steps,
        generator, progress, max_steps, batch_invariant, sample_offset, time_variable,
    )  # fmt: skip


def _solve_likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    trace: str,
    probe: str,
    num_probes: int,
    method: str,
    rtol: float,
    atol: float,
    eps: float,
    num_steps: int | None,
    generator: torch.Generator | None,
    progress: bool,
    max_steps: int,
    batch_invariant: bool,
    sample_offset: int,
    time_variable: str = "t",
) -> LikelihoodResult:
    """`log_likelihood` on checked arguments: the joint solve of (x, delta) from eps to T."""
    with torch.inference_mode(False), torch.no_grad():
        # A clone outside inference mode, so that autograd may differentiate through it.
        x = x.detach().clone()
        B, dim = x.shape[0], x[0].numel()
        if trace == "hutchinson":
            cotangents: Any = draw_probes(
                x, probe, num_probes, generator, batch_invariant, sample_offset
            )
        else:
            cotangents = one_hot_chunks(x)
        flow = ProbabilityFlow(sde, score_fn, t_range=(eps, sde.T))
        delta0 = torch.zeros(B, dtype=x.dtype, device=x.device)
        if time_variable == "sigma":
            ends = _sigma_ends(sde, eps, x)
            s0, s1 = ends[0], ends[1]
        else:
            s0, s1 = eps, sde.T
        cb, bar = _progress_callback(progress, s0, s1, "log-likelihood")
        try:
            if time_variable == "sigma":
                rhs = _make_sigma_rhs(flow, B, trace, cotangents, cb)
                y0 = x / ends[2]
                yT, delta = _solve(
                    rhs, (y0, delta0), s0, s1, method, rtol, atol, num_steps, max_steps
                )
                z = yT * ends[3]
                # The drift f(t) x contributes int f D dt = D log(alpha(T) / alpha(eps)).
                delta = delta + dim * (math.log(ends[3]) - math.log(ends[2]))
            else:
                rhs = _make_rhs(flow, B, trace, cotangents, cb)
                z, delta = _solve(
                    rhs, (x, delta0), eps, sde.T, method, rtol, atol, num_steps, max_steps
                )
        finally:
            if bar is not None:
                bar.close()
        prior = sde.prior_logp(z)
        logp = prior + delta
        bpd = -logp / (dim * math.log(2))
    return LikelihoodResult(
        logp=logp.detach(),
        bpd=bpd.detach(),
        z=z.detach(),
        prior_logp=prior.detach(),
        delta_logp=delta.detach(),
        nfe=flow.nfe,
        vjps=flow.vjps,
    )


def _flow_map(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    t_start: float,
    t_end: float,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    num_steps: int | None = None,
) -> tuple[Tensor, int]:
    """Transport x from t_start to t_end along the probability-flow ODE (either direction).

    Returns (x at t_end, NFE). The latent of `log_likelihood` decodes back to its data
    point with `_flow_map(score_fn, sde, result.z, sde.T, eps)`.
    """
    method, num_steps = _check_method(method, num_steps)
    with torch.inference_mode(False), torch.no_grad():
        flow = ProbabilityFlow(sde, score_fn, t_range=(min(t_start, t_end), max(t_start, t_end)))
        rhs = _make_rhs(flow, x.shape[0], None, None, None)
        out = _solve(rhs, x.detach().clone(), t_start, t_end, method, rtol, atol, num_steps)
        return out.detach(), flow.nfe


# --- a whole data set (for the command line) ---------------------------------------------------


@dataclass
class DatasetLikelihood:
    """Per-sample results of `dataset_log_likelihood` and their means.

    Attributes:
        logp: `[N]` log-densities in nats.
        bpd: `[N]` bits/dim (with the dequantization offset when `num_bins` was given).
        mean_logp, stderr_logp: the mean of logp and its standard error std / sqrt(N).
        mean_bpd, stderr_bpd: the same for bpd.
        nfe: score_fn calls over all batches.
    """

    logp: Tensor
    bpd: Tensor
    mean_logp: float
    stderr_logp: float
    mean_bpd: float
    stderr_bpd: float
    nfe: int


def dataset_log_likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    data: Tensor,
    batch_size: int = 256,
    *,
    num_bins: int | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    convention: str = "levels",
    progress: bool = True,
    batch_invariant: bool = False,
    **kwargs: Any,
) -> DatasetLikelihood:
    """`log_likelihood` over a data set `[N, *D]` in batches, with means and standard errors.

    Args:
        score_fn, sde: as for `log_likelihood`.
        data: `[N, *D]`; results follow its device and dtype.
        batch_size: samples per ODE solve.
        num_bins, data_range, convention: with `num_bins`, bpd is that of the discrete data
            (`bits_per_dim`); without, the continuous -logp / (D ln 2).
        progress: a progress bar over the batches.
        batch_invariant: every point gets its own Hutchinson probes (Philox streams under
            one key drawn from the generator), so with a per-sample solver
            (method="dopri5_per_sample") a point's value depends on nothing else, and with
            the batch-wide solvers only on its batch of `batch_size` (see
            `scoresde.distributed.log_likelihood`, which shards those batches).
        **kwargs: passed to `log_likelihood` (trace, probe, num_probes, method, rtol, atol,
            eps, num_steps, generator). One generator serves all batches in turn.

    Returns:
        `DatasetLikelihood`.
    """
    check_finite("data", check_data("data", data))
    batch_size = check_positive_int("batch_size", batch_size)
    if num_bins is not None:
        dequantization_offset(num_bins, data_range, convention)  # validate early
    batches = list(torch.split(data, batch_size))
    iterator: Any = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="log-likelihood", unit="batch")
    logps, bpds, nfe = [], [], 0
    generator = kwargs.pop("generator", None)
    state = None
    if check_bool("batch_invariant", batch_invariant):
        # One key for all batches: every batch restarts from the generator's state.
        _check_generator(generator)
        if generator is None:  # one draw of torch's global RNG, as a generator would be
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        gen_device = generator.device
        state = generator.get_state()
    start = 0
    for xb in iterator:
        gen = generator
        if state is not None:
            gen = torch.Generator(device=gen_device)
            gen.set_state(state)
        extra = {"batch_invariant": True, "sample_offset": start} if batch_invariant else {}
        res = log_likelihood(score_fn, sde, xb, generator=gen, **extra, **kwargs)
        start += xb.shape[0]
        nfe += res.nfe
        logps.append(res.logp)
        if num_bins is None:
            bpds.append(res.bpd)
        else:
            bpds.append(bits_per_dim(res.logp, xb, num_bins, data_range, convention))
    if state is not None and batches:  # advance the generator as one batch's key draw did
        generator.set_state(gen.get_state())
    logp, bpd = torch.cat(logps), torch.cat(bpds)
    n = logp.shape[0]

    def stderr(v: Tensor) -> float:
        return float(v.std() / math.sqrt(n)) if n > 1 else float("nan")

    return DatasetLikelihood(
        logp=logp,
        bpd=bpd,
        mean_logp=float(logp.mean()),
        stderr_logp=stderr(logp),
        mean_bpd=float(bpd.mean()),
        stderr_bpd=stderr(bpd),
        nfe=nfe,
    )
