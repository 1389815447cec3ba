"""Run the "overhead" benchmark suite and write benchmarks/results/overhead.{json,md,png}.

Usage: python benchmarks/overhead.py [--mode quick|full] [--out DIR]
(the engine is scoresde.bench; `scoresde bench --suite overhead` runs the same suite).
"""

from pathlib import Path

from scoresde.bench import script_main

if __name__ == "__main__":
    script_main("overhead", Path(__file__).parent / "results")
