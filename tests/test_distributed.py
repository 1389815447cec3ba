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
