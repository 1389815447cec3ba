"""Optional compiled Philox-4x32-10 uniforms for the CPU (used by `scoresde.samplers.philox`).

Ten Philox rounds take ~70 eager tensor operations; on the CPU, where each is a pass over
memory, a small C loop does the same integer work several times faster. It is built on
first use with the system C compiler (`$CC`, else `cc`, `gcc` or `clang`) into a shared
library cached under `$SCORESDE_CACHE_DIR` (default `~/.cache/scoresde`) and loaded with
ctypes: no torch headers, no ninja, 1-3 s to compile once per machine. Anything that fails
(no compiler, a read-only cache, no ctypes loading) returns None and the caller keeps the
eager torch path; `SCORESDE_NATIVE_PHILOX=0` switches it off. The C code computes the
32-bit words and the uniforms made of them (exact, or one rounding of a word to float32),
which the caller checks against the eager path before use (`philox._native_uniforms`); the
normals are then made by the same torch Box-Muller code either way, so the noise is
bit-identical with or without it.

The library is compiled for the platform's baseline instruction set plus, where the
compiler supports function multiversioning (gcc >= 12 on x86-64), an x86-64-v4 (AVX-512)
clone chosen at load time by the running CPU, so a cache shared between machines stays
valid (measured: the AVX-512 clone halves the time; an AVX2 clone was no faster than the
baseline).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["load"]

# Philox-4x32-10 of the counters (j, first_draw + k, s mod 2^32, s div 2^32),
# s = sample_offset + b, for draw k < draws, sample b < samples, block j < blocks in that
# order (lane i), and the uniforms `PhiloxNormal.normals` makes of the four words:
#   wide (float64): u1[i] = ((w0 << 21 | w1 >> 11) + 1) 2^-53, u2[i] = (w2 << 21 | w3 >> 11) 2^-53
#   else (float32): pair p = 0, 1 (words (w0, w1), (w2, w3)) at 2 i + p (interleaved) or
#                   p n + i: u1 = (float(w_even) + 1) 2^-32, u2 = float(w_odd) 2^-32
# exactly as the torch code computes them (one rounding of each word to float32, then float32
# arithmetic; -ffp-contract=off keeps the compiler from fusing it into one rounding).
# Counters go in chunks that stay in L1, one round at a time over a chunk, so the compiler
# vectorises the rounds.
_SOURCE = r"""
#include <stdint.h>
#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u
#define CHUNK 256
#ifdef SCORESDE_CLONES
__attribute__((target_clones("arch=x86-64-v4", "default")))
#endif
void philox_uniforms(int64_t draws, int64_t samples, int64_t blocks, uint32_t first_draw,
                     uint64_t sample_offset, uint32_t key0, uint32_t key1, int wide,
                     void *u1, void *u2, int interleaved) {
    uint32_t c0[CHUNK], c1[CHUNK], c2[CHUNK], c3[CHUNK];
    const int64_t n = draws * samples * blocks;
    int64_t k = 0, s = 0, j = 0;
    for (int64_t start = 0; start < n; start += CHUNK) {
        const int64_t m = n - start < CHUNK ? n - start : CHUNK;
        if (blocks == 1 && draws == 1) {  /* lane i is sample i: a vectorisable fill */
            for (int64_t i = 0; i < m; i++) {
                const uint64_t g = sample_offset + (uint64_t)(start + i);
                c0[i] = 0;
                c1[i] = first_draw;
                c2[i] = (uint32_t)g;
                c3[i] = (uint32_t)(g >> 32);
            }
        } else {
            for (int64_t i = 0; i < m; i++) {
                const uint64_t g = sample_offset + (uint64_t)s;
                c0[i] = (uint32_t)j;
                c1[i] = first_draw + (uint32_t)k;
                c2[i] = (uint32_t)g;
                c3[i] = (uint32_t)(g >> 32);
                if (++j == blocks) {
                    j = 0;
                    if (++s == samples) {
                        s = 0;
                        ++k;
                    }
                }
            }
        }
        for (uint32_t r = 0; r < 10; r++) {
            const uint32_t ka = key0 + r * W0, kb = key1 + r * W1;
            for (int64_t i = 0; i < m; i++) {
                const uint64_t pa = (uint64_t)M0 * c0[i], pb = (uint64_t)M1 * c2[i];
                c0[i] = (uint32_t)(pb >> 32) ^ c1[i] ^ ka;
                c1[i] = (uint32_t)pb;
                c2[i] = (uint32_t)(pa >> 32) ^ c3[i] ^ kb;
                c3[i] = (uint32_t)pa;
            }
        }
        if (wide) {
            double *a = (double *)u1 + start, *b = (double *)u2 + start;
            for (int64_t i = 0; i < m; i++) {
                const uint64_t bits1 = ((uint64_t)c0[i] << 21) | (c1[i] >> 11);
                const uint64_t bits2 = ((uint64_t)c2[i] << 21) | (c3[i] >> 11);
                a[i] = (double)(int64_t)(bits1 + 1) * 0x1p-53;
                b[i] = (double)(int64_t)bits2 * 0x1p-53;
            }
        } else {
            float a0[CHUNK], b0[CHUNK], a1[CHUNK], b1[CHUNK];
            for (int64_t i = 0; i < m; i++) {
                a0[i] = ((float)c0[i] + 1.0f) * 0x1p-32f;
                b0[i] = (float)c1[i] * 0x1p-32f;
                a1[i] = ((float)c2[i] + 1.0f) * 0x1p-32f;
                b1[i] = (float)c3[i] * 0x1p-32f;
            }
            float *a = (float *)u1, *b = (float *)u2;
            if (interleaved) {
                for (int64_t i = 0; i < m; i++) {
                    a[2 * (start + i)] = a0[i];
                    a[2 * (start + i) + 1] = a1[i];
                    b[2 * (start + i)] = b0[i];
                    b[2 * (start + i) + 1] = b1[i];
                }
            } else {
                for (int64_t i = 0; i < m; i++) {
                    a[start + i] = a0[i];
                    a[n + start + i] = a1[i];
                    b[start + i] = b0[i];
                    b[n + start + i] = b1[i];
                }
            }
        }
    }
}
"""

# philox_uniforms(draws, samples, blocks, first_draw, sample_offset, key0, key1, wide,
#                 u1, u2, interleaved): u1 and u2 are data pointers (integers).
UniformsFn = Callable[[int, int, int, int, int, int, int, int, int, int, int], None]


def _cache_dir() -> Path:
    if os.environ.get("SCORESDE_CACHE_DIR"):
        return Path(os.environ["SCORESDE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scoresde"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(cc: str, target: Path) -> bool:
    """Compile `_SOURCE` to `target` (written atomically); False if the compiler fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "philox.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        base = [
            cc,
            "-O3",
            "-shared",
            "-fPIC",
            "-std=c99",
            "-ffp-contract=off",
            str(src),
            "-o",
            str(out),
        ]
        for extra in (["-DSCORESDE_CLONES"], []):  # multiversioned first, else baseline
            try:
                done = subprocess.run(base + extra, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                return False
            if done.returncode == 0 and out.exists():
                os.replace(out, target)  # atomic: concurrent builders each write whole files
                return True
    return False


def load() -> UniformsFn | None:
    """The compiled `philox_uniforms`, building it if needed; None where unavailable."""
    if os.environ.get("SCORESDE_NATIVE_PHILOX", "1") == "0":
        return None
    try:
        cc = _compiler()
        if cc is None:
            return None
        suffix = ".dll" if sys.platform == "win32" else ".so"
        tag = f"{_SOURCE}|{Path(cc).name}|{sys.platform}|{platform.machine()}"
        digest = hashlib.sha256(tag.encode()).hexdigest()[:16]
        target = _cache_dir() / f"philox_{digest}{suffix}"
        if not target.exists() and not _compile(cc, target):
            return None
        fn = ctypes.CDLL(str(target)).philox_uniforms
    except Exception:  # any failure to build or load: the eager path is used
        return None
    i64, u32 = ctypes.c_int64, ctypes.c_uint32
    fn.argtypes = [i64, i64, i64, u32, ctypes.c_uint64, u32, u32, ctypes.c_int]
    fn.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    fn.restype = None
    return fn
