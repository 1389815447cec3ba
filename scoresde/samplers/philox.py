"""Philox-4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as
1, 2, 3"), vectorised in torch, and the per-sample Gaussian noise built on it.

Philox maps a 128-bit counter and a 64-bit key to 128 random bits (four 32-bit words) with
ten rounds of a multiply-and-xor Feistel network. Being counter-based, any value is a pure
function of (key, counter): sample i's noise can be computed without computing anyone
else's, which is what makes results independent of the batch size, of how a run is split
into chunks and of the number of processes it is sharded over.

Counter layout used by `PhiloxNormal` for sample s (a 64-bit global index), draw d (the d-th
noise tensor of a run; draw 0 is x_T) and block j of that sample's entries:
`(j, d, s mod 2^32, s div 2^32)`. Each block gives four words: for float64 two normals from
two 53-bit uniforms (Box–Muller: words 0-1 and 2-3), for other dtypes four normals from
four 32-bit uniforms (two Box–Muller pairs).

Arithmetic: torch has no unsigned 64-bit multiply, so the 32x32 -> 64-bit products are
taken in int64 and wrap modulo 2^64 (two's complement, as every torch backend computes
it); the low and high words of the product are then exact. `check_philox(device)` runs the
published known-answer vectors once per device type before first use and raises if the
platform computes anything else.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scoresde._typing import Tensor

__all__ = ["philox4x32", "check_philox", "PhiloxNormal", "KNOWN_ANSWERS"]

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10

# Random123's tests/kat_vectors for philox4x32_10: (counter, key, output).
KNOWN_ANSWERS = (
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((_MASK,) * 4, (_MASK,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
)


def _round_keys(key: tuple[int, int], device: torch.device) -> list[Tensor]:
    """The (k0, k1) of each round as `[2]` int64 tensors, ordered as `_rounds` xors them:
    (k1, k0) after an even round (its result is in flipped order), (k0, k1) after an odd."""
    k0, k1 = (int(k) & _MASK for k in key)
    out = []
    for r in range(ROUNDS):
        pair = [(k0 + r * _W0) & _MASK, (k1 + r * _W1) & _MASK]
        out.append(torch.tensor(pair[::-1] if r % 2 == 0 else pair, device=device))
    return out


def _rounds(even: Tensor, odd: Tensor, keys: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Ten Philox rounds on words (c0, c2) = `even` and (c1, c3) = `odd`, each `[2, ...]`
    int64 holding 32-bit values (consumed: they may be overwritten).

    One round: (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1,
    lo(M0 c0)). To save a copy per round the pairs are kept alternately in natural and in
    flipped order ([c2, c0], [c3, c1]): multiplying the flipped pair by [M1, M0] puts the
    high words exactly where the next natural-order pair needs them, and vice versa.
    """
    shape = (2,) + (1,) * (even.ndim - 1)
    mult = torch.tensor([_M0, _M1], dtype=torch.int64, device=even.device).reshape(shape)
    mults = (mult, mult.flip(0))
    for r in range(ROUNDS):
        flipped = r % 2
        p = torch.mul(even, mults[flipped])  # wraps mod 2^64: its hi and lo words are exact
        # natural in:  p = [M0 c0, M1 c2]; next (flipped) even = [hi(M0 c0)^c3^k1, hi(M1 c2)^c1^k0]
        # flipped in:  p = [M1 c2, M0 c0]; next (natural) even = [hi(M1 c2)^c1^k0, hi(M0 c0)^c3^k1]
        even = torch.bitwise_right_shift(p, 32).bitwise_and_(_MASK)
        even.bitwise_xor_(odd.flip(0)).bitwise_xor_(keys[r].reshape(shape))
        odd = p.bitwise_and_(_MASK)
    if ROUNDS % 2:
        even, odd = even.flip(0), odd.flip(0)
    return even, odd


def philox4x32(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """Philox-4x32-10 of `counter` (`[4, *N]` int64 holding 32-bit words c0..c3) under the
    64-bit `key` (k0, k1): the four output words `[4, *N]` (int64, values in [0, 2^32))."""
    if counter.dtype != torch.int64 or counter.shape[0] != 4:
        raise ValueError(f"counter must be int64 [4, *N], got {counter.dtype} {counter.shape}")
    keys = _round_keys(key, counter.device)
    even, odd = _rounds(counter[0::2], counter[1::2], keys)
    return torch.stack([even[0], odd[0], even[1], odd[1]])


_CHECKED: set[str] = set()


def check_philox(device: torch.device | str) -> None:
    """Raise RuntimeError unless `philox4x32` reproduces Random123's known answers on this
    device type (done once per device type; it relies on int64 products wrapping)."""
    device = torch.device(device)
    if device.type in _CHECKED:
        return
    counters = torch.tensor([c for c, _, _ in KNOWN_ANSWERS], dtype=torch.int64, device=device)
    for i, (_, key, want) in enumerate(KNOWN_ANSWERS):
        got = philox4x32(counters[i][:, None], key)[:, 0].tolist()
        if got != list(want):
            raise RuntimeError(
                f"Philox-4x32-10 gives {[hex(v) for v in got]} instead of the published "
                f"{[hex(v) for v in want]} on {device.type}: int64 multiplication does not "
                "wrap modulo 2^64 on this platform; per-sample noise is not available"
            )
    _CHECKED.add(device.type)


class PhiloxNormal:
    """Standard normal noise with one Philox stream per sample (see the module docstring).

    Args:
        key: the 64-bit key as two 32-bit words.
        sample_offset: the global index of this batch's first sample (chunked or sharded
            runs pass where their samples start, so sample i is sample offset + i).
        max_cached_draws: draws of the same shape are computed this many at a time (fewer
            for large tensors), which amortises the ~80 small tensor operations of ten
            Philox rounds; values never depend on it.
    """

    # Draws of one shape are precomputed until a chunk holds about this many values: on
    # accelerators this amortises the kernel launches; on the CPU the work is per element
    # and bigger chunks only leave the cache, so one draw at a time.
    _CACHE_ELEMENTS = {"cpu": 0}
    _CACHE_ELEMENTS_DEFAULT = 1 << 20

    def __init__(
        self, key: tuple[int, int], sample_offset: int = 0, max_cached_draws: int = 16
    ) -> None:
        self.key = (int(key[0]) & _MASK, int(key[1]) & _MASK)
        self.sample_offset = int(sample_offset)
        if not 0 <= self.sample_offset < 2**63:
            raise ValueError(f"sample_offset must be in [0, 2^63), got {sample_offset!r}")
        self.max_cached_draws = max(1, int(max_cached_draws))
        self.counter = 0  # the next draw number
        self._cache: list[Tensor] = []
        self._cache_spec: tuple[Any, ...] | None = None
        self._keys: dict[torch.device, list[Tensor]] = {}

    @classmethod
    def from_generator(
        cls, generator: torch.Generator | None, sample_offset: int = 0
    ) -> PhiloxNormal:
        """A stream keyed by 64 bits drawn from `generator` (torch's global RNG if None)."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        words = torch.randint(0, 2**32, (2,), generator=generator, device=gen_device)
        k0, k1 = (int(v) for v in words.tolist())
        return cls((k0, k1), sample_offset)

    def randn(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """Draw number `self.counter` (then advance it): `shape` = (B, *D) normals."""
        device = torch.device(device)
        spec = (tuple(shape), device, dtype)
        if spec != self._cache_spec or not self._cache:
            self._fill(spec)
        self.counter += 1
        return self._cache.pop()

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(tuple(x.shape), x.device, x.dtype)

    def _fill(self, spec: tuple[Any, ...]) -> None:
        """Compute the next K draws of shape spec into the cache (last draw first)."""
        shape, device, dtype = spec
        per_draw = max(1, math.prod(shape))
        budget = self._CACHE_ELEMENTS.get(device.type, self._CACHE_ELEMENTS_DEFAULT)
        k = max(1, min(self.max_cached_draws, budget // per_draw))
        draws = self.normals(shape, device, dtype, self.counter, k)
        self._cache = list(draws.unbind(0))[::-1]
        self._cache_spec = spec

    def normals(
        self,
        shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        first_draw: int,
        num_draws: int = 1,
    ) -> Tensor:
        """Draws first_draw .. first_draw + num_draws - 1 as `[num_draws, *shape]` (a pure
        function of the key, the sample indices and the draw numbers)."""
        check_philox(device)
        b, d = shape[0], math.prod(shape[1:])
        wide = dtype == torch.float64
        per_block = 2 if wide else 4
        blocks = -(-d // per_block)
        if blocks >= 2**32 or first_draw + num_draws > 2**32:
            raise ValueError("too many entries per sample or draws for the 32-bit counters")
        j = torch.arange(blocks, device=device, dtype=torch.int64)
        draw = torch.arange(first_draw, first_draw + num_draws, device=device, dtype=torch.int64)
        s = torch.arange(b, device=device, dtype=torch.int64) + self.sample_offset
        # Counter (c0, c1, c2, c3) = (block, draw, sample low word, sample high word).
        even = torch.empty((2, num_draws, b, blocks), dtype=torch.int64, device=device)
        odd = torch.empty_like(even)
        even[0] = j
        even[1] = (s & _MASK)[:, None]
        odd[0] = draw[:, None, None]
        odd[1] = (s >> 32)[:, None]
        if device not in self._keys:
            self._keys[device] = _round_keys(self.key, device)
        even, odd = _rounds(even, odd, self._keys[device])  # words (w0, w2), (w1, w3)
        if wide:  # 53-bit uniforms: u1 in (0, 1] from (w0, w1), u2 in [0, 1) from (w2, w3)
            bits = even.bitwise_left_shift_(21).bitwise_or_(odd.bitwise_right_shift_(11))
            bits = bits.to(torch.float64).mul_(2.0**-53)
            z = _box_muller(bits[0].add_(2.0**-53), bits[1])  # [2, K, B, blocks]
        else:  # 32-bit uniforms in float32 (enough for float32/16 output): pairs (w0, w1), (w2, w3)
            u1 = even.to(torch.float32).add_(1.0).mul_(2.0**-32)
            u2 = odd.to(torch.float32).mul_(2.0**-32)
            z = _box_muller(u1, u2).reshape(4, num_draws, b, blocks)
        # Entry e of a sample: block e // per_block, output e % per_block.
        z = z.permute(1, 2, 3, 0).reshape(num_draws, b, blocks * per_block)[..., :d]
        return z.to(dtype).reshape(num_draws, *shape)


def _box_muller(u1: Tensor, u2: Tensor) -> Tensor:
    """[r cos(2 pi u2); r sin(2 pi u2)], r = sqrt(-2 log u1), stacked on a new first dim
    (u1 in (0, 1] so the log is finite)."""
    r = u1.log_().mul_(-2.0).sqrt_()
    theta = u2.mul_(2.0 * math.pi)
    out = torch.empty((2, *r.shape), dtype=r.dtype, device=r.device)
    torch.mul(r, theta.cos(), out=out[0])
    torch.mul(r, theta.sin_(), out=out[1])
    return out
