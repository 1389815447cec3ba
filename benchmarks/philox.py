"""Per-sample noise: Philox-4x32-10 (scoresde.samplers.philox) against torch.randn and the
32-bit hash it replaced. Writes benchmarks/results/philox.{json,md,png}.

Measures, for one noise draw of shape (10,000, 2), the time of
  - torch.randn (one generator for the whole batch: not batch-invariant; the reference),
  - PhiloxNormal as samplers use it (on the CPU, draws of 10,000 x 2 computed 6 at a time,
    integers and uniforms by the compiled code of scoresde.samplers._philox_native where a
    C compiler is available),
  - the same one draw at a time, and both with the eager torch code only,
  - the previous 32-bit hash + Box-Muller (re-implemented here for the comparison),
in float32 and float64, interleaved, median of many repeats, as CPU time of this thread
(the machine is shared: wall time would count the time other processes hold the core);
and counts repeated values among 1e8 float64 normals (and 1e7 of the old hash).

Usage: python benchmarks/philox.py [--quick] [--draws N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from scoresde.samplers.philox import PhiloxNormal, _native_uniforms, philox4x32

CPU = torch.device("cpu")
SHAPE = (10_000, 2)


# --- the previous generator, for comparison -------------------------------------------------

_MASK32 = (1 << 32) - 1


def _mix32(h: torch.Tensor) -> torch.Tensor:
    for mult in (0x2C1B3C6D, 0x297A2D39, 0x5BD1E995):
        h = h ^ (h >> 16)
        h = (h * mult) & _MASK32
    return h ^ (h >> 15)


class OldHashNoise:
    """scoresde's per-sample noise before Philox: a 32-bit hash of (seed, sample, draw,
    entry) and a second hash of the first for the Box-Muller angle."""

    def __init__(self, base: int) -> None:
        self.base, self.counter, self._cache = base, 0, {}

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if shape not in self._cache:
            b, d = shape[0], math.prod(shape[1:])
            sample = torch.arange(b, dtype=torch.int64)[:, None]
            element = torch.arange(d, dtype=torch.int64)[None, :]
            self._cache[shape] = (
                _mix32((sample * 0x3C6EF372 + self.base) & _MASK32),
                _mix32((element * 0x1B873593 + 0x2545F491) & _MASK32),
            )
        sample_key, element_key = self._cache[shape]
        draw = _mix32(torch.tensor(self.counter * 0x61C88647 + 0x9E3779B9) & _MASK32)
        self.counter += 1
        h1 = _mix32(sample_key ^ element_key ^ draw)
        h2 = _mix32(h1 ^ 0x68E31DA4)
        u1 = (h1.to(torch.float64) + 1.0) / 4294967296.0
        u2 = h2.to(torch.float64) / 4294967296.0
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return z.to(dtype).reshape(shape)


# --- timing ---------------------------------------------------------------------------------


def time_draws(repeats: int) -> dict[str, dict[str, float]]:
    """Median microseconds per (10,000 x 2) draw of each method, interleaved."""
    results: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.float64):
        cached = PhiloxNormal((1, 2))
        single = PhiloxNormal((1, 2), max_cached_draws=1)
        eager = PhiloxNormal((1, 2))
        eager.use_native = False
        eager_single = PhiloxNormal((1, 2), max_cached_draws=1)
        eager_single.use_native = False
        old = OldHashNoise(12345)
        gen = torch.Generator().manual_seed(0)
        methods = {
            "torch.randn": lambda g=gen, dt=dtype: torch.randn(SHAPE, generator=g, dtype=dt),
            "philox (as samplers use it)": lambda c=cached, dt=dtype: c.randn(SHAPE, CPU, dt),
            "philox, one draw at a time": lambda s=single, dt=dtype: s.randn(SHAPE, CPU, dt),
            "philox, eager torch only": lambda e=eager, dt=dtype: e.randn(SHAPE, CPU, dt),
            "philox, eager, one at a time": (
                lambda e=eager_single, dt=dtype: e.randn(SHAPE, CPU, dt)
            ),
            "old 32-bit hash": lambda o=old, dt=dtype: o.randn(SHAPE, dt),
        }
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for fn in methods.values():  # warm up (and fill caches once)
            for _ in range(20):
                fn()
        for _ in range(repeats):
            for name, fn in methods.items():
                block = 12  # two cache refills (6 draws each) per block for cached streams
                start = time.thread_time()
                for _ in range(block):
                    fn()
                samples[name].append((time.thread_time() - start) / block * 1e6)
        results[str(dtype).replace("torch.", "")] = {
            name: statistics.median(v) for name, v in samples.items()
        }
    return results


# --- repeats --------------------------------------------------------------------------------


def count_repeats_philox(total: int, chunk: int = 10_000_000) -> int:
    """Repeated values among `total` float64 normals of one stream (samples x entries)."""
    noise = PhiloxNormal((0xC0FFEE, 0xBADF00D))
    parts = []
    done = 0
    while done < total:
        n = min(chunk, total - done)
        rows = n // 1000
        part = PhiloxNormal(noise.key, sample_offset=done // 1000).normals(
            (rows, 1000), CPU, torch.float64, 0
        )
        parts.append(part.flatten())
        done += rows * 1000
    z = torch.cat(parts)
    del parts
    z, _ = torch.sort(z)
    return int((z[1:] == z[:-1]).sum())


def count_repeats_words(total: int, chunk: int = 5_000_000) -> int:
    """Repeated 64-bit values among `total` Philox outputs (two per block: words w0 w1 and
    w2 w3), for counters (0, 0, s, 0), s = 0, 1, ...: the generator itself never repeats
    (an ideal one: total^2 / 2^65 expected, 3e-4 for 1e8)."""
    parts = []
    for lo in range(0, total // 2, chunk):
        n = min(chunk, total // 2 - lo)
        counter = torch.zeros(4, n, dtype=torch.int64)
        counter[2] = torch.arange(lo, lo + n)
        w = philox4x32(counter, (0xC0FFEE, 0xBADF00D))
        # (hi << 32) | lo wraps into int64: a bijection of the 64 bits, fine for equality
        parts.append(torch.cat([(w[0] << 32) | w[1], (w[2] << 32) | w[3]]))
    v, _ = torch.sort(torch.cat(parts))
    return int((v[1:] == v[:-1]).sum())


def expected_float64_collisions(total: int) -> float:
    """Expected coinciding pairs among `total` ideal float64 standard normals: pairs times
    the chance that two land on the same float64 (the integral of phi(z)^2 ulp(z))."""
    z = torch.linspace(-9, 9, 2_000_001, dtype=torch.float64)
    phi = torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    ulp = torch.nextafter(z.abs(), torch.tensor(math.inf, dtype=torch.float64)) - z.abs()
    return total * (total - 1) / 2 * float(torch.trapezoid(phi**2 * ulp, z))


def count_repeats_old(total: int) -> int:
    z = OldHashNoise(12345).randn((total // 1000, 1000), torch.float64).flatten()
    z, _ = torch.sort(z)
    return int((z[1:] == z[:-1]).sum())


# --- report ---------------------------------------------------------------------------------


def write_report(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "philox.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Per-sample noise: Philox-4x32-10 against torch.randn",
        "",
        f"One draw of shape {SHAPE[0]:,} x {SHAPE[1]}, median CPU microseconds of one thread "
        f"over {result['repeats']} interleaved repeats ({result['machine']}). Compiled CPU "
        f"path (C, built on first use) {'used' if result['compiled_path'] else 'NOT available'}"
        "; the eager rows run the same draws with torch operations only (identical values).",
        "",
        "| method | float32 us | x randn | float64 us | x randn |",
        "|---|---|---|---|---|",
    ]
    t32, t64 = result["timing"]["float32"], result["timing"]["float64"]
    for name in t32:
        lines.append(
            f"| {name} | {t32[name]:.0f} | {t32[name] / t32['torch.randn']:.2f} | "
            f"{t64[name]:.0f} | {t64[name] / t64['torch.randn']:.2f} |"
        )
    lines += [
        "",
        f"Repeats: {result['repeats_words']} among {result['draws_philox']:.0e} 64-bit Philox "
        f"outputs (an ideal generator: {result['draws_philox'] ** 2 / 2**65:.0e} expected); "
        f"{result['repeats_philox']} among {result['draws_philox']:.0e} float64 Philox "
        f"normals, where ideal float64 normals would show {result['expected_float64']:.2f} "
        "on average (two normals can round to the same float64); "
        f"{result['repeats_old']} among {result['draws_old']:.0e} normals of the old 32-bit "
        "hash (whose angle was a function of its radius word, so it had at most 2^32 "
        f"distinct values: {result['draws_old'] ** 2 / 2**33:,.0f} expected).",
        "",
    ]
    (out / "philox.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(t32)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [t32[n] for n in names], width=0.4, label="float32")
    ax.bar([x + 0.2 for x in xs], [t64[n] for n in names], width=0.4, label="float64")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("us per 10,000 x 2 draw")
    ax.set_title("per-sample noise cost (median, 1 CPU thread)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "philox.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 1e6 draws")
    parser.add_argument("--draws", type=float, default=None, help="float64 draws to check")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 15 if args.quick else 60
    draws = int(args.draws or (1e6 if args.quick else 1e8))
    draws_old = min(draws, 10_000_000)
    start = time.perf_counter()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "compiled_path": _native_uniforms() is not None,
        "shape": list(SHAPE),
        "repeats": repeats,
        "timing": time_draws(repeats),
        "draws_philox": draws,
        "repeats_philox": count_repeats_philox(draws),
        "expected_float64": expected_float64_collisions(draws),
        "repeats_words": count_repeats_words(draws),
        "draws_old": draws_old,
        "repeats_old": count_repeats_old(draws_old),
    }
    result["seconds"] = time.perf_counter() - start
    write_report(Path(args.out), result)
    print((Path(args.out) / "philox.md").read_text())


if __name__ == "__main__":
    main()
