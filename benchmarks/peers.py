"""Run the "peers" benchmark suite and write benchmarks/results/peers.{json,md,png}.

Usage: python benchmarks/peers.py [--mode quick|full] [--out DIR]
(the engine is scoresde.bench; `scoresde bench --suite peers` runs the same suite).
"""

from pathlib import Path

from scoresde.bench import script_main

if __name__ == "__main__":
    script_main("peers", Path(__file__).parent / "results")
