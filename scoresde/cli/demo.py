"""`scoresde demo`: train on a 2-D toy set, compare five solvers, write a PNG."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scoresde.cli._common import (
    _CKPT_MARK_KEY,
    _DEMO_MARK,
    _PNG_MARK_KEY,
    _check_output_path,
    _check_replaceable,
    _checked_number,
    _checkpoint_written_by,
    _common,
    _generator,
    _overwrite_option,
    _png_written_by,
    _positive_int,
    _save_npz,
    _say,
    _setup_torch,
    _written_by,
)

# The quality metrics compare sample sets (sliced W2 needs two samples or more): a smaller
# --num is refused by the parser, not after the training.
_sample_count = _checked_number(int, lambda v: v >= 2, "an integer >= 2")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `demo` subcommand."""
    p = sub.add_parser(
        "demo",
        help="train on a 2-D toy set, compare five solvers, write a PNG",
        description=(
            "Train a small score model (MLPScoreNet, VP SDE) on a 2-D toy set for about a "
            "minute on CPU, sample it with five solvers (predictor-corrector, Euler-Maruyama, "
            "Heun on the probability-flow ODE, DPM-Solver++, adaptive SDE), print a table of "
            "NFE, time and quality, and write demo.png with every solver's samples next to "
            "the data and the loss curve."
        ),
    )
    p.add_argument("--out", default="scoresde-demo", help="output folder (default ./scoresde-demo)")
    p.add_argument(
        "--dataset",
        default="8gaussians",
        help="2-D toy set: 8gaussians (default), mixture3, two_moons, swiss_roll, "
        "checkerboard, circles",
    )
    p.add_argument(
        "--train-steps", type=_positive_int, default=None, help="training steps (4000; 400 quick)"
    )
    p.add_argument("--num", type=_sample_count, default=None, help="samples per solver (2 or more)")
    p.add_argument("--quick", action="store_true", help="a ~15 s run (fewer steps and samples)")
    _overwrite_option(
        p,
        "replace a samples.npz, demo.png or demo_checkpoint.pt in --out that 'scoresde demo' "
        "did not write",
    )
    _common(p)
    p.set_defaults(func=_cmd_demo)
    return p


# Training and sampling budgets of the demo: about a minute of training on a 2-core CPU, and
# a ~15 s variant (--quick) for tests.
_DEMO = {
    "full": dict(steps=4000, hidden=128, blocks=4, num=2000, pc=250, em=250, ode=50, dpm=20),
    "quick": dict(steps=400, hidden=64, blocks=2, num=500, pc=60, em=60, ode=15, dpm=10),
}
# The demo's output files and how its own are recognised (the mark _DEMO_MARK in each).
_DEMO_FILES = {
    "samples.npz": _written_by,
    "demo.png": _png_written_by,
    "demo_checkpoint.pt": _checkpoint_written_by,
}
_EXACT_MIXTURES = {"8gaussians": "eight_gaussians", "mixture3": "benchmark_mixture_2d"}


def _demo_solvers(sde: Any, cfg: dict[str, int]) -> list[tuple[str, Any]]:
    from scoresde.samplers.adaptive import AdaptiveSDESampler
    from scoresde.samplers.dpm_solver import DPMSolverSampler
    from scoresde.samplers.ode import ODESampler
    from scoresde.samplers.pc import EulerMaruyamaSampler, PCSampler

    return [
        ("PC (reverse diffusion + Langevin)", PCSampler(sde, num_steps=cfg["pc"])),
        ("Euler-Maruyama (reverse SDE)", EulerMaruyamaSampler(sde, num_steps=cfg["em"])),
        ("Heun (probability-flow ODE)", ODESampler(sde, method="heun", num_steps=cfg["ode"])),
        ("DPM-Solver++ (3M)", DPMSolverSampler(sde, num_steps=cfg["dpm"])),
        ("adaptive SDE (rtol 1e-2)", AdaptiveSDESampler(sde)),
    ]


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    out = [line, "-" * len(line)]
    for r in rows:
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(out)


def _demo_train(
    args: argparse.Namespace, name: str, cfg: dict[str, int], device: Any, out: Path
) -> tuple[Any, Any, Any, float]:
    """Train the demo's MLP on the toy set `name`; (model, trainer, scaler, seconds)."""
    from scoresde import toy
    from scoresde.data import DataScaler
    from scoresde.losses import DSMLoss
    from scoresde.recipes import build_model
    from scoresde.training import Trainer

    progress = not args.quiet
    # Data, scaled to zero mean and unit variance (the VP prior's scale); samples are mapped
    # back with the same scaler, so every number below is in the data's own units.
    data = toy.make_dataset(name, 20_000, generator=_generator(args.seed, "cpu"))
    scaler = DataScaler("standard").fit(data)
    model = build_model(
        "vp",
        "mlp",
        (2,),
        "v",
        net_kwargs={"hidden": cfg["hidden"], "num_blocks": cfg["blocks"]},
        seed=args.seed,
    )
    trainer = Trainer(
        model,
        DSMLoss(model.sde),
        lr=2e-3,
        batch_size=512,
        warmup_steps=min(100, cfg["steps"] // 10),
        ema_decay=0.995,
        seed=args.seed,
        device=device,
        distributed=False,
        data_scaler=scaler,
    )
    _say(args, f"training MLPScoreNet on {name} ({cfg['steps']} steps, VP SDE, {device})")
    start = time.perf_counter()
    trainer.fit(scaler.transform(data), cfg["steps"], progress=progress)
    train_s = time.perf_counter() - start
    trainer.save(out / "demo_checkpoint.pt", extra={_CKPT_MARK_KEY: _DEMO_MARK.decode()})
    return model, trainer, scaler, train_s


def _demo_sample(
    args: argparse.Namespace,
    sde: Any,
    score: Any,
    scaler: Any,
    cfg: dict[str, int],
    device: Any,
    quality: Any,
    panels: dict[str, Any],
    rows: list[list[str]],
) -> None:
    """Sample with every demo solver; adds each one's samples to `panels` and its row (NFE,
    seconds, quality) to `rows`."""
    import torch

    progress = not args.quiet
    for label, sampler in _demo_solvers(sde, cfg):
        _say(args, f"sampling: {label}")
        start = time.perf_counter()
        x = sampler.sample(
            score,
            (cfg["num"], 2),
            generator=_generator(args.seed + 1, device),
            device=device,
            progress=progress,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        x = scaler.inverse_transform(x.float()).cpu()
        panels[f"{label}\nNFE {sampler.nfe}"] = x
        rows.append([label, str(sampler.nfe), f"{seconds:.2f}", *quality(x)])


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from scoresde import plotting, toy
    from scoresde.metrics import mean_log_density, sliced_wasserstein

    device = _setup_torch(args)
    name = args.dataset
    two_d = sorted(k for k in toy.DATASETS if k != "digits")
    if name not in two_d:
        raise ValueError(f"--dataset must be a 2-D toy set ({', '.join(two_d)}), got {name!r}")
    cfg = dict(_DEMO["quick" if args.quick else "full"])
    if args.train_steps is not None:
        cfg["steps"] = args.train_steps
    if args.num is not None:
        cfg["num"] = args.num
    out = Path(args.out)
    _check_output_path("--out", out, folder=True)
    # The demo's files have fixed names: each carries the demo's mark, so a rerun replaces
    # its own files while a user's file of the same name in --out is kept.
    for file, written_by in _DEMO_FILES.items():
        _check_replaceable(out / file, "--out", _DEMO_MARK, args.overwrite, written_by)
    model, trainer, scaler, train_s = _demo_train(args, name, cfg, device, out)
    sde, score = model.sde, trainer.ema_model
    mixture = getattr(toy, _EXACT_MIXTURES[name])() if name in _EXACT_MIXTURES else None
    fresh = toy.make_dataset(name, cfg["num"], generator=_generator(args.seed + 2, "cpu"))
    fresh2 = toy.make_dataset(name, cfg["num"], generator=_generator(args.seed + 3, "cpu"))

    def quality(x: Any) -> list[str]:
        x = x.detach().to("cpu", torch.float64)
        sw = sliced_wasserstein(x, fresh, generator=_generator(0, "cpu"))
        cells = [f"{float(sw):.3f}"]
        if mixture is not None:
            ld = mean_log_density(x, mixture)
            cells.append(f"{float(ld.mean):.3f} +- {float(ld.stderr):.3f}")
        return cells

    header = ["solver", "NFE", "seconds", "sliced W2"]
    if mixture is not None:
        header.append("mean log p (true mixture)")
    rows = [["fresh data (reference)", "-", "-", *quality(fresh2)]]
    panels: dict[str, Any] = {}
    _demo_sample(args, sde, score, scaler, cfg, device, quality, panels, rows)

    _save_npz(
        out / "samples.npz",
        "--out",
        _DEMO_MARK,
        data=fresh.numpy(),
        **{f"solver{i}": v.numpy() for i, v in enumerate(panels.values())},
    )
    png = plotting.plot_samples_2d(
        panels,
        out / "demo.png",
        data=fresh,
        losses=trainer.history,
        title=f"scoresde demo: {name}, {cfg['steps']} training steps",
        ncols=4,
        metadata={_PNG_MARK_KEY: _DEMO_MARK.decode()},
    )
    print()
    print(_format_table(header, rows))
    print()
    print(f"trained for {train_s:.1f} s; wrote {png} and {out / 'samples.npz'}")
    ckpt = out / "demo_checkpoint.pt"
    print(f"more samples: scoresde sample {ckpt} --sampler pc --num-samples 5000")
    if mixture is not None:
        print(
            "sliced W2: distance to fresh data (the reference row: between two true sets). "
            "mean log p: below the data's own, samples are more spread out than the data; "
            "above it, more concentrated."
        )
    return 0
