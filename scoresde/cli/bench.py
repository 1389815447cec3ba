"""`scoresde bench`: run the benchmark suites and print their tables."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scoresde.cli._common import _positive_int, _say


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `bench` subcommand."""
    p = sub.add_parser(
        "bench",
        help="run the benchmark suite (solvers against exact scores, peers side by side)",
        description="Run scoresde's benchmarks and write tables and plots to --out.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="the default, CI-sized: 1,000 samples, 10/20/50 steps, 2-D targets only",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="10,000 samples, 5 to 1000 steps, also 16-D/64-D targets and the sub-VP/VE "
        "SDEs (the tables of docs/benchmarks.md; far longer)",
    )
    p.set_defaults(mode="quick")
    p.add_argument(
        "--suite",
        default="all",
        help="all (default), peers (scoresde next to diffusers/torchsde/torchdiffeq), "
        "exact_score (every solver against exact mixture scores), overhead (per-step cost) "
        "or likelihood (probability-flow log-likelihood against exact densities)",
    )
    p.add_argument("--out", default="scoresde-bench", help="output folder (./scoresde-bench)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench)
    return p


def _cmd_bench(args: argparse.Namespace) -> int:
    from scoresde.bench import SUITES, run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.suite != "all" and args.suite not in SUITES:
        raise ValueError(f"--suite must be 'all' or one of {', '.join(SUITES)}, got {args.suite!r}")
    out = Path(args.out)
    for suite in SUITES if args.suite == "all" else (args.suite,):
        _say(args, f"benchmark suite {suite} ({args.mode}) -> {out}")
        run(suite, args.mode, out, progress=not args.quiet)
        report = out / f"{suite}.md"
        if report.is_file():
            print(report.read_text())
    return 0
