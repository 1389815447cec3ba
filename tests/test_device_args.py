"""Every public `device=` argument is checked at the entry point: a device this machine
lacks (CUDA / MPS unavailable, an out-of-range CUDA index), an unparseable string or a wrong
type is a ValueError / TypeError naming the argument, not torch's bare error deep inside."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import scoresde.distributed as sdist
from scoresde import (
    VPSDE,
    DSMLoss,
    EulerMaruyamaSampler,
    ODESampler,
    ScoreModel,
    Trainer,
    optimize_time_grid,
    smc_sample,
)
from scoresde._validation import check_device, resolve_device_dtype
from scoresde.bench.runner import run_accuracy
from scoresde.calibration import calibrate
from scoresde.cli._common import _setup_torch
from scoresde.interop.torch_solvers import to_torchsde
from scoresde.metrics import sampling_floor
from scoresde.pretrained import load_pretrained
from scoresde.samplers import DPMSolverSampler
from scoresde.samplers.grids import time_grid
from scoresde.toy import benchmark_mixture_2d, make_dataset
from scoresde.training import build_model, load_model

CUDA = torch.cuda.is_available()
MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
MISSING_INDEX = f"cuda:{torch.cuda.device_count() + 5}"


def _score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -x


def _tiny_model() -> ScoreModel:
    return build_model("vp", "mlp", (2,), net_kwargs={"hidden": 8, "num_blocks": 1}, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pretrained folder and a training checkpoint of a tiny model."""
    root = tmp_path_factory.mktemp("device_args")
    model = _tiny_model()
    folder = model.save_pretrained(root / "pretrained")
    trainer = Trainer(
        model, DSMLoss(model.sde), batch_size=8, checkpoint_dir=root / "ckpt", progress=False
    )
    trainer.fit(torch.randn(16, 2), 1)
    return {"pretrained": folder, "checkpoint": root / "ckpt" / "latest.pt"}


def _entry_points(saved: dict[str, Path]) -> dict[str, Callable[[Any], Any]]:
    """Each public function that takes `device=`, called cheaply with the given device."""
    sde = VPSDE()
    mixture = benchmark_mixture_2d()
    ode = to_torchsde(sde, _score)

    def dist_sample(d: Any) -> Any:
        return sdist.sample(ODESampler(sde, rtol=1e-3, atol=1e-3), _score, 3, (2,), device=d)

    def trainer(d: Any) -> Any:
        model = _tiny_model()
        return Trainer(model, DSMLoss(model.sde), batch_size=8, progress=False, device=d)

    def smc(d: Any) -> Any:
        return smc_sample(
            EulerMaruyamaSampler(sde, 3), _score, lambda x, t: -x.pow(2).sum(1), (2, 2),
            particles=2, device=d,
        )  # fmt: skip

    def optimize(d: Any) -> Any:
        return optimize_time_grid(
            lambda g: DPMSolverSampler(sde, 2, time_grid=g), _score, sde, 2, data_shape=(2,),
            num_pilot=4, max_evals=2, device=d,
        )  # fmt: skip

    return {
        "resolve_device_dtype": lambda d: resolve_device_dtype(None, d, None),
        "Sampler.sample": lambda d: EulerMaruyamaSampler(sde, 2).sample(_score, (2, 2), device=d),
        "SDE.prior_sampling": lambda d: sde.prior_sampling((2, 2), device=d),
        "smc_sample": smc,
        "GaussianMixture.sample": lambda d: mixture.sample(4, device=d),
        "make_dataset": lambda d: make_dataset("two_moons", 4, device=d),
        "Trainer": trainer,
        "distributed.setup": lambda d: sdist.setup(False, d),
        "distributed.sample": dist_sample,
        "load_pretrained": lambda d: load_pretrained(saved["pretrained"], device=d),
        "ScoreModel.from_pretrained": lambda d: ScoreModel.from_pretrained(
            saved["pretrained"], device=d
        ),
        "load_model": lambda d: load_model(saved["checkpoint"], device=d),
        "time_grid": lambda d: time_grid(sde, 4, device=d),
        "optimize_time_grid": optimize,
        "calibrate": lambda d: calibrate(
            _score, DPMSolverSampler(sde, 2), data_shape=(2,), num_pilot=4, max_evals=2, device=d
        ),
        "sampling_floor": lambda d: sampling_floor(
            mixture, 8, lambda x, y: (x - y).pow(2).mean(), repeats=2, device=d
        ),
        "TorchsdeReverseSDE.times": lambda d: ode.times(device=d),
    }


NAMES = [
    "resolve_device_dtype", "Sampler.sample", "SDE.prior_sampling", "smc_sample",
    "GaussianMixture.sample", "make_dataset", "Trainer", "distributed.setup",
    "distributed.sample", "load_pretrained", "ScoreModel.from_pretrained", "load_model",
    "time_grid", "optimize_time_grid", "calibrate", "sampling_floor", "TorchsdeReverseSDE.times",
]  # fmt: skip


def test_names_cover_every_entry_point(saved: dict[str, Path]) -> None:
    assert sorted(NAMES) == sorted(_entry_points(saved))


@pytest.mark.parametrize("name", NAMES)
def test_missing_cuda_is_a_value_error_naming_device(name: str, saved: dict[str, Path]) -> None:
    call = _entry_points(saved)[name]
    with pytest.raises(ValueError, match=r"device='cuda:\d+' was requested"):
        call(MISSING_INDEX)
    if not CUDA:
        with pytest.raises(ValueError, match=r"device='cuda' was requested.*is_available"):
            call("cuda")
    if not MPS:
        with pytest.raises(ValueError, match=r"device='mps' was requested.*mps\.is_available"):
            call("mps")


@pytest.mark.parametrize("name", NAMES)
def test_bad_strings_and_types(name: str, saved: dict[str, Path]) -> None:
    call = _entry_points(saved)[name]
    with pytest.raises(ValueError, match=r"device must be a torch device.*'banana'"):
        call("banana")
    with pytest.raises(TypeError, match=r"device must be a torch\.device.*float"):
        call(3.5)
    with pytest.raises(TypeError, match=r"device must be"):
        call(True)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_still_works(name: str, saved: dict[str, Path]) -> None:
    call = _entry_points(saved)[name]
    call("cpu")
    call(torch.device("cpu"))


def test_check_device_accepts_what_exists() -> None:
    assert check_device("device", "cpu") == torch.device("cpu")
    assert check_device("device", torch.device("cpu")) == torch.device("cpu")
    assert check_device("device", "meta") == torch.device("meta")
    with pytest.raises(ValueError, match="CUDA device index >= 0"):
        check_device("device", -1)
    with pytest.raises(ValueError, match=r"x_dev="):
        check_device("x_dev", torch.cuda.device_count() + 5)
    if CUDA:
        assert check_device("device", "cuda").type == "cuda"
        assert check_device("device", 0) == torch.device("cuda", 0)
        assert check_device("device", torch.device("cuda", 0)) == torch.device("cuda", 0)
    else:
        with pytest.raises(ValueError, match=r"use device='cpu'"):
            check_device("device", 0)
        with pytest.raises(ValueError, match=r"use device='cpu'"):
            check_device("device", torch.device("cuda"))


def test_bench_runner_and_cli() -> None:
    for bad, err in (("banana", ValueError), (3.5, TypeError), (MISSING_INDEX, ValueError)):
        with pytest.raises(err, match="device"):
            run_accuracy("mixture2d", [], [2], n=4, device=bad)
    with pytest.raises(ValueError, match="--device must be a torch device"):
        _setup_torch(argparse.Namespace(device="banana", threads=None))
    with pytest.raises(ValueError, match=r"--device='cuda:\d+' was requested"):
        _setup_torch(argparse.Namespace(device=MISSING_INDEX, threads=None))
    threads = torch.get_num_threads()
    try:
        assert _setup_torch(argparse.Namespace(device="cpu", threads=None)) == torch.device("cpu")
    finally:
        torch.set_num_threads(threads)
