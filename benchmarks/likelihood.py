"""Run the "likelihood" benchmark suite and write benchmarks/results/likelihood.{json,md,png}.

Usage: python benchmarks/likelihood.py [--mode quick|full] [--out DIR]
(the engine is scoresde.bench; `scoresde bench --suite likelihood` runs the same suite).
"""

from pathlib import Path

from scoresde.bench import script_main

if __name__ == "__main__":
    script_main("likelihood", Path(__file__).parent / "results")
