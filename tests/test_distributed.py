"""Two-process DDP training under torchrun on CPU (gloo) equals one process with the same
global batch, and both ranks hold identical weights."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scoresde.distributed import DistInfo, all_reduce_mean, env_requests_distributed

HERE = Path(__file__).parent
SCRIPT = HERE / "_ddp_train.py"


def _helper():
    spec = importlib.util.spec_from_file_location("_ddp_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def helper_steps() -> int:
    return _helper().STEPS


def test_torchrun_two_processes_match_a_single_process(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Identical on both ranks, bit for bit (same gradients after the all-reduce).
    for key in ("model", "ema"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), (key, name)
    assert torch.equal(ranks[0]["history"], ranks[1]["history"])
    # Each rank saw its own half of every global batch of 32.
    assert ranks[0]["inputs"].shape == (helper_steps(), 16, 2)
    assert not torch.allclose(ranks[0]["inputs"], ranks[1]["inputs"])
    # Only rank 0 wrote checkpoints, and they are readable.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest.pt", "metrics.csv"]

    helper = _helper()
    single = helper.make_trainer(distributed=False)
    x, y = helper.make_data()
    seen: list[torch.Tensor] = []
    single.model.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    single.fit(x, helper.STEPS, labels=y, progress=False)
    # The two slices together are exactly the single process's global batches (same x_t).
    both = torch.cat([ranks[0]["inputs"], ranks[1]["inputs"]], dim=1)
    assert torch.equal(both, torch.stack(seen))
    assert ranks[0]["step"] == single.step == helper.STEPS
    changed = 0
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][name], value, rtol=1e-5, atol=1e-5)
        changed += not torch.equal(value, helper.make_trainer().model.state_dict()[name])
    for name, value in single.ema_model.state_dict().items():
        torch.testing.assert_close(ranks[0]["ema"][name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ranks[0]["history"], torch.tensor(single.history, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    assert changed > 0  # training moved the weights, so the comparison means something


def test_single_process_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not env_requests_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert env_requests_distributed()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_mean(t, DistInfo(False, 0, 1, 0)), t)


# --- sharded sampling and likelihoods ---------------------------------------------------------


def _saved_model(folder: Path) -> Path:
    """A small model with a data scaler, saved for the command line (weights untrained but
    perturbed, so every sample is a non-trivial function of its noise)."""
    from scoresde.data import DataScaler
    from scoresde.training import build_model

    model = build_model("vp", "mlp", (3,), net_kwargs={"hidden": 16, "num_blocks": 1}, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    scaler = DataScaler("standard", per_feature=True).fit(torch.randn(50, 3) * 2 + 1)
    return model.save_pretrained(folder / "model", data_scaler=scaler)


def _torchrun(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, "-m", "scoresde", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_torchrun_sample_and_likelihood_equal_one_process(tmp_path: Path) -> None:
    import numpy as np

    from scoresde.cli import main

    model = _saved_model(tmp_path)
    # 10 samples in batches of 3: rank 0 gets batches 0 and 2 (6 samples), rank 1 batches
    # 1 and 3 (4 samples), so the gather handles uneven shares.
    common = ["--sampler", "em", "--steps", "4", "--num-samples", "10", "--batch-size", "3"]
    common += ["--seed", "5", "--quiet", "--device", "cpu"]
    proc = _torchrun(["sample", str(model), *common, "--out", str(tmp_path / "two.npz")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 processes" in proc.stdout
    assert main(["sample", str(model), *common, "--out", str(tmp_path / "one.npz")]) == 0
    two, one = (np.load(tmp_path / f"{n}.npz")["samples"] for n in ("two", "one"))
    assert one.shape == (10, 3) and np.array_equal(two, one)
    # Per-point log-likelihoods with Hutchinson probes: 7 points in batches of 2.
    np.save(tmp_path / "points.npy", np.random.default_rng(0).normal(size=(7, 3)))
    common = [str(model), str(tmp_path / "points.npy"), "--num-points", "7", "--batch-size", "2"]
    common += ["--trace", "hutchinson", "--rtol", "1e-3", "--seed", "1", "--quiet"]
    proc = _torchrun(["likelihood", *common, "--per-point", str(tmp_path / "two_ll.npz")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main(["likelihood", *common, "--per-point", str(tmp_path / "one_ll.npz")]) == 0
    two, one = (np.load(tmp_path / f"{n}_ll.npz")["logp"] for n in ("two", "one"))
    assert one.shape == (7,) and np.isfinite(one).all() and np.array_equal(two, one)


def test_sample_entry_point_in_one_process_matches_one_batch() -> None:
    from scoresde import VPSDE
    from scoresde.distributed import SINGLE, chunks, sample
    from scoresde.samplers import DDIMSampler

    sampler = DDIMSampler(VPSDE(), num_steps=5, eta=1.0)

    def score(x, t):
        return -x * (1 + t[:, None])

    out = sample(sampler, score, 11, (2,), seed=4, batch_size=4, dtype=torch.float64, info=SINGLE)
    whole = sampler.sample(
        score,
        (11, 2),
        generator=torch.Generator().manual_seed(4),
        dtype=torch.float64,
        batch_invariant=True,
    )
    assert torch.equal(out, whole)
    assert chunks(11, 4) == [(0, 4), (4, 4), (8, 3)]
    assert sampler.nfe_total == 3 * 5


def test_likelihood_probes_per_point_do_not_depend_on_batches() -> None:
    from scoresde import VPSDE
    from scoresde.distributed import SINGLE, log_likelihood
    from scoresde.likelihood import dataset_log_likelihood
    from scoresde.toy import benchmark_mixture_2d

    sde = VPSDE()
    mix = benchmark_mixture_2d()
    score = mix.score_fn(sde)
    x = mix.sample(9, generator=torch.Generator().manual_seed(0)).double()
    kw = dict(trace="hutchinson", method="dopri5_per_sample", rtol=1e-3, atol=1e-3)
    runs = [
        dataset_log_likelihood(
            score,
            sde,
            x,
            b,
            progress=False,
            batch_invariant=True,
            generator=torch.Generator().manual_seed(2),
            **kw,
        ).logp
        for b in (2, 9)
    ]
    # Each point has its own probes and its own steps: the batching changes nothing.
    assert torch.equal(runs[0], runs[1])
    plain = dataset_log_likelihood(
        score, sde, x, 2, progress=False, generator=torch.Generator().manual_seed(2), **kw
    ).logp
    assert not torch.equal(plain, runs[0])  # shared-generator probes differ per batch
    # The sharding entry point in one process: the same values, and a total NFE.
    logp, nfe = log_likelihood(score, sde, x, batch_size=2, seed=2, info=SINGLE, **kw)
    assert torch.equal(logp, runs[0]) and nfe > 0


_THREADS_AFTER_SHUTDOWN = """
import glob, sys
import torch.distributed as dist
from scoresde import distributed as sdist
from scoresde.cli._common import _load_checkpoint
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
_load_checkpoint(sys.argv[1], "cpu")  # builds the model on the meta device first
sdist.shutdown()
print(sorted(open(p).read().strip() for p in glob.glob("/proc/self/task/*/comm")))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_loading_a_model_leaves_no_gloo_threads_after_shutdown(tmp_path: Path) -> None:
    """Rank 1 of `torchrun -m scoresde sample` died now and then with SIGABRT ("terminate
    called without an active exception") after the output was written: loading the model
    ran a seeded randn on the meta device, which imports torch._dynamo, and that kept the
    process group alive after destroy_process_group, so its gloo threads raced the exit."""
    model = _saved_model(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", _THREADS_AFTER_SHUTDOWN, str(model), str(tmp_path / "store")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = proc.stdout.strip().splitlines()[-1]
    assert "gloo" not in threads, threads
