"""AdaptiveSDESampler on one fixed Brownian path per sample (a virtual Brownian tree): the
same distribution as before, and samples that are continuous in the solver's decisions.

Usage: python benchmarks/adaptive_path.py [--n 10000] [--out benchmarks/results]
Writes adaptive_path.{json,md,png} (about 3 minutes on one CPU thread).

1. Distribution: the peers suite's row for `AdaptiveSDESampler(sde)` on the shared 2-D mixture
   (n samples, the harness of `scoresde bench --suite peers`), next to the row committed in
   results/peers.json, measured with the noise drawn per iteration before the tree.
2. Batch size with a trained network: a small MLP trained by `scoresde train two_moons
   --steps 200` (seed 0), 200 samples with `batch_invariant=True` in one batch and in
   batches of 7 (`sample_offset`). The network rounds differently in the last bit for the
   two batch sizes, which flips accept/reject decisions; the distance between the two
   results is what a user sees when changing `--batch-size`.
3. Tolerance: 1,000 samples of the exact 2-D mixture's reverse SDE (float64, seed 1) at
   rtol = atol = 3e-2, 1e-2, 3e-3 against 1e-3: on one fixed path the samples converge to
   the path's strong solution as the tolerance shrinks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from scoresde import VPSDE, AdaptiveSDESampler
from scoresde.bench.runner import _all_methods, _select, run_accuracy
from scoresde.toy import benchmark_mixture_2d

METHOD = "scoresde AdaptiveSDE"
TOLERANCES = (3e-2, 1e-2, 3e-3)
REFERENCE_TOLERANCE = 1e-3


def distribution(n: int, results: Path) -> dict:
    """The peers harness's row for the adaptive sampler now, and the committed one."""
    block = run_accuracy("mixture2d", _select(_all_methods(), [METHOD]), [10], n=n, seed=0)
    keys = ("nfe", "seconds", "nll", "nll_se", "sw2", "mode_tv")
    now = {k: block["rows"][0][k] for k in keys}
    before = None
    committed = results / "peers.json"
    if committed.is_file():
        for target in json.loads(committed.read_text())["targets"]:
            for row in target["rows"]:
                if row["method"] == METHOD and target["n"] == n:
                    before = {k: row[k] for k in keys}
    return dict(now=now, before=before, floor=block["floor"], n=n)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).reshape(a.shape[0], -1).norm(dim=1)


def _summary(d: torch.Tensor) -> dict:
    d = d.to(torch.float64)
    return dict(median=float(d.median()), q90=float(d.quantile(0.9)), max=float(d.max()))


def batch_size_with_a_network() -> tuple[dict, torch.Tensor]:
    """Samples of a trained MLP in one batch of 200 and in batches of 7."""
    from scoresde.checkpoints import load_model
    from scoresde.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", "two_moons", "--steps", "200", "--ckpt-dir", tmp, "--seed", "0"]
        assert main([*argv, "--quiet", "--plot-every", "0", "--device", "cpu"]) == 0
        model = load_model(tmp).model.eval().requires_grad_(False)
    sampler = AdaptiveSDESampler(model.sde)
    num, chunk = 200, 7

    def run(offset: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = sampler.sample(model, (size, 2), generator=torch.Generator().manual_seed(0),
                           batch_invariant=True, sample_offset=offset)  # fmt: skip
        return x, sampler.accepted_steps

    one, steps_one = run(0, num)
    parts = [run(k, min(chunk, num - k)) for k in range(0, num, chunk)]
    chunked = torch.cat([p[0] for p in parts])
    steps_chunked = torch.cat([p[1] for p in parts])
    d = _distances(one, chunked)
    flipped = int((steps_one != steps_chunked).sum())
    return dict(num=num, chunk=chunk, flipped=flipped, data_std=float(one.std(0).mean()),
                **_summary(d)), d  # fmt: skip


def tolerance_convergence() -> list[dict]:
    """Distances to the rtol = 1e-3 samples of the same paths on the exact 2-D mixture."""
    sde = VPSDE()
    score = benchmark_mixture_2d().score_fn(sde)

    def run(rtol: float) -> tuple[torch.Tensor, int, float]:
        sampler = AdaptiveSDESampler(sde, rtol=rtol, atol=rtol)
        start = time.perf_counter()
        x = sampler.sample(score, (1000, 2), generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)  # fmt: skip
        return x, sampler.nfe, time.perf_counter() - start

    ref, ref_nfe, _ = run(REFERENCE_TOLERANCE)
    rows = []
    for rtol in TOLERANCES:
        x, nfe, seconds = run(rtol)
        rows.append(dict(rtol=rtol, nfe=nfe, seconds=seconds, **_summary(_distances(x, ref))))
    return [dict(reference_rtol=REFERENCE_TOLERANCE, reference_nfe=ref_nfe), *rows]


def markdown(res: dict) -> str:
    dist, batch, tol = res["distribution"], res["batch_size"], res["tolerance"]
    out = [
        "# AdaptiveSDESampler on a fixed Brownian path",
        "",
        "Command: `python benchmarks/adaptive_path.py --n 10000`",
        "",
        f"Distribution on the shared 2-D mixture ({dist['n']} samples, the peers harness): "
        "NLL = mean negative log-density of the samples under the true mixture (the true "
        f"samples' own: {dist['floor']['nll']:.3f}); sliced W2 and mode-weight total variation "
        "against true samples.",
        "",
        "| Brownian path | NFE | seconds | NLL | sliced W2 | mode TV |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in (("per-iteration draws (committed peers row)", dist["before"]),
                       ("virtual Brownian tree (now)", dist["now"])):  # fmt: skip
        if row is not None:
            out.append(
                f"| {label} | {row['nfe']} | {row['seconds']:.1f} | {row['nll']:.3f} +- "
                f"{row['nll_se']:.3f} | {row['sw2']:.4f} | {row['mode_tv']:.4f} |"
            )
    out += [
        "",
        f"Batch size with a trained network (`scoresde train two_moons --steps 200`, data std "
        f"{batch['data_std']:.2f}): {batch['num']} samples in one batch against batches of "
        f"{batch['chunk']}; {batch['flipped']} of them took another step sequence. Distance "
        f"between the two results: median {batch['median']:.4f}, 90th percentile "
        f"{batch['q90']:.4f}, largest {batch['max']:.4f} (with noise drawn per iteration, "
        "before the tree: 188 of 200 took other steps and every sample moved, by up to 3.4).",
        "",
        f"Tolerance on the exact 2-D mixture (1,000 samples, float64): distance to the samples "
        f"of the same paths at rtol = atol = {tol[0]['reference_rtol']:g} "
        f"({tol[0]['reference_nfe']} NFE).",
        "",
        "| rtol = atol | NFE | seconds | median | 90th percentile | largest |",
        "|---|---|---|---|---|---|",
    ]
    for r in tol[1:]:
        out.append(
            f"| {r['rtol']:g} | {r['nfe']} | {r['seconds']:.1f} | {r['median']:.4f} "
            f"| {r['q90']:.4f} | {r['max']:.4f} |"
        )
    return "\n".join(out) + "\n"


def plot(distances: torch.Tensor, tol: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.hist(distances.clamp_min(1e-8).log10().numpy(), bins=30, color="tab:blue")
    a.set_xlabel("log10 distance, batch of 200 vs batches of 7")
    a.set_ylabel("samples")
    a.set_title("trained MLP: same samples up to the solver's error")
    rows = tol[1:]
    b.loglog([r["rtol"] for r in rows], [r["median"] for r in rows], "o-", label="median")
    b.loglog([r["rtol"] for r in rows], [r["q90"] for r in rows], "s--", label="90th pct")
    b.set_xlabel("rtol = atol")
    b.set_ylabel(f"distance to rtol {tol[0]['reference_rtol']:g}")
    b.set_title("exact 2-D mixture: pathwise convergence")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch, distances = batch_size_with_a_network()
    res = dict(
        distribution=distribution(args.n, args.out),
        batch_size=batch,
        tolerance=tolerance_convergence(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adaptive_path.json").write_text(json.dumps(res, indent=1))
    (args.out / "adaptive_path.md").write_text(markdown(res))
    plot(distances, res["tolerance"], args.out / "adaptive_path.png")


if __name__ == "__main__":
    main()
