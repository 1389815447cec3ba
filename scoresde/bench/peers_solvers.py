"""The solver-library peers of the sampling benchmark: torchsde on the reverse SDE and
torchdiffeq on the probability-flow ODE (`scoresde.flow.ProbabilityFlow`), each driven by the
exact score as a user of that library would write it (see `scoresde.bench.peers`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from scoresde._typing import Tensor
from scoresde.bench.peers import EPS, Method, Problem, _continuous_endpoints, available
from scoresde.bench.targets import _schedule_sq, at_one_time, schedule_coefficients
from scoresde.flow import ProbabilityFlow

__all__ = ["torchsde_methods", "torchdiffeq_methods"]


# --- torchsde ---------------------------------------------------------------------------------


class _ReverseSDEInS(torch.nn.Module):
    """The reverse SDE dx = [f x - g^2 score] dt + g dw_bar written in s = T - t (torchsde
    needs increasing time): dx = -[f x - g^2 score] ds + g dW_s. y is `[B, D]`."""

    sde_type = "ito"

    def __init__(self, problem: Problem, noise_type: str) -> None:
        super().__init__()
        self.problem = problem
        self.noise_type = noise_type

    def f(self, s: Tensor, y: Tensor) -> Tensor:
        t = self.problem.sde.T - s
        f, g2, _, _ = _schedule_sq(self.problem.sde, t)
        return -(f * y - g2 * self.problem.score(y, t))

    def g(self, s: Tensor, y: Tensor) -> Tensor:
        t = self.problem.sde.T - s
        _, g2, _, _ = _schedule_sq(self.problem.sde, t)
        g = torch.sqrt(g2).expand_as(y)
        # "additive" wants the full [B, D, D] matrix (here g I); "diagonal" its diagonal.
        return torch.diag_embed(g) if self.noise_type == "additive" else g


def _entropy(generator: torch.Generator | None) -> int | None:
    """torchsde's Brownian motions take an int seed; draw it from the generator."""
    if generator is None:
        return None
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def _torchsde_driver(method: str, noise_type: str, levy: str = "none"):
    def run(problem: Problem, x_T: Tensor, num_steps: int, generator) -> Tensor:
        import torchsde

        T = problem.sde.T
        s_end = T - EPS
        ds = s_end / num_steps
        ts = torch.tensor([0.0, s_end], dtype=x_T.dtype, device=x_T.device)
        bm = torchsde.BrownianInterval(
            t0=0.0,
            t1=T,  # a little past s_end: float round-off in the last step stays inside
            size=x_T.shape,
            dtype=x_T.dtype,
            device=x_T.device,
            entropy=_entropy(generator),
            dt=ds,
            levy_area_approximation=levy,
        )
        sde = _ReverseSDEInS(problem, noise_type)
        return torchsde.sdeint(sde, x_T, ts, method=method, dt=ds, bm=bm)[-1]

    return run


def torchsde_methods() -> list[Method]:
    if not available("torchsde"):
        return []
    return [
        Method(
            "torchsde Euler",
            _torchsde_driver("euler", "diagonal"),
            "torchsde",
            False,
            _continuous_endpoints,
            requires=("torchsde",),
            setting="reverse SDE in s = T - t, Euler-Maruyama",
        ),
        Method(
            "torchsde SRK",
            _torchsde_driver("srk", "additive", "space-time"),
            "torchsde",
            False,
            _continuous_endpoints,
            requires=("torchsde",),
            setting="additive noise, strong order 1.5",
        ),
    ]


# --- torchdiffeq ------------------------------------------------------------------------------


def _pf_field(problem: Problem) -> Callable[[Tensor, Tensor], Tensor]:
    """The probability-flow field (`scoresde.flow.ProbabilityFlow`) as a torchdiffeq user
    writes it, on the schedule's analytic continuation (their probe leaves [eps, T])."""
    sde = problem.sde
    return ProbabilityFlow(sde, at_one_time(problem.score), coefficients=schedule_coefficients(sde))


def _torchdiffeq_fixed(method: str):
    def run(problem: Problem, x_T: Tensor, num_steps: int, generator) -> Tensor:
        from torchdiffeq import odeint

        ts = torch.linspace(problem.sde.T, EPS, num_steps + 1, dtype=x_T.dtype, device=x_T.device)
        return odeint(_pf_field(problem), x_T, ts, method=method)[-1]

    return run


def _torchdiffeq_adaptive(rtol: float):
    def run(problem: Problem, x_T: Tensor, num_steps: int, generator) -> Tensor:
        from torchdiffeq import odeint

        ts = torch.tensor([problem.sde.T, EPS], dtype=x_T.dtype, device=x_T.device)
        return odeint(_pf_field(problem), x_T, ts, method="dopri5", rtol=rtol, atol=rtol)[-1]

    return run


def torchdiffeq_methods() -> list[Method]:
    if not available("torchdiffeq"):
        return []
    out = [
        Method(
            f"torchdiffeq {name}",
            _torchdiffeq_fixed(name),
            "torchdiffeq",
            True,
            _continuous_endpoints,
            requires=("torchdiffeq",),
            setting="fixed uniform grid",
        )
        for name in ("euler", "rk4")
    ]
    out += [
        Method(
            f"torchdiffeq dopri5 rtol={rtol:g}",
            _torchdiffeq_adaptive(rtol),
            "torchdiffeq",
            True,
            _continuous_endpoints,
            adaptive=True,
            requires=("torchdiffeq",),
            setting=f"rtol=atol={rtol:g}",
        )
        for rtol in (1e-3, 1e-4)
    ]
    return out
