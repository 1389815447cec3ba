"""Run the "likelihood" benchmark suite and write benchmarks/results/likelihood.{json,md,png}.

Usage: python benchmarks/likelihood.py [--mode quick|full] [--out DIR]
(the engine is scoresde.bench; `scoresde bench --suite likelihood` runs the same suite).
Prints scoresde's wall time as a ratio of Song et al.'s likelihood code's, per target.
"""

from pathlib import Path

from scoresde.bench import script_main

if __name__ == "__main__":
    results = script_main("likelihood", Path(__file__).parent / "results")
    for block in results.get("song", []):
        song_err = block["rows"][0].get("mean_abs_err", float("nan"))
        for row in block["rows"]:
            if "ratio" in row:
                print(
                    f"{block['target']}: {row['method']} ({row['setting']}, {row['dtype']}): "
                    f"{row['ratio']:.2f}x Song et al.'s time "
                    f"({row['ratio_one_call']:.2f}x its 1-call variant); "
                    f"mean |error| {row['mean_abs_err']:.4f} vs Song et al.'s {song_err:.4f}"
                )
