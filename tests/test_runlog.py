"""The training metrics log: metrics.csv rows (step, loss, lr, grad_norm, seconds) that
match the trainer, resume without duplicate or missing steps, TensorBoard events when
tensorboard is installed, and the CLI's loss plot and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scoresde.losses import DSMLoss
from scoresde.runlog import read_metrics, tensorboard_available
from scoresde.sdes import VPSDE
from scoresde.training import Trainer, build_model, read_checkpoint

DATA = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))


def _trainer(folder: Path | None, **kwargs) -> Trainer:
    model = build_model(VPSDE(), "mlp", (2,), net_kwargs={"hidden": 16, "num_blocks": 1})
    opts = dict(batch_size=32, lr=1e-3, warmup_steps=8, checkpoint_every=7, log_every=4)
    opts.update(kwargs)
    return Trainer(model, DSMLoss(model.sde), checkpoint_dir=folder, progress=False, **opts)


def test_rows_match_the_trainer(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, grad_clip=None, tensorboard=False)
    trainer.fit(DATA, 18)
    m = read_metrics(tmp_path)
    assert m["step"] == list(range(1, 19))
    assert m["loss"] == pytest.approx(trainer.history, rel=1e-7)
    # Linear warm-up over 8 steps: step n used lr * n / 8, then lr.
    assert m["lr"] == pytest.approx([1e-3 * min(n, 8) / 8 for n in m["step"]], rel=1e-12)
    # The last step's gradients are still in the parameters (no clipping): same norm.
    grads = [p.grad for p in trainer.model.parameters()]
    assert m["grad_norm"][-1] == pytest.approx(float(torch.nn.utils.get_total_norm(grads)))
    assert all(g > 0 for g in m["grad_norm"])
    assert all(0 < a <= b for a, b in zip(m["seconds"], m["seconds"][1:], strict=False))
    # A second fit in the same process appends.
    trainer.fit(DATA, 3)
    assert read_metrics(tmp_path)["step"] == list(range(1, 22))


def test_clipped_norm_is_the_norm_before_clipping(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, grad_clip=1e-4, tensorboard=False)
    trainer.fit(DATA, 4)
    m = read_metrics(tmp_path)
    grads = [p.grad for p in trainer.model.parameters()]
    assert float(torch.nn.utils.get_total_norm(grads)) == pytest.approx(1e-4, rel=1e-3)
    assert min(m["grad_norm"]) > 1e-2  # the logged norms are the unclipped ones


def test_resume_after_a_crash_has_every_step_once(tmp_path: Path) -> None:
    # A run that checkpointed at step 14, trained on to 20, and died before saving again.
    first = _trainer(tmp_path, keep_checkpoints=True, tensorboard=False)
    first.fit(DATA, 20)
    original = read_metrics(tmp_path)
    ckpt = tmp_path / "step_00000014.pt"
    # The mid-run checkpoint holds all 14 losses even though 14 is not a multiple of
    # log_every = 4 (they are synchronised before every checkpoint).
    assert read_checkpoint(ckpt)["history"].numel() == 14
    resumed = Trainer.from_checkpoint(ckpt, checkpoint_dir=tmp_path, tensorboard=False)
    assert resumed.step == 14
    resumed.fit(DATA, 6)
    again = read_metrics(tmp_path)
    assert again["step"] == list(range(1, 21))  # no duplicate, no gap
    # Resume is bit-exact, so the re-trained steps 15..20 log the same losses and norms.
    assert again["loss"] == original["loss"] and again["grad_norm"] == original["grad_norm"]
    assert again["lr"] == original["lr"]
    # The clock continues from the kept rows.
    assert again["seconds"][14] >= again["seconds"][13]
    assert resumed.history == again["loss"]


def test_tensorboard_events_when_installed(tmp_path: Path) -> None:
    if tensorboard_available():
        _trainer(tmp_path, tensorboard=True).fit(DATA, 5)
        events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0
    else:
        with pytest.raises(ValueError, match="tensorboard=True needs the tensorboard package"):
            _trainer(tmp_path, tensorboard=True)
        _trainer(tmp_path).fit(DATA, 5)  # default: events only when installed
        assert not (tmp_path / "tensorboard").exists()
        assert read_metrics(tmp_path)["step"] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "latest.pt",
        "metrics.csv",
    ]


def test_no_folder_no_log_and_foreign_files_refused(tmp_path: Path) -> None:
    _trainer(None).fit(DATA, 3)  # no checkpoint_dir: nothing written anywhere
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a scoresde metrics log"):
        _trainer(tmp_path, tensorboard=False).fit(DATA, 3)
    assert (tmp_path / "metrics.csv").read_text() == "a,b\n1,2\n"


def test_cli_resume_appends_and_plots_from_the_log(tmp_path: Path) -> None:
    from scoresde.cli import main

    run = tmp_path / "run"
    argv = ["train", "two_moons", "--ckpt-dir", str(run), "--hidden", "16", "--blocks", "1"]
    argv += ["--batch-size", "16", "--ckpt-every", "3", "--plot-every", "0", "--quiet"]
    assert main([*argv, "--steps", "5", "--device", "cpu"]) == 0
    assert read_metrics(run)["step"] == [1, 2, 3, 4, 5]
    assert main([*argv, "--steps", "9", "--resume", "--device", "cpu"]) == 0
    m = read_metrics(run)
    assert m["step"] == list(range(1, 10))
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
