"""Run the "overhead" benchmark suite and write benchmarks/results/overhead.{json,md,png}.

Usage: python benchmarks/overhead.py [--mode quick|full] [--out DIR]
(the engine is scoresde.bench; `scoresde bench` runs the same suites).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scoresde.bench import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("quick", "full"), default="full")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run("overhead", args.mode, args.out, progress=True)


if __name__ == "__main__":
    main()
