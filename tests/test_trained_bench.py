"""Smoke test of benchmarks/trained.py: the Gaussian baselines against closed forms, the
NFE budgets of the sampler sweep, and the 2-D part end to end on a micro configuration."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from scoresde.data import load_digits_split
from scoresde.sdes import VPSDE

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "trained.py"


@pytest.fixture(scope="module")
def trained():
    spec = importlib.util.spec_from_file_location("trained_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_per_pixel_baseline_matches_closed_form(trained) -> None:
    split = load_digits_split()
    x_tr, x_te = split.x_train, split.x_test[:20]
    out = trained.gaussian_baselines(x_tr, x_te)
    tr, te = x_tr.flatten(1).double(), x_te.flatten(1).double()
    mean, std = tr.mean(0), tr.std(0).clamp_min(trained.FLOOR_BIN)
    # continuous: -sum log N(x; m, s) / (64 ln 2) + log2(16/2) (bin width 2/16 -> +3 bits)
    nll = (0.5 * ((te - mean) / std) ** 2 + std.log() + 0.5 * math.log(2 * math.pi)).sum(1)
    want = nll / (64 * math.log(2)) + 3.0
    got = out["per-pixel Gaussian, continuous, std floor Delta/sqrt(2 pi)"]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # With that floor p * Delta <= 1 on every pixel, so bpd >= 0; the discretized model is
    # a true probability (every bin mass <= 1), so it is >= 0 for any floor.
    assert (got >= 0).all()
    for key, bpd in out.items():
        assert bpd.shape == (20,) and torch.isfinite(bpd).all(), key
        if "discretized" in key:
            assert (bpd >= 0).all(), key
    # Discretized: P(pixel) = Phi((x + D/2 - m)/s) - Phi((x - D/2 - m)/s), with the bins of
    # the end levels -1 and 1 open to -inf / +inf (so the 17 masses of a pixel sum to 1).
    normal = torch.distributions.Normal(mean, std)
    lo = torch.where(te == -1, -math.inf, te - 1 / 16)
    hi = torch.where(te == 1, math.inf, te + 1 / 16)
    want = -(normal.cdf(hi) - normal.cdf(lo)).log2().mean(1)
    got = out["per-pixel Gaussian, discretized, std floor Delta/sqrt(2 pi)"]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    edges = torch.cat([torch.tensor([-math.inf]), torch.linspace(-1, 1, 17)[:-1] + 1 / 16])
    edges = torch.cat([edges, torch.tensor([math.inf])]).double()
    mass = torch.distributions.Normal(mean[27], std[27]).cdf(edges)
    assert float((mass[1:] - mass[:-1]).sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("name", "nfe"), [("PC", 100), ("EDM Heun", 20), ("DDIM", 10)])
def test_sampler_nfe_budget(trained, name: str, nfe: int) -> None:
    sde = VPSDE()
    sampler = trained._build_sampler(name, sde, nfe)
    x = sampler.sample(lambda x, t: -x, (4, 2), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    # the sweep's NFE axis is honest: within one call of the requested budget
    assert nfe - 1 <= sampler.nfe <= nfe


def test_2d_part_and_report_end_to_end(trained, tmp_path: Path) -> None:
    cfg = {
        "datasets": ["mixture3"],
        "net_kwargs": {"hidden": 32, "num_blocks": 1},
        "train_points": 512,
        "steps": 10,
        "batch_size": 64,
        "lr": 2e-3,
        "warmup": 2,
        "n_samples": 200,
        "nfes": [10],
        "long_nfes": [],
        "n_likelihood": 32,
        "lik_rtol": 1e-2,
        "floor_repeats": 2,
    }
    res = trained.run_2d(cfg, tmp_path / "work", tmp_path)
    assert res["param"] == trained.DEFAULT_PARAM == "v"
    (tmp_path / "trained_2d.json").write_text(json.dumps(res))
    block = res["datasets"]["mixture3"]
    ok = [r for r in block["runs"] if "error" not in r]
    assert {r["sampler"] for r in ok} >= {"DDIM", "DPM-Solver++ 2M", "Euler-Maruyama"}
    assert all(math.isfinite(r["nll"]) and r["sw2"] > 0 for r in ok)
    # true samples' NLL under the mixture is its entropy, ~1.26 nats (PEERS.md)
    assert block["data_nll"] == pytest.approx(1.258, abs=0.2)
    lk = block["likelihood"]
    assert lk["exact_nll"] == pytest.approx(1.258, abs=0.4)
    assert lk["gap_mean"] == pytest.approx(lk["model_nll"] - lk["exact_nll"], abs=1e-5)
    # the checkpoint resumes: a second call trains no more steps
    again, log = trained._train(
        trained.build_model("vp", "mlp", (2,), "v", net_kwargs=cfg["net_kwargs"]),
        torch.randn(64, 2),
        cfg,
        trained._ckdir_2d(tmp_path / "work", "mixture3", "v"),
        0,
    )
    assert log["resumed_from_step"] == 10 and again.step == 10
    # The parameterization study reuses that checkpoint; the exact score from the same x_T
    # shows the solvers themselves put no sample far out and reach the mixture's entropy.
    study = trained.param_study(cfg, tmp_path / "work", params=("v",))
    assert study["models"]["v"]["train"]["resumed_from_step"] == 10
    assert set(study["models"]["v"]["eps_error"]["1"]) == {"bulk", "tail"}
    for q in study["models"]["exact"]["runs"].values():
        assert q["far_frac"] == 0.0 and q["nll"] == pytest.approx(1.26, abs=0.3)
    (tmp_path / "trained_params.json").write_text(json.dumps(study))
    (tmp_path / "trained_2d_eps.json").write_text(json.dumps({**res, "param": "eps"}))
    trained.report(tmp_path, ["python benchmarks/trained.py --part 2d"])
    md = (tmp_path / "trained.md").read_text()
    assert "### mixture3" in md and "| DDIM | 10 |" in md
    assert "v parameterization" in md and "--part 2d --param v" in md
    assert "### Parameterization and ODE samplers" in md and "| v-model | ODE heun" in md
    nll = f"{lk['model_nll']:.3f}"  # eps / v side by side (here the same run twice)
    assert f"| mixture3 | held-out NLL (PF ODE) | | | {nll} / {nll} | |" in md
    assert (tmp_path / "trained.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_precond_part_end_to_end(trained, tmp_path: Path) -> None:
    """`--part precond` on a micro configuration: every parameterization x preconditioning,
    the three samplers from the same x_T, ratios to Euler-Maruyama, the report's table."""
    cfg = {
        "train_points": 200,
        "net_kwargs": {"hidden": 16, "num_blocks": 1, "embed_dim": 8},
        "steps": 4,
        "batch_size": 32,
        "lr": 2e-3,
        "n_samples": 64,
        "em_steps": 6,
        "heun_steps": 3,
        "dpm_steps": 3,
    }
    res = trained.precond_study(cfg, tmp_path / "work", tmp_path)
    assert set(res["models"]) == {f"{p}/{c}" for p in trained.PARAMS for c in ("none", "gaussian")}
    for block in res["models"].values():
        runs = list(block["runs"].values())
        assert [r["nfe"] for r in runs] == [6, 6, 3]
        assert runs[0]["ratio_to_em"] == 1.0
        assert all(r["ratio_to_em"] == pytest.approx(r["sw2"] / runs[0]["sw2"]) for r in runs)
    # With sigma_data = 1, preconditioned v is raw v: the same numbers up to round-off.
    for label, q in res["models"]["v/none"]["runs"].items():
        assert q["sw2"] == pytest.approx(
            res["models"]["v/gaussian"]["runs"][label]["sw2"], rel=1e-4
        )
    assert json.loads((tmp_path / "trained_precond.json").read_text())["models"]
    trained.report(tmp_path, ["python benchmarks/trained.py --part precond"])
    md = (tmp_path / "trained.md").read_text()
    assert "### Every parameterization under every sampler" in md
    assert "| eps | gaussian |" in md and "| score | none |" in md
    assert (tmp_path / "trained_precond.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
