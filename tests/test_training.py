"""Trainer: a trained 2-D model matches its data, bit-exact resume, refused checkpoints,
EMA / warm-up / clipping / callback mechanics, model building from names."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from scoresde import VPSDE, DDPMLoss, DSMLoss, MLPScoreNet, ScoreModel, Trainer
from scoresde._validation import expand_like
from scoresde.data import DataScaler
from scoresde.toy import benchmark_mixture_2d
from scoresde.training import CheckpointError, build_model, load_model, read_checkpoint


def _tiny_trainer(tmp: Path | None = None, **kwargs) -> Trainer:
    """A conditional MLP with label dropout and importance-sampled likelihood weighting,
    so resume has every kind of random draw to get right."""
    sde = VPSDE()
    model = build_model(
        sde, "mlp", (2,), num_classes=3, net_kwargs={"hidden": 16, "num_blocks": 1}, seed=0
    )
    loss = DSMLoss(sde, weighting="likelihood", importance_sampling=True, label_dropout=0.2)
    opts = dict(batch_size=32, lr=1e-3, warmup_steps=5, ema_decay=0.9, checkpoint_every=7)
    opts.update(kwargs)
    return Trainer(model, loss, checkpoint_dir=tmp, **opts)


def _toy_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = benchmark_mixture_2d().sample(
        n, generator=torch.Generator().manual_seed(0), return_labels=True
    )
    return x, y


def _same_state(a: Trainer, b: Trainer) -> None:
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(a.ema_model.parameters(), b.ema_model.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name])
    assert a.step == b.step and a.history == b.history
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


@torch.no_grad()
def _euler_maruyama(score, sde, n: int, steps: int, g: torch.Generator, eps: float = 1e-3):
    """Reverse-SDE Euler–Maruyama from t = 1 to eps, then Tweedie's denoising step."""
    x = sde.prior_sampling((n, 2), generator=g)
    ts = torch.linspace(1.0, eps, steps + 1)
    for k in range(steps):
        t, dt = ts[k].expand(n), ts[k] - ts[k + 1]
        drift, diffusion = sde.sde(x, t)
        drift = drift - expand_like(diffusion**2, x) * score(x, t)
        noise = torch.randn(x.shape, generator=g)
        x = x - drift * dt + expand_like(diffusion, x) * dt.sqrt() * noise
    t = torch.full((n,), eps)
    sigma, alpha = expand_like(sde.sigma(t), x), expand_like(sde.alpha(t), x)
    return (x + sigma**2 * score(x, t)) / alpha


def test_trained_mlp_reproduces_the_2d_mixture() -> None:
    """2000 steps on the benchmark mixture, then reverse-SDE samples from the EMA model.

    Measured (seed 0): sample NLL 1.34 vs 1.26 for fresh data (the 200-step sampler alone,
    with the exact score, gives 1.30); mode weights within 0.02 of .3/.2/.5.
    """
    mix = benchmark_mixture_2d()
    sde = VPSDE()
    data = mix.sample(20_000, generator=torch.Generator().manual_seed(1))
    model = build_model(sde, "mlp", (2,), net_kwargs={"hidden": 128, "num_blocks": 3}, seed=0)
    trainer = Trainer(
        model,
        DSMLoss(sde),
        lr=2e-3,
        batch_size=256,
        warmup_steps=100,
        decay_steps=2000,
        ema_decay=0.995,
    )
    history = trainer.fit(data, 2000, progress=False)
    assert len(history) == 2000 and trainer.step == 2000
    assert sum(history[-200:]) / 200 < 0.8 * sum(history[:50]) / 50
    n = 3000
    samples = _euler_maruyama(trainer.ema_model, sde, n, 200, torch.Generator().manual_seed(0))
    fresh = mix.sample(n, generator=torch.Generator().manual_seed(2))
    nll = -mix.log_prob(samples.double()).mean().item()
    nll_data = -mix.log_prob(fresh.double()).mean().item()
    weights = mix.responsibilities(samples.double()).argmax(1).bincount(minlength=3) / n
    print(f"trained model: sample NLL {nll:.4f}, data NLL {nll_data:.4f}, modes {weights}")
    assert abs(nll - nll_data) < 0.15
    assert (weights - mix.weights).abs().max() < 0.05


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    x, y = _toy_data()
    straight = _tiny_trainer()
    straight.fit(x, 40, labels=y, progress=False)

    first = _tiny_trainer(tmp_path)
    first.fit(x, 20, labels=y, progress=False)
    assert (tmp_path / "latest.pt").is_file()
    resumed = _tiny_trainer(tmp_path).load(tmp_path)
    assert resumed.step == 20
    resumed.fit(x, 20, labels=y, progress=False)
    _same_state(straight, resumed)
    # Rebuilding everything from the checkpoint alone continues identically too.
    rebuilt = Trainer.from_checkpoint(tmp_path / "latest.pt")
    assert rebuilt.step == 40 and rebuilt.batch_size == 32
    assert isinstance(rebuilt.loss, DSMLoss) and rebuilt.loss.importance_sampling
    resumed.fit(x, 5, labels=y, progress=False)
    rebuilt.fit(x, 5, labels=y, progress=False)
    _same_state(resumed, rebuilt)


def test_bad_checkpoints_are_refused_and_the_good_one_survives(tmp_path: Path) -> None:
    x, y = _toy_data()
    trainer = _tiny_trainer(tmp_path)
    trainer.fit(x, 10, labels=y, progress=False)
    good = tmp_path / "latest.pt"
    good_bytes = good.read_bytes()
    before = [p.clone() for p in trainer.model.parameters()]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "random.pt").write_bytes(os.urandom(4096))
    (bad / "truncated.pt").write_bytes(good_bytes[: len(good_bytes) // 2])
    torch.save({"weights": torch.ones(3)}, bad / "foreign.pt")
    torch.save(torch.ones(3), bad / "tensor.pt")
    other = Trainer(
        build_model("vp", "mlp", (2,), net_kwargs={"hidden": 8, "num_blocks": 1}),
        DSMLoss(VPSDE()),
    )
    other.save(bad / "other_arch.pt")
    messages = {
        "random.pt": "not a readable checkpoint",
        "truncated.pt": "not a readable checkpoint",
        "foreign.pt": "not a scoresde checkpoint",
        "tensor.pt": "not a scoresde checkpoint",
        "other_arch.pt": "does not fit this model",
    }
    for name, message in messages.items():
        with pytest.raises(CheckpointError, match=message):
            trainer.load(bad / name)
        assert isinstance(CheckpointError(""), ValueError)
    with pytest.raises(FileNotFoundError):
        trainer.load(tmp_path / "nothing.pt")
    # Nothing changed: the trainer's weights, its step, and the good checkpoint's bytes.
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.model.parameters(), strict=True))
    assert trainer.step == 10 and good.read_bytes() == good_bytes
    assert read_checkpoint(tmp_path)["step"] == 10


def test_a_crash_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _toy_data()
    trainer = _tiny_trainer(tmp_path)
    trainer.fit(x, 3, labels=y, progress=False)
    good_bytes = (tmp_path / "latest.pt").read_bytes()
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, f)  # some bytes reach the temp file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "latest.pt").read_bytes() == good_bytes
    # No temp files left (metrics.csv is the run's metrics log).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "metrics.csv"]


def test_checkpoint_holds_config_scaler_and_rng(tmp_path: Path) -> None:
    x, y = _toy_data()
    scaler = DataScaler().fit(x)
    trainer = _tiny_trainer(
        tmp_path, data_scaler=scaler, config={"dataset": "mixture3"}, keep_checkpoints=True
    )
    trainer.fit(scaler.transform(x), 14, labels=y, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt")
    assert names == ["latest.pt", "step_00000007.pt", "step_00000014.pt"]
    ckpt = read_checkpoint(tmp_path / "latest.pt")
    cfg = ckpt["config"]
    assert cfg["user"] == {"dataset": "mixture3"}
    assert cfg["model"]["net"] == "mlp" and cfg["sde"]["name"] == "vp"
    assert cfg["loss"]["weighting"] == "likelihood" and cfg["trainer"]["batch_size"] == 32
    assert set(ckpt["rng"]) >= {"torch", "data", "noise"}
    restored = _tiny_trainer().load(tmp_path)
    torch.testing.assert_close(restored.data_scaler.inverse_transform(scaler.transform(x)), x)
    # load_model: the EMA weights in a rebuilt model, plus the scaler, ready to sample.
    loaded = load_model(tmp_path / "step_00000007.pt")
    assert not loaded.model.training and loaded.config["user"] == {"dataset": "mixture3"}
    ema7 = read_checkpoint(tmp_path / "step_00000007.pt")["ema"]
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in ema7.items())
    torch.testing.assert_close(loaded.data_scaler.shift, scaler.shift)
    xt, t = torch.randn(4, 2), torch.rand(4)
    torch.testing.assert_close(
        load_model(tmp_path, ema=False).model(xt, t), trainer.model.eval()(xt, t)
    )


def test_ema_warmup_schedule_and_clipping() -> None:
    sde = VPSDE()
    torch.manual_seed(0)
    model = ScoreModel(MLPScoreNet(2, hidden=16, num_blocks=1, embed_dim=8), sde)
    trainer = Trainer(
        model,
        DSMLoss(sde),
        batch_size=16,
        lr=1e-2,
        warmup_steps=4,
        decay_steps=12,
        min_lr_ratio=0.1,
        grad_clip=1e-3,
        ema_decay=0.8,
        ema_warmup=False,
    )
    x = torch.randn(64, 2)
    lrs = []
    for _ in range(14):
        ema_before = [p.clone() for p in trainer.ema_model.parameters()]
        trainer.fit(x, 1, progress=False)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        # EMA: ema <- 0.8 ema + 0.2 theta, exactly the lerp formula.
        for e0, e, p in zip(
            ema_before, trainer.ema_model.parameters(), trainer.model.parameters(), strict=True
        ):
            torch.testing.assert_close(e, 0.8 * e0 + 0.2 * p, rtol=1e-6, atol=1e-7)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert norm <= 1e-3 * (1 + 1e-4)
    # lr after step n is lr * factor(n): warm-up 2/4, 3/4, 1, then cosine to 0.1 at step 12.
    expected = [1e-2 * trainer._lr_factor(n) for n in range(1, 15)]
    assert lrs == pytest.approx(expected)
    assert lrs[2] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)
    assert trainer.ema_model.training is False
    assert not any(p.requires_grad for p in trainer.ema_model.parameters())


def test_callback_progress_and_dataloader(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _toy_data(96)
    trainer = _tiny_trainer()
    seen: list[int] = []
    trainer.fit(
        x, 9, labels=y, progress=False, callback=lambda t: seen.append(t.step), callback_every=3
    )
    assert seen == [3, 6, 9]
    assert capsys.readouterr().err == ""
    trainer.fit(x, 3, labels=y, progress=True)
    assert "training" in capsys.readouterr().err
    quiet = _tiny_trainer(progress=False)
    quiet.fit(x, 2, labels=y)
    assert capsys.readouterr().err == ""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False
    )
    losses = trainer.fit(loader, 7, progress=False)  # restarts the 3-batch loader
    assert len(losses) == 7 and all(math.isfinite(v) for v in losses)
    assert trainer.step == 19 and len(trainer.history) == 19


def test_ddpm_loss_and_float64_training() -> None:
    sde = VPSDE()
    model = build_model(sde, "mlp", (2,), net_kwargs={"hidden": 16, "num_blocks": 1}).double()
    trainer = Trainer(model, DDPMLoss(sde), batch_size=16)
    trainer.fit(torch.randn(64, 2, dtype=torch.float64), 3, progress=False)
    assert trainer.ema_model.net.out.weight.dtype == torch.float64
    assert trainer.mixed_precision is None  # never on CPU


def test_build_model_names_and_shapes() -> None:
    unet = build_model("ve", "unet", (1, 8, 8), parameterization="x0", num_classes=10)
    out = unet(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10]))
    assert out.shape == (2, 1, 8, 8) and unet.parameterization == "x0"
    mlp = build_model("cosine", "mlp", (3, 4))  # flattened to 12 features
    assert mlp(torch.randn(5, 3, 4), torch.rand(5)).shape == (5, 3, 4)
    a = build_model("vp", "mlp", (2,), seed=3)
    b = build_model("vp", "mlp", (2,), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="sde"):
        build_model("vpp")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model("vp", "unet", (64,))


def test_trainer_argument_errors() -> None:
    sde = VPSDE()
    model = build_model(sde, "mlp", (2,), net_kwargs={"hidden": 8, "num_blocks": 1})
    loss = DSMLoss(sde)
    with pytest.raises(TypeError, match="model"):
        Trainer(lambda x, t: x, loss)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(model, loss, batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        Trainer(model, loss, ema_decay=1.0)
    with pytest.raises(ValueError, match="mixed_precision"):
        Trainer(model, loss, mixed_precision="fp8")
    trainer = Trainer(model, loss, batch_size=8)
    with pytest.raises(TypeError, match="data must be"):
        trainer.fit(3.0, 1, progress=False)
    with pytest.raises(ValueError, match="labels must have shape"):
        trainer.fit(torch.randn(10, 2), 1, labels=torch.zeros(3), progress=False)
    with pytest.raises(ValueError, match="path is required"):
        trainer.save()


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_from_checkpoint_rebuilds_models_built_by_hand(tmp_path: Path, kind: str) -> None:
    """A ScoreModel around a built-in network, made without build_model, is rebuilt too."""
    from scoresde import VESDE, UNet

    sde = VESDE(sigma_max=3.0)
    torch.manual_seed(0)
    if kind == "unet":
        net = UNet(in_channels=2, channels=(8, 16), num_classes=4, time_embedding="fourier")
        x = torch.randn(16, 2, 8, 8)
    else:
        net = MLPScoreNet(6, hidden=24, num_blocks=2, embed_dim=12, num_classes=4)
        x = torch.randn(16, 2, 3)
    model = ScoreModel(net, sde, parameterization="v", scale_input=False)
    y = torch.arange(16) % 4
    trainer = Trainer(model, DSMLoss(sde), batch_size=8, checkpoint_dir=tmp_path, progress=False)
    trainer.fit(x, 2, labels=y)
    rebuilt = Trainer.from_checkpoint(tmp_path)
    assert type(rebuilt.model.net) is type(net) and rebuilt.model.parameterization == "v"
    assert rebuilt.model.scale_input is False and rebuilt.step == 2
    t = torch.rand(16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.ema_model(x, t, y), trainer.ema_model(x, t, y))


def test_checkpoints_record_the_preconditioning_and_old_ones_stay_raw(tmp_path: Path) -> None:
    """A spec written before preconditioning existed (no "preconditioning" key) rebuilds a
    raw model (its weights' meaning); a model with another meaning refuses the weights."""
    sde = VPSDE()
    raw = build_model(
        sde, "mlp", (2,), "eps", net_kwargs={"hidden": 8, "num_blocks": 1}, preconditioning="none"
    )
    trainer = Trainer(raw, DSMLoss(sde), batch_size=16, checkpoint_dir=tmp_path, progress=False)
    trainer.fit(torch.randn(64, 2), 2)
    path = tmp_path / "latest.pt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["config"]["model"]["preconditioning"] == "none"
    for key in ("preconditioning", "sigma_data"):  # as written before the option existed
        del ckpt["config"]["model"][key]
    torch.save(ckpt, path)
    loaded = load_model(path).model
    assert loaded.preconditioning == "none" and loaded.parameterization == "eps"
    x, t = torch.randn(5, 2), torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), trainer.ema_model(x, t))
    assert Trainer.from_checkpoint(tmp_path).model.preconditioning == "none"
    new = build_model(sde, "mlp", (2,), "eps", net_kwargs={"hidden": 8, "num_blocks": 1})
    assert new.preconditioning == "gaussian" and new.spec["preconditioning"] == "gaussian"
    with pytest.raises(CheckpointError, match="preconditioning"):
        Trainer(new, DSMLoss(sde), batch_size=16).load(path)


@pytest.mark.parametrize("wrap", [False, True])
def test_fit_names_data_when_its_feature_count_does_not_match_the_model(wrap: bool) -> None:
    """The error used to name a batch's shape, (128, 3), from deep inside the network."""
    sde = VPSDE()
    net = MLPScoreNet(2, hidden=16, num_blocks=1, embed_dim=8)
    model = ScoreModel(net, sde) if wrap else net
    trainer = Trainer(model, DSMLoss(sde), progress=False, batch_size=8)
    with pytest.raises(ValueError, match=r"data must have 2 features .* shape \(50, 3\)"):
        trainer.fit(torch.randn(50, 3), 1)
    with pytest.raises(ValueError, match=r"data must have 2 features .* shape \(50, 1, 3\)"):
        trainer.fit(torch.randn(50, 1, 3), 1)
    trainer.fit(torch.randn(50, 1, 2), 1)  # [N, 1, 2] flattens to the model's 2 features


def test_a_spent_generator_is_named_not_called_empty() -> None:
    """A generator cannot restart like a DataLoader; the error said "data is an empty
    iterable" after it had yielded its batches."""
    x, _ = _toy_data(96)
    trainer = _tiny_trainer(progress=False)
    with pytest.raises(ValueError, match=r"data ran out after 3 batches .*a generator runs once"):
        trainer.fit((x[i : i + 32] for i in range(0, 96, 32)), 5)
    assert trainer.step == 3  # the steps it did are kept
    with pytest.raises(ValueError, match="data is an empty iterable"):
        trainer.fit([], 1)
    trainer.fit((x[i : i + 32] for i in range(0, 96, 32)), 3)  # enough batches: fine
