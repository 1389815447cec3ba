"""PCSampler's correctors on trained networks: the Langevin corrector against annealed Langevin,
no corrector and Euler–Maruyama, with the network and with the exact score of the same target.

Usage: python benchmarks/pc_corrector.py [--n 4000] [--out benchmarks/results]
Writes pc_corrector.{json,md,png} (about 20 minutes on one CPU thread; start it in two
processes to share the six blocks).

Targets made up for this benchmark (random mixtures of seeds never used elsewhere, 2-D and
4-D), each under the VP SDE and the VE SDE (sigma_max: the largest distance between two
data points, as `scoresde train` sets it). On each, `ScoreModel(MLPScoreNet(D), sde)` is
trained as a user would (default Trainer, 3,000 steps of 256). Every sampler then draws n
samples from the network and from the exact mixture score; the rows give the mode-weight
error (total variation between the mass on each component and the weights) and the NLL of
the samples under the true density, next to the same figures for true samples. With the
exact score every sampler is near the floor, so a gap on the network is the sampler's
sensitivity to the network's score error.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from scoresde import (
    VESDE,
    VPSDE,
    DPMSolverSampler,
    DSMLoss,
    EulerMaruyamaSampler,
    MLPScoreNet,
    PCSampler,
    ScoreModel,
    Trainer,
)
from scoresde.metrics import mean_log_density, mode_weight_error
from scoresde.toy import random_mixture

TARGETS = (("mix2d-a", 2, 3, 4101), ("mix2d-b", 2, 4, 4202), ("mix4d", 4, 4, 4303))
TRAIN_STEPS = 3000
STEPS = 500  # PC and EM steps (PC: 2 NFE per step)


def samplers(sde) -> dict:
    return {
        "PC, Langevin corrector (default)": PCSampler(sde, num_steps=STEPS),
        "PC, annealed Langevin (ald)": PCSampler(sde, num_steps=STEPS, corrector="ald"),
        "PC, no corrector": PCSampler(sde, num_steps=STEPS, corrector=None),
        "Euler-Maruyama": EulerMaruyamaSampler(sde, num_steps=2 * STEPS),
        "DPM-Solver++ (ODE)": DPMSolverSampler(sde, num_steps=20),
    }


def _scores(samples: torch.Tensor, mix) -> dict:
    x = samples.double()
    ld = mean_log_density(x, mix)
    return dict(tv=float(mode_weight_error(x, mix)), nll=float(-ld.mean), nll_se=float(ld.stderr))


def train(mix, sde, dim: int, seed: int) -> tuple[ScoreModel, float]:
    data = mix.sample(20_000, generator=torch.Generator().manual_seed(seed)).float()
    torch.manual_seed(seed)
    model = ScoreModel(MLPScoreNet(dim), sde)
    trainer = Trainer(model, DSMLoss(sde), batch_size=256, progress=False, seed=seed)
    start = time.perf_counter()
    trainer.fit(data, TRAIN_STEPS)
    return trainer.ema_model.eval(), time.perf_counter() - start


def run_target(name: str, dim: int, k: int, seed: int, sde_name: str, n: int) -> dict:
    mix = random_mixture(dim, k, seed=seed)
    if sde_name == "ve":
        pts = mix.sample(2000, generator=torch.Generator().manual_seed(seed + 1))
        sde = VESDE(sigma_max=float(torch.cdist(pts, pts).max()))
    else:
        sde = VPSDE()
    model, seconds = train(mix, sde, dim, seed)
    truth = mix.sample(n, generator=torch.Generator().manual_seed(seed + 2))
    rows = []
    for label, sampler in samplers(sde).items():
        row = dict(sampler=label)
        for which, score in (("network", model), ("exact", mix.score_fn(sde))):
            gen = torch.Generator().manual_seed(seed + 3)
            with torch.no_grad():
                x = sampler.sample(score, (n, dim), generator=gen)
            row[which] = _scores(x, mix)
        row["nfe"] = sampler.nfe
        rows.append(row)
        print(name, sde_name, label, row["network"], row["exact"], flush=True)
    return dict(
        target=name,
        dim=dim,
        components=k,
        seed=seed,
        sde=sde_name,
        sigma_max=getattr(sde, "sigma_max", None),
        train_seconds=seconds,
        truth=_scores(truth, mix),
        rows=rows,
    )


def markdown(res: dict) -> str:
    out = [
        "# PCSampler's correctors on trained networks",
        "",
        f"Command: python benchmarks/pc_corrector.py --n {res['n']}",
        "",
        f"{res['n']} samples per run; network: `ScoreModel(MLPScoreNet(D), sde)`, default "
        f"Trainer, {TRAIN_STEPS} steps of 256. TV: mode-weight error (total variation); NLL "
        "under the true density (true samples: the floor). network / exact: the same sampler "
        "and noise on the trained network and on the exact mixture score.",
        "",
        "| target | SDE | sampler | NFE | TV network | TV exact | NLL network | NLL exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for blk in res["blocks"]:
        tr = blk["truth"]
        head = f"| {blk['target']} (D = {blk['dim']}, {blk['components']} modes) | {blk['sde']}"
        out.append(f"{head} | true samples | - | {tr['tv']:.3f} | - | {tr['nll']:.3f} | - |")
        for r in blk["rows"]:
            net, ex = r["network"], r["exact"]
            out.append(
                f"{head} | {r['sampler']} | {r['nfe']} | {net['tv']:.3f} | {ex['tv']:.3f} "
                f"| {net['nll']:.3f} +- {net['nll_se']:.3f} | {ex['nll']:.3f} |"
            )
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["sampler"] for r in res["blocks"][0]["rows"]]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        vals = [next(r for r in b["rows"] if r["sampler"] == label)["network"]["tv"]
                for b in res["blocks"]]  # fmt: skip
        xs = [i + j * width for i in range(len(res["blocks"]))]
        ax.bar(xs, vals, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(res["blocks"]))])
    ax.set_xticklabels([f"{b['target']}\n{b['sde']}" for b in res["blocks"]])
    ax.set_ylabel("mode-weight error (TV), trained network")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # One file per block, claimed by an exclusive lock file: run this script in several
    # processes at once to share the blocks; whichever finishes the last block writes the
    # results (an interrupted run keeps its finished blocks).
    parts = args.out / "pc_corrector.blocks"
    parts.mkdir(parents=True, exist_ok=True)
    keys = [(t, sde) for t in TARGETS for sde in ("vp", "ve")]
    for (name, dim, k, seed), sde in keys:
        done, lock = parts / f"{name}_{sde}_{args.n}.json", parts / f"{name}_{sde}_{args.n}.lock"
        if done.exists():
            continue
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue  # another process runs it
        done.write_text(json.dumps(run_target(name, dim, k, seed, sde, args.n)))
    names = [parts / f"{t[0]}_{sde}_{args.n}.json" for t, sde in keys]
    if not all(p.exists() for p in names):
        return
    res = dict(n=args.n, blocks=[json.loads(p.read_text()) for p in names])
    (args.out / "pc_corrector.json").write_text(json.dumps(res, indent=1))
    (args.out / "pc_corrector.md").write_text(markdown(res))
    plot(res, args.out / "pc_corrector.png")


if __name__ == "__main__":
    main()
