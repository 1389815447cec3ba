"""Benchmarks of scoresde's samplers and their peers on exact-score targets.

`run(suite, mode, out_dir)` runs a suite ("peers", "exact_score", "overhead", "likelihood")
in "quick" or "full" mode and writes `<suite>.json`, `.md` and `.png` into out_dir. The
methods are in `scoresde.bench.peers` (each `(problem, x_T, num_steps, generator) ->
(samples, nfe)`), the targets and the reference solve in `scoresde.bench.targets`. Needs
diffusers for the diffusers peers (`pip install scoresde[bench]`); missing peers are left
out.
"""

from scoresde.bench.runner import MODES, SUITES, run, run_accuracy, run_overhead, script_main

__all__ = ["run", "run_accuracy", "run_overhead", "script_main", "SUITES", "MODES"]
