"""What the command-line tests share: a small model's options and `main` run in-process
(`from _cli_helpers import SMALL, run_cli`)."""

from __future__ import annotations

from scoresde.cli import main

# A tiny MLP run on the CPU without progress bars: fast enough for many train calls.
SMALL = ["--hidden", "16", "--blocks", "1", "--batch-size", "32", "--quiet", "--device", "cpu"]


def run_cli(args: list[str]) -> int:
    """`scoresde ARGS` in this process; the exit status (argparse's SystemExit included)."""
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
