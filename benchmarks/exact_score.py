"""Run the "exact_score" benchmark suite and write benchmarks/results/exact_score.{json,md,png}.

Usage: python benchmarks/exact_score.py [--mode quick|full] [--out DIR]
(the engine is scoresde.bench; `scoresde bench --suite exact_score` runs the same suite).
"""

from pathlib import Path

from scoresde.bench import script_main

if __name__ == "__main__":
    script_main("exact_score", Path(__file__).parent / "results")
