"""Time grids for fixed-step samplers: decreasing tensors from T down to eps.

Every grid is defined through the SDE's own schedule, so one name means the same spacing
for VP, sub-VP, VE and cosine VP alike:

- "uniform":   t_i = T + i (eps - T) / n                       (Song et al.)
- "quadratic": t_i = eps + (T - eps) (1 - i/n)^2              (DDIM's quadratic spacing)
- "karras":    sigma_i = (smax^(1/rho) + i/n (smin^(1/rho) - smax^(1/rho)))^rho in EDM's
               scale-free noise level sigma = sigma(t)/alpha(t) = exp(-lambda/2), rho = 7
- "logsnr":    lambda_i uniform between lambda(T) and lambda(eps)  (DPM-Solver)
- a 1-D tensor or sequence given by the user: used as is after validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scoresde._typing import Tensor
from scoresde._validation import check_device, check_eps, check_positive, check_positive_int
from scoresde.sdes import SDE

GRIDS = ("uniform", "quadratic", "karras", "logsnr")


def time_grid(
    sde: SDE,
    num_steps: int,
    kind: str | Sequence[float] | Tensor = "uniform",
    *,
    eps: float = 1e-3,
    rho: float = 7.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A decreasing time grid `[num_steps + 1]` from T to eps (both included).

    A user-given grid (tensor or sequence) must be 1-D, strictly decreasing and inside
    (0, T]; `num_steps` is then ignored.
    """
    if device is not None:
        device = check_device("device", device)
    if not isinstance(kind, str):
        grid = torch.as_tensor(kind, dtype=dtype, device=device)
        if grid.ndim != 1 or grid.numel() < 2:
            raise ValueError(f"time_grid must be a 1-D grid of >= 2 times, got {tuple(grid.shape)}")
        if not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError("time_grid must be strictly decreasing (from T towards 0)")
        if not (bool((grid > 0).all()) and float(grid[0]) <= sde.T):
            raise ValueError(f"time_grid must lie in (0, T={sde.T}], got {grid.tolist()}")
        return grid
    if kind not in GRIDS:
        raise ValueError(f"time_grid must be one of {GRIDS} or a 1-D tensor, got {kind!r}")
    n = check_positive_int("num_steps", num_steps)
    eps = check_eps(eps, sde)
    rho = check_positive("rho", rho)
    T = sde.T
    frac = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    if kind == "uniform":
        grid = T + frac * (eps - T)
    elif kind == "quadratic":
        grid = eps + (T - eps) * (1 - frac) ** 2
    else:
        ends = torch.tensor([T, eps], dtype=torch.float64)
        lam_T, lam_eps = sde.log_snr(ends).tolist()
        if kind == "logsnr":
            lam = lam_T + frac * (lam_eps - lam_T)
        else:  # karras: in sigma = exp(-lambda / 2)
            smax, smin = torch.exp(-0.5 * torch.tensor([lam_T, lam_eps], dtype=torch.float64))
            sig = (smax ** (1 / rho) + frac * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
            lam = -2 * torch.log(sig)
        grid = sde.t_from_log_snr(lam)
        grid[0], grid[-1] = T, eps  # exact end points despite round-off in the inverse
    return grid.to(device=device, dtype=dtype)
