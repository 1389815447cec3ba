"""Training never loses a user's work (issue 16.2, 16.5; issue 11.3): a diverging run stops
with a clear error and never writes a checkpoint with non-finite weights over a good one;
isolated bad steps can be skipped; NaN/Inf data is refused with the row named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scoresde import VPSDE, DSMLoss, Trainer
from scoresde.toy import benchmark_mixture_2d
from scoresde.training import TrainingDivergedError, build_model, read_checkpoint


def _trainer(tmp: Path | None = None, **kwargs) -> Trainer:
    model = build_model(VPSDE(), "mlp", (2,), net_kwargs={"hidden": 16, "num_blocks": 1})
    opts = dict(batch_size=32, lr=1e-3, warmup_steps=1, progress=False, log_every=10)
    opts.update(kwargs)
    return Trainer(model, DSMLoss(model.sde), checkpoint_dir=tmp, **opts)


def _data(n: int = 256) -> torch.Tensor:
    return benchmark_mixture_2d().sample(n, generator=torch.Generator().manual_seed(0))


def _finite_checkpoint(path: Path) -> dict:
    ckpt = read_checkpoint(path)
    for what in ("model", "ema"):
        for name, t in ckpt[what].items():
            assert torch.isfinite(t).all(), (what, name)
    return ckpt


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, checkpoint_every=20)
    trainer.fit(_data(), 20)
    assert read_checkpoint(tmp_path)["step"] == 20
    for group in trainer.optimizer.param_groups:  # what --lr 1e6 does
        group["lr"] = 1e6
    trainer.scheduler.base_lrs = [1e6]
    with pytest.raises(TrainingDivergedError, match=r"non-finite .* at step 2\d") as info:
        trainer.fit(_data(), 100)
    assert "step 20) is kept" in str(info.value)
    ckpt = _finite_checkpoint(tmp_path / "latest.pt")
    assert ckpt["step"] == 20
    # Saving the diverged weights by hand is refused as well, naming the tensors.
    with pytest.raises(TrainingDivergedError, match="non-finite weights in model"):
        trainer.save()
    assert read_checkpoint(tmp_path)["step"] == 20


def test_save_refuses_non_finite_ema_weights(tmp_path: Path) -> None:
    trainer = _trainer()
    with torch.no_grad():
        next(trainer.ema_model.parameters())[0] = float("inf")
    with pytest.raises(TrainingDivergedError, match="ema"):
        trainer.save(tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


class _FlakyLoss:
    """DSMLoss, except on the calls listed in `bad` (1-based), where the loss is NaN."""

    def __init__(self, sde, bad: set[int]) -> None:
        self.loss, self.bad, self.calls = DSMLoss(sde), bad, 0

    def __call__(self, model, x, generator=None, **kw):
        self.calls += 1
        value = self.loss(model, x, generator=generator, **kw)
        return value * float("nan") if self.calls in self.bad else value


def test_max_skipped_steps_skips_isolated_bad_steps() -> None:
    trainer = _trainer(max_skipped_steps=2)
    trainer.loss = _FlakyLoss(trainer.model.sde, {4, 9, 10})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit(_data(), 3)
    after3 = [p.detach().clone() for p in trainer.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after3, strict=True))
    trainer.fit(_data(), 1)  # step 4: NaN loss, skipped: no update at all
    for p, q in zip(after3, trainer.model.parameters(), strict=True):
        assert torch.equal(p, q)
    trainer.fit(_data(), 16)
    assert trainer.step == 20
    nan_steps = [i + 1 for i, v in enumerate(trainer.history) if v != v]
    assert nan_steps == [4, 9, 10]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # Three bad steps in a row are too many.
    trainer.loss = _FlakyLoss(trainer.model.sde, {2, 3, 4})
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps"):
        trainer.fit(_data(), 10)


def test_max_skipped_steps_is_validated_and_stored(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_skipped_steps"):
        _trainer(max_skipped_steps=-1)
    trainer = _trainer(tmp_path, max_skipped_steps=3)
    trainer.fit(_data(), 2)
    assert Trainer.from_checkpoint(tmp_path).max_skipped_steps == 3


def test_nan_data_is_refused_naming_the_row() -> None:
    x = _data()
    x[17, 1] = float("nan")
    x[40, 0] = float("inf")
    trainer = _trainer()
    with pytest.raises(ValueError, match=r"row 17 is the first \(2 of 256 rows\)"):
        trainer.fit(x, 5)
    assert trainer.step == 0
    clean = _data(32)
    bad = clean.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match=r"batch 3 of the iterable\) .* row 3"):
        trainer.fit([clean, clean, bad], 5)


def test_load_data_names_the_first_non_finite_row(tmp_path: Path) -> None:
    from scoresde.data import load_data

    x = _data(50).numpy()
    x[12, 0] = float("inf")
    x[30, 1] = float("nan")
    for source in (x, torch.from_numpy(x)):
        with pytest.raises(ValueError, match=r"row 12 is the first \(2 of 50 rows\)"):
            load_data(source)
    import numpy as np

    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(ValueError, match="row 12"):
        load_data(tmp_path / "bad.npy")
    # float64 values beyond float32's range become Inf when loaded as float32: refused too.
    big = np.ones((4, 2))
    big[2, 1] = 1e300
    with pytest.raises(ValueError, match="row 2"):
        load_data(big)


def test_history_is_complete_when_ckpt_every_is_not_a_multiple_of_log_every(
    tmp_path: Path,
) -> None:
    """Issue 16.5: losses still pending at a checkpoint were missing from it, so a resumed run
    had fewer history entries than steps."""
    trainer = _trainer(tmp_path, checkpoint_every=7, log_every=10)
    trainer.fit(_data(), 15)
    ckpt = read_checkpoint(tmp_path / "latest.pt")
    assert ckpt["step"] == 15 and ckpt["history"].numel() == 15
    # Resume from the step-14 state: interrupt-free, the history stays one entry per step.
    trainer = _trainer(tmp_path, checkpoint_every=7, log_every=10, keep_checkpoints=True)
    trainer.fit(_data(), 14)
    mid = read_checkpoint(tmp_path / "step_00000007.pt")
    assert mid["history"].numel() == 7
    resumed = Trainer.from_checkpoint(tmp_path / "step_00000007.pt", checkpoint_dir=tmp_path)
    resumed.fit(_data(), 13)
    assert resumed.step == 20 and len(resumed.history) == 20


def test_stale_temp_files_of_the_run_folder_are_removed_on_start(tmp_path: Path) -> None:
    """Issue 16.5 / 11.3: a run killed while checkpointing leaves .latest.pt.*.tmp files."""
    stale = [tmp_path / ".latest.pt.k3j2_1x.tmp", tmp_path / ".step_00000020.pt.a8d.tmp"]
    keep = [tmp_path / ".notes.txt.tmp", tmp_path / "latest.pt.tmp", tmp_path / "data.npy"]
    for p in stale + keep:
        p.write_bytes(b"x" * 100)
    _trainer(tmp_path)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


def test_checkpoint_dir_that_is_a_file_is_refused_at_once(tmp_path: Path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(ValueError, match="is not a folder"):
        _trainer(afile)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        _trainer(afile / "run")
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_stops_cleanly(tmp_path: Path, sig: str) -> None:
    """Issue 16.4: Ctrl-C / SIGTERM finish the current step, save atomically and stop (a
    real signal, sent to this process from the callback after step 14). The CLI's
    subprocess test is in test_cli_safety.py."""
    import os
    import signal

    from scoresde.training import TrainingInterrupted

    signum = getattr(signal, sig)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = _trainer(tmp_path, checkpoint_every=10**6)

    def callback(tr: Trainer) -> None:
        if tr.step == 14:
            os.kill(os.getpid(), signum)

    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(_data(), 10**6, callback=callback, callback_every=7)
    assert info.value.signum == signum and info.value.step == trainer.step
    assert 14 <= trainer.step < 10**6
    assert info.value.checkpoint == tmp_path / "latest.pt"
    assert isinstance(info.value, KeyboardInterrupt)
    ckpt = _finite_checkpoint(tmp_path / "latest.pt")
    assert ckpt["step"] == trainer.step and ckpt["history"].numel() == trainer.step
    assert not list(tmp_path.glob(".*.tmp"))
    # The handlers are restored; the trainer continues from where it stopped.
    assert {s: signal.getsignal(s) for s in before} == before
    resumed = Trainer.from_checkpoint(tmp_path)
    resumed.fit(_data(), 3)
    assert resumed.step == trainer.step + 3


def test_a_checkpoint_spec_is_checked_against_its_tensors_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16.5: a small file asking for hidden=2048 made the reader allocate the big
    network before noticing that the weights do not fit. Now the spec is built on the meta
    device (no memory) and compared first, in load_model, from_checkpoint and the CLI."""
    import scoresde.recipes as recipes  # build_model's home (re-exported by training)
    from scoresde.cli import main
    from scoresde.training import CheckpointError, load_model

    trainer = _trainer()
    path = tmp_path / "small.pt"
    trainer.save(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["net_kwargs"]["hidden"] = 2048
    torch.save(ckpt, tmp_path / "lying.pt")

    devices: list[str] = []
    real = recipes.build_model

    def spy(*args, **kwargs):
        devices.append(torch.empty(0).device.type)  # the default device while building
        return real(*args, **kwargs)

    monkeypatch.setattr(recipes, "build_model", spy)
    load_model(path)
    assert devices == ["meta", "cpu"]  # checked, then built
    for load in (load_model, Trainer.from_checkpoint):
        devices.clear()
        with pytest.raises(CheckpointError, match=r"shape mismatch .*2048"):
            load(tmp_path / "lying.pt")
        assert devices == ["meta"]
    devices.clear()
    assert main(["sample", str(tmp_path / "lying.pt"), "--out", str(tmp_path / "s.npz")]) == 1
    assert "does not fit" in capsys.readouterr().err
    assert devices == ["meta"]
    # A spec that is not even buildable is a CheckpointError too, not a traceback.
    ckpt["config"]["model"]["net_kwargs"] = {"no_such_option": 1}
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="cannot be built"):
        load_model(tmp_path / "odd.pt")


def test_skipping_also_catches_non_finite_gradients_without_clipping() -> None:
    trainer = _trainer(max_skipped_steps=1, grad_clip=None)
    trainer.fit(_data(), 2)
    before = [p.detach().clone() for p in trainer.model.parameters()]

    def nan_grad_loss(model, x, generator=None, **kw):
        """1.0, with NaN gradients: d sqrt(u)/du = inf at u = 0, times du/dp = 0."""
        return torch.sqrt(next(model.parameters()).sum() * 0.0) + 1.0

    trainer.loss = nan_grad_loss
    trainer.fit(_data(), 1)
    assert trainer.step == 3 and trainer.history[-1] != trainer.history[-1]  # skipped: NaN
    for p, q in zip(before, trainer.model.parameters(), strict=True):
        assert torch.equal(p, q)
