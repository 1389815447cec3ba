"""The `scoresde` command line: `demo`, `train`, `sample`, `likelihood` and `bench`.

    scoresde demo                          # train on 8 Gaussians, compare five solvers, PNG
    scoresde train two_moons --steps 5000 --ckpt-dir runs/moons
    scoresde sample runs/moons --sampler dpm --steps 20 --num-samples 5000 --out moons.npz
    scoresde likelihood runs/moons two_moons --num-points 2000
    scoresde bench --quick

Every subcommand has `--help`. A user's mistake (a bad path, option value, corrupt
checkpoint or unknown data set) prints one line `scoresde: error: <reason>` to stderr and
exits with status 2 (usage) or 1 (runtime failure), without a traceback.

Each subcommand imports what it needs (samplers, training, matplotlib, the benchmark engine)
when it runs, so a problem in one part of the library breaks only the commands that use it.
Under `torchrun`, `train` trains data-parallel; only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from scoresde.cli import bench, demo, likelihood, sample, train

# The names below lived in the one-module cli.py; they stay importable from scoresde.cli.
from scoresde.cli._common import DEFAULT_STEPS as DEFAULT_STEPS
from scoresde.cli._common import PROG, _Parser
from scoresde.cli._common import SDE_NAMES as SDE_NAMES
from scoresde.cli._common import _load_checkpoint as _load_checkpoint
from scoresde.cli._common import _make_sampler as _make_sampler
from scoresde.cli._common import _setup_torch as _setup_torch
from scoresde.cli.bench import _cmd_bench as _cmd_bench
from scoresde.cli.demo import _cmd_demo as _cmd_demo
from scoresde.cli.likelihood import _cmd_likelihood as _cmd_likelihood
from scoresde.cli.sample import _cmd_sample as _cmd_sample
from scoresde.cli.train import _cmd_train as _cmd_train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The full `scoresde` parser (also used by the docs tests to check shell examples)."""
    parser = _Parser(
        prog=PROG,
        description="Score-based generative modelling with SDEs (Song et al., ICLR 2021).",
        epilog="Run 'scoresde <command> --help' for a command's options.",
    )
    from scoresde import __version__

    parser.add_argument("--version", action="version", version=f"scoresde {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True

    for verb in (demo, train, sample, likelihood, bench):
        verb.add_parser(sub)
    return parser


# --- entry point --------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean a user's mistake, not a bug."""
    errors: list[type[BaseException]] = [
        ValueError,
        TypeError,
        OSError,  # missing or unreadable files, unreadable images, a full disk
    ]
    try:
        from scoresde.checkpoints import CheckpointError

        errors.append(CheckpointError)
    except ImportError:
        pass
    try:
        from scoresde.samplers.base import NonFiniteError

        errors.append(NonFiniteError)
    except ImportError:
        pass
    return tuple(errors)


def _interrupted(exc: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: one line on stderr; status 128 + the signal number (130 for
    Ctrl-C). Training saves a checkpoint first (`TrainingInterrupted`) and says where."""
    signum = getattr(exc, "signum", None)
    if signum is None:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 saves and reports
        return 128 + int(signum)
    hint = "; continue it with --resume" if getattr(exc, "checkpoint", None) else ""
    if getattr(exc, "exported", None):
        hint = f"; model exported to {exc.exported}{hint}"
    print(f"{PROG}: {exc}{hint}", file=sys.stderr)
    return 128 + int(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `scoresde` with `argv` (default sys.argv[1:]); returns the exit status.

    Usage errors exit with 2 (through SystemExit, as argparse does); a user's mistake found
    while running returns 1 after printing one line `scoresde: error: <reason>`.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except _user_errors() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


def _entry() -> NoReturn:  # pragma: no cover - thin wrapper for console scripts
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
