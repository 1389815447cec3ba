"""The shared sampling loop (scoresde/samplers/base.py), exercised through the PC, Euler–
Maruyama and ODE samplers: NFE accounting, the NaN/Inf guard, callbacks, the score's shape
check, seeded determinism, batch invariance, progress bars, x_init, dtypes and devices."""

from __future__ import annotations

import re

import pytest
import torch

from scoresde import VESDE, VPSDE, SubVPSDE
from scoresde.samplers import NonFiniteError
from scoresde.samplers.ode import ODESampler
from scoresde.samplers.pc import EulerMaruyamaSampler, PCSampler
from scoresde.toy import benchmark_mixture_2d

GM = benchmark_mixture_2d()
SDE = VPSDE()
SCORE = GM.score_fn(SDE)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CountingScore:
    """Wraps a score_fn and counts its calls and the batch sizes it sees."""

    def __init__(self, score_fn):
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],)  # t arrives as [B]
        return self.score_fn(x, t)


@pytest.mark.parametrize(
    ("sampler", "nfe"),
    [
        (PCSampler(SDE, num_steps=30, n_steps=2), 90),
        (PCSampler(SDE, corrector=None, num_steps=30), 30),
        (EulerMaruyamaSampler(SDE, num_steps=25), 25),
        (ODESampler(SDE, "rk4", num_steps=5, denoise=True), 21),
        (ODESampler(SDE, "dopri5", rtol=1e-3, atol=1e-3), None),
    ],
)
def test_nfe_accounting(sampler, nfe) -> None:
    score = CountingScore(SCORE)
    sampler.sample(score, (10, 2), generator=gen())
    assert sampler.nfe == score.calls
    if nfe is not None:
        assert sampler.nfe == nfe


def test_non_finite_error_names_step_and_time() -> None:
    """A score that turns NaN below t = 0.5 is caught after the first step that uses it."""

    def score(x, t):
        out = SCORE(x, t)
        return torch.where((t < 0.5)[:, None], torch.full_like(out, float("nan")), out)

    sampler = EulerMaruyamaSampler(SDE, num_steps=10, eps=0.1)  # grid 1.0, 0.91, ..., 0.1
    grid = torch.linspace(1.0, 0.1, 11).tolist()
    first_bad = next(i for i, t in enumerate(grid) if t < 0.5)
    with pytest.raises(NonFiniteError) as info:
        sampler.sample(score, (8, 2), generator=gen())
    # The CPU guard sums the state every 8 steps (amortised): the report names the step
    # where the NaN was caught and the window in which it first appeared.
    message = str(info.value)
    caught = int(re.search(r"after step (\d+) \(t = ([0-9.]+)\)", message).group(1))
    assert first_bad <= caught < first_bad + 8
    assert f"t = {grid[caught + 1]:.6g}" in message
    window = re.search(r"first appeared between step (\d+) and step (\d+)", message)
    low, high = map(int, window.groups())
    assert low <= first_bad <= high == caught
    assert first_bad + 1 <= sampler.nfe <= first_bad + 8
    # With a callback (which may replace the state) every step is checked: exact step and time.
    with pytest.raises(NonFiniteError) as info:
        sampler.sample(score, (8, 2), generator=gen(), callback=lambda *a: None)
    message = str(info.value)
    assert f"after step {first_bad} (t = {grid[first_bad + 1]:.6g})" in message
    assert sampler.nfe == first_bad + 1
    # The ODE sampler and an infinite value are caught the same way.
    with pytest.raises(NonFiniteError, match="step 0"):
        ODESampler(SDE, "euler", num_steps=3).sample(
            lambda x, t: torch.full_like(x, float("inf")), (4, 2), generator=gen()
        )


def test_callback_sees_every_step_and_may_replace_x() -> None:
    seen = []

    def callback(step, t, x):
        seen.append((step, t, x.clone()))
        if step == 4:
            return torch.zeros_like(x)  # replaces the state after step 4
        return None

    sampler = ODESampler(SDE, "euler", num_steps=5, eps=0.1)
    out = sampler.sample(SCORE, (6, 2), generator=gen(), callback=callback)
    assert [s for s, _, _ in seen] == list(range(5))
    grid = torch.linspace(1.0, 0.1, 6).tolist()
    assert [t for _, t, _ in seen] == pytest.approx(grid[1:])
    assert torch.equal(out, torch.zeros(6, 2))
    # Replacing x mid-run changes the rest of the trajectory (PC: last step's mean).
    calls = []

    def pin(step, t, x):
        calls.append(step)
        return torch.full_like(x, 0.25) if step == 29 else None

    pc = PCSampler(SDE, num_steps=30)
    out = pc.sample(SCORE, (6, 2), generator=gen(), callback=pin)
    assert calls == list(range(30)) and torch.equal(out, torch.full((6, 2), 0.25))
    with pytest.raises(ValueError, match="callback"):
        sampler.sample(SCORE, (6, 2), generator=gen(), callback=lambda s, t, x: x[:1])


def test_score_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="score_fn must return a tensor shaped like x"):
        EulerMaruyamaSampler(SDE, num_steps=3).sample(lambda x, t: x[:, :1], (4, 2))
    with pytest.raises(ValueError, match="score_fn"):
        PCSampler(SDE, num_steps=30).sample(lambda x, t: x.sum(), (4, 2))
    with pytest.raises(TypeError, match="score_fn"):
        ODESampler(SDE, num_steps=3).sample(None, (4, 2))


@pytest.mark.parametrize(
    "sampler",
    [
        PCSampler(VESDE(), num_steps=30),
        EulerMaruyamaSampler(SubVPSDE(), num_steps=30),
        ODESampler(SDE, "heun", num_steps=10),
    ],
)
def test_seeded_runs_are_bit_identical(sampler) -> None:
    score = GM.score_fn(sampler.sde)
    a = sampler.sample(score, (50, 2), generator=gen(3))
    b = sampler.sample(score, (50, 2), generator=gen(3))
    c = sampler.sample(score, (50, 2), generator=gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "sampler",
    [
        EulerMaruyamaSampler(SDE, num_steps=40),
        PCSampler(SDE, "ancestral", "ald", num_steps=40),
        ODESampler(SDE, "rk4", num_steps=5),
    ],
)
def test_batch_invariant_sample_i_does_not_depend_on_the_batch(sampler) -> None:
    small = sampler.sample(
        SCORE, (10, 2), generator=gen(7), dtype=torch.float64, batch_invariant=True
    )
    large = sampler.sample(
        SCORE, (1000, 2), generator=gen(7), dtype=torch.float64, batch_invariant=True
    )
    torch.testing.assert_close(large[:10], small, rtol=1e-12, atol=1e-12)
    # Without it the generator's stream is split by the batch size (the usual behaviour).
    plain = sampler.sample(SCORE, (1000, 2), generator=gen(7), dtype=torch.float64)
    assert not torch.allclose(plain[:10], small)


def test_progress_bar_runs_and_changes_nothing(capsys) -> None:
    sampler = EulerMaruyamaSampler(SDE, num_steps=15)
    quiet = sampler.sample(SCORE, (5, 2), generator=gen())
    shown = sampler.sample(SCORE, (5, 2), generator=gen(), progress=True)
    assert torch.equal(quiet, shown)
    assert "EulerMaruyamaSampler" in capsys.readouterr().err
    PCSampler(SDE, num_steps=25).sample(SCORE, (5, 2), generator=gen(), progress=True)
    assert "PCSampler" in capsys.readouterr().err


def test_x_init_and_dtype_device_follow_it() -> None:
    x_T = torch.randn(7, 2, generator=gen(1), dtype=torch.float64)
    keep = x_T.clone()
    sampler = ODESampler(SDE, "heun", num_steps=10)
    out = sampler.sample(SCORE, (7, 2), x_init=x_T, dtype=torch.float32)  # x_init's dtype wins
    assert out.shape == (7, 2) and out.dtype == torch.float64 and out.device == x_T.device
    # shape=None (or a placeholder that is no sample shape) takes x_init's shape.
    assert torch.equal(sampler.sample(SCORE, None, x_init=x_T), out)
    assert torch.equal(sampler.sample(SCORE, (0,), x_init=x_T), out)
    assert torch.equal(x_T, keep)  # not modified in place
    again = sampler.sample(SCORE, (7, 2), x_init=x_T)
    assert torch.equal(out, again)  # deterministic from x_init
    other = sampler.sample(SCORE, (7, 2), x_init=x_T + 1)
    assert not torch.allclose(out, other)
    # Stochastic samplers start from x_init too: same x_init and seed, same result.
    em = EulerMaruyamaSampler(SDE, num_steps=10)
    a = em.sample(SCORE, (7, 2), x_init=x_T, generator=gen())
    b = em.sample(SCORE, (7, 2), x_init=x_T, generator=gen())
    assert torch.equal(a, b) and a.dtype == torch.float64
    with pytest.raises(ValueError, match="x_init"):
        em.sample(SCORE, (7, 2), x_init=torch.zeros(7))


@pytest.mark.parametrize("shape", [(4, 2), (3, 5), (3, 2, 1), [2, 2]])
def test_x_init_with_a_disagreeing_shape_is_refused(shape) -> None:
    """x_init (3, 2) with shape (4, 2) used to return 3 samples without a word."""
    x_T = torch.randn(3, 2, generator=gen(2))
    for sampler in (ODESampler(SDE, "euler", num_steps=4), EulerMaruyamaSampler(SDE, 4)):
        with pytest.raises(ValueError, match=r"\(3, 2\)") as err:
            sampler.sample(SCORE, shape, x_init=x_T, generator=gen())
        assert str(tuple(shape)) in str(err.value) and "x_init" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept_end_to_end(dtype) -> None:
    for sampler in (
        PCSampler(SDE, num_steps=30),
        EulerMaruyamaSampler(SDE, num_steps=10),
        ODESampler(SDE, "dopri5", rtol=1e-3, atol=1e-3),
    ):
        out = sampler.sample(SCORE, (6, 1, 2), generator=gen(), dtype=dtype)
        assert out.dtype == dtype and out.shape == (6, 1, 2)
        assert torch.isfinite(out).all()


def test_sample_argument_validation() -> None:
    sampler = EulerMaruyamaSampler(SDE, num_steps=3)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(SCORE, (5,))
    with pytest.raises(TypeError, match="dtype"):
        sampler.sample(SCORE, (5, 2), dtype=torch.int64)
    with pytest.raises(TypeError, match="generator"):
        sampler.sample(SCORE, (5, 2), generator=0)


def test_sampler_registry_maps_cli_names_to_sampler_classes() -> None:
    from scoresde import VPSDE
    from scoresde.samplers import SAMPLERS, Sampler

    assert {"pc", "em", "ode", "ddim", "dpm", "edm", "adaptive"} <= set(SAMPLERS)
    for name, cls in SAMPLERS.items():
        assert issubclass(cls, Sampler), name
        assert isinstance(cls(VPSDE()), Sampler), name


# --- the cached time tensors -------------------------------------------------------------------


def test_time_tensors_survive_a_score_that_writes_into_t() -> None:
    """Grid times are cached across runs as read-only [B] views; at B = 1 a score can write
    into t in place, which must not change the times later runs see."""
    sampler = ODESampler(SDE, "heun", num_steps=3)
    expected = [1.0, 1.0 + (1e-3 - 1.0) / 3]

    def vandal(x, t):
        t.mul_(0.0)  # allowed at B = 1 (a size-1 dimension does not overlap itself)
        return -x

    sampler.sample(vandal, (1, 2), generator=gen())
    seen = []

    def record(x, t):
        seen.append(float(t[0]))
        return -x

    sampler.sample(record, (1, 2), generator=gen())
    assert seen[:2] == pytest.approx(expected, rel=1e-6, abs=0)


def test_time_tensors_made_under_inference_mode_work_with_autograd() -> None:
    """A run inside torch.inference_mode fills the time cache; a later run whose score
    differentiates through t (as guidance does) must still work."""
    sampler = ODESampler(SDE, "euler", num_steps=2)
    with torch.inference_mode():
        sampler.sample(SCORE, (4, 2), generator=gen())

    def grad_score(x, t):
        with torch.enable_grad():
            y = x.detach().requires_grad_(True)
            energy = (t[:, None] * y.square()).sum() / 2
            (g,) = torch.autograd.grad(energy, y)
        return -g

    out = sampler.sample(grad_score, (4, 2), generator=gen())
    assert torch.isfinite(out).all()


def test_a_nan_in_the_users_x_init_is_named_not_blamed_on_the_score() -> None:
    from scoresde.samplers import SAMPLERS

    sde, gm = VPSDE(), benchmark_mixture_2d()
    x_init = torch.zeros(5, 2)
    x_init[3, 1] = torch.inf
    for name, cls in SAMPLERS.items():
        sampler = cls(sde) if name == "adaptive" else cls(sde, num_steps=30)
        with pytest.raises(ValueError, match=r"x_init must be finite.*1 of its 5 rows.*row 3"):
            sampler.sample(gm.score_fn(sde), None, x_init=x_init)


@pytest.mark.parametrize("name", ["ddim", "dpm", "edm", "ode", "em", "sa"])
def test_a_num_steps_that_disagrees_with_a_grid_tensor_is_refused(name: str) -> None:
    from scoresde.samplers import SAMPLERS

    cls = SAMPLERS[name]
    grid = torch.linspace(1.0, 1e-3, 11, dtype=torch.float64)  # 10 steps
    assert cls(SDE, time_grid=grid).num_steps == 10  # num_steps left out: the grid's
    assert cls(SDE, num_steps=10, time_grid=grid).num_steps == 10
    with pytest.raises(ValueError, match=r"num_steps=7 disagrees with the time_grid tensor"):
        cls(SDE, num_steps=7, time_grid=grid)
