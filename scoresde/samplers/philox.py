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

Speed (eager torch, any device): the four words travel as two packed int64 lanes, so a
round is seven operations on contiguous int64 tensors (`_Rounds`); round 0, where only the
draw word varies between draws, is computed once per shape and the draw word xored in
(`_Workspace`); buffers are reused across draws. On the CPU, where each tensor operation is
a pass over memory, the integer part and the uniforms are computed instead by a small C
function compiled on first use when a C compiler is present (`_philox_native`; ~4x less
time per draw); it is used only after reproducing the eager path bit for bit, and the
Box-Muller floats are made by the same torch code either way, so the values never depend
on it (`PhiloxNormal.use_native` switches it off; `benchmarks/philox.py` times both).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

from scoresde._typing import Tensor
from scoresde.samplers import _philox_native

__all__ = ["philox4x32", "check_philox", "derive_key", "PhiloxNormal", "KNOWN_ANSWERS"]

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


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


# The int32 halves of an int64, by index in `t.view(torch.int32).view(*t.shape, 2)`.
_HI, _LO = (1, 0) if sys.byteorder == "little" else (0, 1)
_UINT32 = getattr(torch, "uint32", None)  # torch >= 2.3


def _round_keys(key: tuple[int, int], device: torch.device) -> list[Tensor]:
    """Per round, `[[k0 << 32], [k1 << 32]]` (int64 bit patterns): the round keys, placed
    in the high halves of the packed lanes (see `_Rounds`)."""
    k0, k1 = (int(k) & _MASK for k in key)
    return [
        torch.tensor(
            [[_signed(((k0 + r * _W0) & _MASK) << 32)], [_signed(((k1 + r * _W1) & _MASK) << 32)]],
            dtype=torch.int64,
            device=device,
        )
        for r in range(ROUNDS)
    ]


_UNSET: Any = object()
_NATIVE: Any = _UNSET  # the checked compiled uniforms, None if unavailable; set on first use


def _native_uniforms() -> _philox_native.UniformsFn | None:
    """The compiled CPU uniforms (`scoresde.samplers._philox_native`) once they have given
    the eager path's values, bit for bit, for float32 and float64 in both layouts, across
    the 2^32 wrap of the sample index and two keys; None if unavailable or different."""
    global _NATIVE
    if _NATIVE is _UNSET:
        _NATIVE = None
        fn = _philox_native.load()
        if fn is not None:
            agree = True
            f32, f64 = torch.float32, torch.float64
            # (samples, blocks, first draw, draws, dtype, interleaved): both counter fills
            # of the C code, more than one of its 256-lane chunks, every output layout
            specs = [(7, 3, 2**32 - 2, 2, f32, False), (7, 3, 2**32 - 2, 2, f32, True)]
            specs += [(7, 3, 2**32 - 2, 2, f64, False), (300, 1, 5, 1, f32, True)]
            specs += [(300, 1, 5, 1, f32, False), (300, 1, 5, 1, f64, False)]
            for key, offset in (((0, 0), 0), ((_MASK, 0x9ABCDEF0), 2**32 - 5)):
                noise = PhiloxNormal(key, offset)
                for b, blocks, first, draws, dtype, inter in specs:
                    spec = (b, blocks, first, draws, dtype, torch.device("cpu"))
                    eager = noise._uniforms(*spec, None, inter)
                    compiled = noise._uniforms(*spec, fn, inter)
                    agree = agree and all(map(torch.equal, eager, compiled))
            _NATIVE = fn if agree else None
    return _NATIVE


class _Rounds:
    """Workspace for Philox rounds on `n` counters at once (reused across calls).

    Layout: the state is `y`, `[2, n]` int64, each a packed pair of 32-bit words: lane A
    (row 0) holds `(c0 << 32) | c1`, lane B (row 1) `(c2 << 32) | c3` (bit patterns; the
    int64 value may be negative). One round,
    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)),
    is then, with the 64-bit products P_A = M0 c0 and P_B = M1 c2 (taken in int64: they wrap
    modulo 2^64, so their bits are exact),

        lane A <- P_B ^ (lane A << 32) ^ (k0 << 32),   lane B <- P_A ^ (lane B << 32) ^ (k1 << 32):

    `lane << 32` moves the odd word (c1, c3) into the high half, where it meets the high word
    of the product; the product's low word becomes the new odd word. The multiplicands c0, c2
    are the high halves (`lane >> 32`, masked: int64 shifts are arithmetic), written with the
    rows swapped so that the product rows are (P_B, P_A), already in the order of the lanes
    they update. Seven tensor operations a round, all on contiguous int64 tensors.
    """

    def __init__(self, n: int, device: torch.device) -> None:
        self.y = torch.empty((2, n), dtype=torch.int64, device=device)
        self.mult = torch.empty((2, n), dtype=torch.int64, device=device)
        self.prod = torch.empty((2, n), dtype=torch.int64, device=device)
        # rows (M1, M0): row 0 of `mult` holds c2 and row 1 holds c0
        self._m = torch.tensor([[_M1], [_M0]], dtype=torch.int64, device=device)

    def products(self) -> Tensor:
        """(P_B, P_A) of the current state into `prod` (returned)."""
        torch.bitwise_right_shift(self.y[1], 32, out=self.mult[0])
        torch.bitwise_right_shift(self.y[0], 32, out=self.mult[1])
        self.mult.bitwise_and_(_MASK)
        return torch.mul(self.mult, self._m, out=self.prod)

    def round(self, key: Tensor) -> None:
        """One round on `y` in place (`key`: that round's `[[k0 << 32], [k1 << 32]]`)."""
        prod = self.products()  # before `y` changes
        self.y.bitwise_left_shift_(32).bitwise_xor_(prod).bitwise_xor_(key)

    def run(self, keys: list[Tensor], first_round: int = 0) -> Tensor:
        """Rounds `first_round` .. 9 on `y` in place (returned)."""
        for r in range(first_round, ROUNDS):
            self.round(keys[r])
        return self.y


def philox4x32(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """Philox-4x32-10 of `counter` (`[4, *N]` int64 holding 32-bit words c0..c3) under the
    64-bit `key` (k0, k1): the four output words `[4, *N]` (int64, values in [0, 2^32))."""
    if counter.dtype != torch.int64 or counter.shape[0] != 4:
        raise ValueError(f"counter must be int64 [4, *N], got {counter.dtype} {counter.shape}")
    c = counter.reshape(4, -1) & _MASK
    work = _Rounds(c.shape[1], counter.device)
    torch.bitwise_or(c[0::2] << 32, c[1::2], out=work.y)
    y = work.run(_round_keys(key, counter.device))
    out = torch.stack([(y >> 32) & _MASK, y & _MASK], dim=1)  # [lane, (even, odd), n]
    return out.reshape(counter.shape)


def derive_key(key: tuple[int, int], domain: int) -> tuple[int, int]:
    """A 64-bit key for a separate family of streams (e.g. a sampler's reference particles),
    derived from `key`: the first two output words of the counter (2^32 - 1, domain, 0, 0).

    `PhiloxNormal` never uses block number 2^32 - 1 (it allows fewer than 2^32 blocks), so
    the derived key is no noise value of the original streams.
    """
    if not 0 <= int(domain) <= _MASK:
        raise ValueError(f"domain must be a 32-bit word, got {domain!r}")
    counter = torch.tensor([[_MASK], [int(domain)], [0], [0]], dtype=torch.int64)
    k0, k1 = philox4x32(counter, key)[:2, 0].tolist()
    return int(k0), int(k1)


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
                f"{[hex(v) for v in want]} on {device.type}: int64 multiplication or shifts do "
                "not wrap modulo 2^64 on this platform; per-sample noise is not available"
            )
    _CHECKED.add(device.type)


class PhiloxNormal:
    """Standard normal noise with one Philox stream per sample (see the module docstring).

    Args:
        key: the 64-bit key as two 32-bit words.
        sample_offset: the global index of this batch's first sample (chunked or sharded
            runs pass where their samples start, so sample i is sample offset + i).
        max_cached_draws: draws of the same shape are computed this many at a time (fewer
            for large tensors), which amortises the fixed cost of each tensor operation;
            values never depend on it.

    Attribute `use_native` (default True): on the CPU, let the compiled code of
    `scoresde.samplers._philox_native` compute the integers and uniforms where it is
    available; values never depend on it (it is used only after it has reproduced the
    eager torch path bit for bit).
    """

    # Draws of one shape are precomputed until a chunk holds about this many values: on
    # accelerators this amortises the kernel launches; on the CPU it amortises the ~1 us
    # fixed cost of each tensor operation (~80 a draw in eager torch, ~12 with the compiled
    # part), while the chunk's buffers still fit in a core's cache (measured on 10,000 x 2:
    # 4-6 draws at a time ~15-20% cheaper per draw than one, 13 no better than 4).
    _CACHE_ELEMENTS = {"cpu": 1 << 17}
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
        self._work: _Workspace | None = None
        self._floats: list[Tensor] | None = None
        self.use_native = True

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
        device = torch.device(device)
        check_philox(device)
        b, d = shape[0], math.prod(shape[1:])
        wide = dtype == torch.float64
        per_block = 2 if wide else 4
        blocks = -(-d // per_block)
        if blocks >= 2**32 or first_draw + num_draws > 2**32:
            raise ValueError("too many entries per sample or draws for the 32-bit counters")
        # Entry e of a sample: block e // per_block, output e % per_block; outputs 0..half-1
        # are the cosines, half.. the sines of the block's Box-Muller pairs.
        half = per_block // 2
        with_sin = d > half
        slots = per_block if with_sin else half
        out = torch.empty((num_draws, b, blocks, slots), dtype=_float(dtype), device=device)
        native = _native_uniforms() if device.type == "cpu" and self.use_native else None
        if native is not None and not wide and not with_sin:
            # float32 cosines only: uniforms interleaved as the output, all contiguous
            u1, u2 = self._uniforms(b, blocks, first_draw, num_draws, dtype, device, native, True)
            _box_muller(u1, u2, [out.view(-1)], [], scratch=u2)
        else:
            # Output slot i (a strided view) gets row i % half of the cosines or sines: one
            # operation per row, as writing a whole [rows, n] result transposed is far slower.
            u1, u2 = self._uniforms(b, blocks, first_draw, num_draws, dtype, device, native)
            outs = out.view(-1, slots).unbind(1)
            scratch = self._floats[2] if native is not None and self._floats else None
            _box_muller(u1, u2, outs[:half], outs[half:], scratch)
        z = out.reshape(num_draws, b, -1)
        if z.shape[-1] != d:
            z = z[..., :d]
        return z.to(dtype).reshape(num_draws, *shape)

    def _uniforms(
        self,
        b: int,
        blocks: int,
        first_draw: int,
        num_draws: int,
        dtype: torch.dtype,
        device: torch.device,
        native: _philox_native.UniformsFn | None = None,
        interleaved: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The Box-Muller uniforms (u1 in (0, 1], u2 in [0, 1)) of lanes i = (draw, sample,
        block) in that order: float64 `[1, n]` each (from words (w0, w1) and (w2, w3)); for
        other dtypes float32 pairs (w0, w1) and (w2, w3), `[2, n]` (a row per pair) or
        `[1, 2n]` interleaved (lane i's pairs at 2i, 2i + 1). With `native` (on the CPU)
        the compiled code computes them; otherwise the eager torch rounds."""
        wide = dtype == torch.float64
        n = num_draws * b * blocks
        if native is not None:
            shape = (1, n) if wide else ((1, 2 * n) if interleaved else (2, n))
            u1, u2 = self._float_buffers(shape, _float(dtype))[:2]
            k0, k1 = self.key
            args = (num_draws, b, blocks, first_draw, self.sample_offset, k0, k1, int(wide))
            native(*args, u1.data_ptr(), u2.data_ptr(), int(interleaved))
            return u1, u2
        work = self._workspace(b, blocks, num_draws, device)
        # Round 0 with draw word 0 is cached (`_Workspace`); the draw word d enters round 0
        # only as `d << 32` xored into lane A (its c1), so it is xored in here.
        y = work.rounds.y.view(2, num_draws, b, blocks)
        if num_draws == 1:
            draw: Tensor | int = first_draw << 32  # < 2^63: a plain int64
        else:
            draw = torch.arange(first_draw, first_draw + num_draws, dtype=torch.int64)
            draw = draw.bitwise_left_shift_(32).to(device).view(num_draws, 1, 1)
        torch.bitwise_xor(work.after_round0[0], draw, out=y[0])
        y[1].copy_(work.after_round0[1])
        y = work.rounds.run(self._round_keys(device), first_round=1)
        if wide:  # 53-bit uniforms: u1 in (0, 1] from (w0, w1), u2 in [0, 1) from (w2, w3)
            # lane (w_even << 32) | w_odd shifted right by 11: (w_even << 21) | (w_odd >> 11)
            bits = y.bitwise_right_shift(11).bitwise_and_((1 << 53) - 1)
            u = torch.mul(bits, _scalar(2.0**-53, torch.float64))  # exact int64 -> float64
            return u[0:1].add_(2.0**-53), u[1:2]
        u1, u2 = _uniforms_float32(y)
        if interleaved:
            u1, u2 = u1.T.reshape(1, -1), u2.T.reshape(1, -1)
        return u1, u2

    def _float_buffers(self, shape: tuple[int, int], dtype: torch.dtype) -> list[Tensor]:
        """Three CPU buffers of `shape` reused across draws (fresh ones of ~100 kB would cost
        page faults at every draw): the uniforms and a scratch tensor for `_box_muller`."""
        if self._floats is None or self._floats[0].shape != shape or self._floats[0].dtype != dtype:
            # NaN-filled: compiled code that wrote nothing cannot pass `_native_uniforms`' check
            self._floats = [torch.full(shape, math.nan, dtype=dtype) for _ in range(3)]
        return self._floats

    def _round_keys(self, device: torch.device) -> list[Tensor]:
        if device not in self._keys:
            self._keys[device] = _round_keys(self.key, device)
        return self._keys[device]

    def _workspace(self, b: int, blocks: int, num_draws: int, device: torch.device) -> _Workspace:
        spec = (b, blocks, num_draws, device)
        if self._work is None or self._work.spec != spec:
            self._work = _Workspace(spec, self.sample_offset, self._round_keys(device)[0])
        return self._work


class _Workspace:
    """Buffers of `PhiloxNormal.normals` for one (samples, blocks, draws, device), and the
    state after round 0 for draw number 0, `[2, 1, samples, blocks]` (it depends on the
    block and sample words and the key only)."""

    def __init__(self, spec: tuple[Any, ...], sample_offset: int, key0: Tensor) -> None:
        b, blocks, num_draws, device = spec
        self.spec = spec
        self.rounds = _Rounds(num_draws * b * blocks, device)
        first = _Rounds(b * blocks, device)
        j = torch.arange(blocks, device=device, dtype=torch.int64)
        s = torch.arange(b, device=device, dtype=torch.int64) + sample_offset
        y = first.y.view(2, b, blocks)
        # Counter (c0, c1, c2, c3) = (block, draw, sample low word, sample high word), packed
        # as lanes (c0 << 32) | c1 and (c2 << 32) | c3, here for draw 0.
        y[0] = (j << 32)[None, :]
        y[1] = ((s << 32) | (s >> 32))[:, None]
        first.round(key0)
        self.after_round0 = first.y.view(2, 1, b, blocks)


def _float(dtype: torch.dtype) -> torch.dtype:
    """The dtype the normals are computed in (float32 for float32/16 and bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_SCALARS: dict[tuple[float, torch.dtype], Tensor] = {}


def _scalar(value: float, dtype: torch.dtype) -> Tensor:
    """A 0-dim CPU tensor (usable with tensors on any device): as the other operand of an
    integer tensor it sets the result dtype (the integers are converted to it, rounding to
    nearest as `.to(dtype)` does, then the operation is done in that dtype)."""
    if (value, dtype) not in _SCALARS:
        _SCALARS[value, dtype] = torch.tensor(value, dtype=dtype)
    return _SCALARS[value, dtype]


def _uniforms_float32(y: Tensor) -> tuple[Tensor, Tensor]:
    """u1 = (w_even + 1) 2^-32 in (0, 1] and u2 = w_odd 2^-32 in [0, 1), float32 `[2, n]`,
    from the packed lanes `y` `[2, n]`: pairs (w0, w1) in row 0, (w2, w3) in row 1 (each word
    rounded to float32 first, then the arithmetic in float32)."""
    if _UINT32 is not None and y.device.type == "cpu":  # words read in place as uint32
        # (CPU only: other backends' support for uint32 operands is more recent)
        words = y.view(_UINT32).view(*y.shape, 2)
        even, odd = words[..., _HI], words[..., _LO]
    else:
        even, odd = y.bitwise_right_shift(32).bitwise_and_(_MASK), y.bitwise_and(_MASK)
    u1 = torch.add(even, _scalar(1.0, torch.float32)).mul_(2.0**-32)
    return u1, torch.mul(odd, _scalar(2.0**-32, torch.float32))


def _box_muller(
    u1: Tensor,
    u2: Tensor,
    cos_out: Sequence[Tensor],
    sin_out: Sequence[Tensor],
    scratch: Tensor | None = None,
) -> None:
    """Row i of r cos(2 pi u2) into cos_out[i], of r sin(2 pi u2) into sin_out[i] (if given),
    r = sqrt(-2 log u1); u1 in (0, 1] so the log is finite (u1 and u2 `[rows, n]` are
    overwritten; the cosines go to `scratch` if given, which may be u2 when no sines are
    wanted)."""
    # (0-dim scalars of u's dtype: the same float32/64 constants as Python floats give, at
    # a third of the fixed cost of an in-place operation with a Python float)
    r = u1.log_().mul_(_scalar(-2.0, u1.dtype)).sqrt_()
    theta = u2.mul_(_scalar(2.0 * math.pi, u2.dtype))
    cosines = theta.cos() if scratch is None else torch.cos(theta, out=scratch)
    for row in range(len(cos_out)):
        torch.mul(r[row], cosines[row], out=cos_out[row])
    if sin_out:
        sines = theta.sin_()
        for row in range(len(sin_out)):
            torch.mul(r[row], sines[row], out=sin_out[row])
