"""ScoreModel.save_pretrained / from_pretrained: config.json + model.safetensors, exact round
trips, nothing unpickled on load, the config checked against the weights before the network
is built, and the command line reading such a folder."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import scoresde.recipes as recipes
import scoresde.training as training
from scoresde.data import DataScaler
from scoresde.nets import MLPScoreNet, ScoreModel
from scoresde.sdes import VESDE, VPSDE
from scoresde.training import CheckpointError, build_model


def _outputs(model: torch.nn.Module, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.rand(shape[0], generator=g, dtype=dtype) * 0.9 + 0.05
    with torch.no_grad():
        return model.eval()(x, t)


def _trained_weights(model: torch.nn.Module) -> None:
    """Perturb every tensor so a rebuilt model with fresh weights could not pass."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.01)


def test_mlp_round_trip_with_scaler_and_nothing_unpickled(tmp_path: Path, monkeypatch) -> None:
    model = build_model(
        VESDE(sigma_max=7.0), "mlp", (3,), "eps", net_kwargs={"hidden": 16, "num_blocks": 1}
    )
    _trained_weights(model)
    scaler = DataScaler("standard", per_feature=True).fit(torch.randn(50, 3) * 3 + 1)
    folder = model.save_pretrained(tmp_path / "m", data_scaler=scaler)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["sde"] == {"name": "ve", "sigma_min": 0.01, "sigma_max": 7.0, "N": 1000}
    assert config["model"]["parameterization"] == "eps" and config["dtype"] == "float32"

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = ScoreModel.from_pretrained(folder)
    monkeypatch.undo()
    assert isinstance(loaded, ScoreModel) and not loaded.training
    assert loaded.config() == model.config() and loaded.sde.sigma_max == 7.0
    assert torch.equal(_outputs(loaded, (6, 3)), _outputs(model, (6, 3)))
    x = torch.randn(4, 3)
    assert torch.equal(loaded.data_scaler.inverse_transform(x), scaler.inverse_transform(x))
    # Saving the loaded model again keeps its scaler (model.data_scaler) and weights.
    again = ScoreModel.from_pretrained(loaded.save_pretrained(tmp_path / "again"))
    assert torch.equal(_outputs(again, (6, 3)), _outputs(model, (6, 3)))
    assert torch.equal(again.data_scaler.shift, scaler.shift)


def test_unet_float64_round_trip_and_options(tmp_path: Path) -> None:
    model = build_model("subvp", "unet", (1, 8, 8), "x0", net_kwargs={"channels": (8, 16)})
    model.scale_input = False  # options are read off the model when saving
    model = model.double()
    _trained_weights(model)
    loaded = ScoreModel.from_pretrained(model.save_pretrained(tmp_path / "u"), device="cpu")
    assert loaded.config() == {
        "parameterization": "x0",
        "scale_input": False,
        "preconditioning": "gaussian",
        "sigma_data": 1.0,
    }
    assert next(loaded.parameters()).dtype == torch.float64
    assert loaded.data_scaler is None
    out = _outputs(loaded, (2, 1, 8, 8), torch.float64)
    assert torch.equal(out, _outputs(model, (2, 1, 8, 8), torch.float64))


def test_config_lists_the_constructor_options() -> None:
    names = ("parameterization", "scale_input", "preconditioning", "sigma_data")
    assert ScoreModel.option_names() == names
    model = ScoreModel(
        MLPScoreNet(2, hidden=8, num_blocks=1), VPSDE(), "v", scale_input=False, sigma_data=0.5
    )
    twin = ScoreModel(model.net, model.sde, **model.config())
    assert twin.config() == model.config()
    assert model.config() == {
        "parameterization": "v",
        "scale_input": False,
        "preconditioning": "gaussian",
        "sigma_data": 0.5,
    }


def test_config_is_checked_against_the_weights_before_building(tmp_path: Path, monkeypatch) -> None:
    model = build_model("vp", "mlp", (2,), net_kwargs={"hidden": 16, "num_blocks": 1})
    folder = model.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["net_kwargs"]["hidden"] = 2048  # would be ~135 MB of parameters
    (folder / "config.json").write_text(json.dumps(config))
    devices = []
    real = recipes.build_model

    def spy(*args, **kwargs):
        devices.append(torch.empty(0).device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipes, "build_model", spy)  # build_model's home
    with pytest.raises(CheckpointError, match=r"shape mismatch.*\(16, .*\) vs \(2048"):
        ScoreModel.from_pretrained(folder)
    assert devices == ["meta"]  # only the meta-device build ran: nothing was allocated


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda f: (f / "config.json").write_text("{not json"), CheckpointError, "not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), CheckpointError, "not a scoresde"),
        (lambda f: (f / "config.json").unlink(), FileNotFoundError, "config.json"),
        (lambda f: (f / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors"),
        (
            lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00" * 20),
            CheckpointError,
            "not a readable safetensors",
        ),
        (
            lambda f: (f / "config.json").write_text(
                (f / "config.json").read_text().replace('"mlp"', '"resnet"')
            ),
            CheckpointError,
            "net",
        ),
    ],
)
def test_damaged_folders_are_refused_clearly(tmp_path: Path, damage, error, match) -> None:
    model = build_model("vp", "mlp", (2,), net_kwargs={"hidden": 8, "num_blocks": 1})
    folder = model.save_pretrained(tmp_path / "m")
    damage(folder)
    with pytest.raises(error, match=match):
        ScoreModel.from_pretrained(folder)


def test_models_without_a_spec_are_refused(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, t):
            return self.lin(x)

    with pytest.raises(ValueError, match="build_model"):
        ScoreModel(Net(), VPSDE()).save_pretrained(tmp_path / "x")
    with pytest.raises(TypeError, match="DataScaler"):
        build_model().save_pretrained(tmp_path / "y", data_scaler="standard")


def test_cli_train_exports_a_model_that_sample_and_likelihood_read(tmp_path: Path, capsys) -> None:
    from scoresde.cli import main

    run = tmp_path / "run"
    argv = ["train", "two_moons", "--ckpt-dir", str(run), "--steps", "4", "--hidden", "16"]
    assert main([*argv, "--blocks", "1", "--batch-size", "32", "--quiet", "--device", "cpu"]) == 0
    exported = run / "model"
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
    model = ScoreModel.from_pretrained(exported)
    ema = training.load_model(run).model  # the checkpoint's EMA weights
    for name, value in ema.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # `sample` gives the same samples from the run folder and from the exported model.
    common = ["--steps", "3", "--num-samples", "12", "--seed", "4", "--quiet"]
    assert main(["sample", str(run), *common, "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", str(exported), *common, "--out", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "b.npz")["samples"]
    assert a.shape == (12, 2) and np.array_equal(a, b)
    capsys.readouterr()
    argv = ["likelihood", str(exported), "two_moons", "--num", "4", "--rtol", "1e-3", "--quiet"]
    assert main(argv) == 0
    assert "4 points of two_moons" in capsys.readouterr().out
    assert main(["sample", str(exported), "--no-ema", "--out", str(tmp_path / "c.npz")]) == 1
    assert "one set of weights" in capsys.readouterr().err
