"""Philox-4x32-10: the published known-answer vectors, agreement with a scalar reference on
random inputs, the statistics of the normals built on it, and per-sample streams that do not
depend on batch size, chunking, caching or the sample's position in the batch."""

from __future__ import annotations

import math
import random

import pytest
import torch
from scipy import stats

from scoresde.samplers import EulerMaruyamaSampler
from scoresde.samplers.philox import KNOWN_ANSWERS, PhiloxNormal, check_philox, philox4x32
from scoresde.sdes import VPSDE

MASK = 0xFFFFFFFF


def _reference(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox-4x32-10 on Python ints, written from the paper's description."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:  # bump the key before every round but the first
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


def test_known_answer_vectors() -> None:
    # Random123's kat_vectors for philox4x32_10, all three in one vectorised call.
    counters = torch.tensor([c for c, _, _ in KNOWN_ANSWERS], dtype=torch.int64).T
    for i, (counter, key, want) in enumerate(KNOWN_ANSWERS):
        assert _reference(counter, key) == want
        out = philox4x32(counters, key)[:, i].tolist()
        assert out == list(want), [hex(v) for v in out]
    check_philox("cpu")


def test_matches_the_scalar_reference_on_random_inputs() -> None:
    rng = random.Random(0)
    for _ in range(5):
        key = (rng.getrandbits(32), rng.getrandbits(32))
        counters = [tuple(rng.getrandbits(32) for _ in range(4)) for _ in range(200)]
        out = philox4x32(torch.tensor(counters, dtype=torch.int64).T, key)
        assert [tuple(col) for col in out.T.tolist()] == [_reference(c, key) for c in counters]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normals_are_standard_normal_and_do_not_repeat(dtype) -> None:
    noise = PhiloxNormal((0x12345678, 0x9ABCDEF0))
    z = noise.randn((1024, 1024), torch.device("cpu"), dtype).double().flatten()
    n = z.numel()
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z[:200_000].numpy(), "norm").pvalue > 1e-3
    # Tails: as many beyond 3 and 4 sigma as a normal has.
    for k in (3.0, 4.0):
        expected = 2 * stats.norm.sf(k) * n
        assert abs(int((z.abs() > k).sum()) - expected) < 6 * math.sqrt(expected)
    distinct = torch.unique(z).numel()
    if dtype == torch.float64:  # 53-bit uniforms: no repeats among 2^20 normals
        assert distinct == n
    else:  # 32-bit uniforms: float32 has few values; repeats as for any float32 normals
        assert distinct > 0.99 * n


def test_words_repeat_only_as_often_as_chance_says() -> None:
    # 2^20 random 32-bit words: about 2^40 / 2^33 = 128 coinciding pairs, not more.
    counter = torch.zeros(4, 2**18, dtype=torch.int64)
    counter[0] = torch.arange(2**18)
    words = philox4x32(counter, (1, 2)).flatten()
    repeats = words.numel() - torch.unique(words).numel()
    assert 128 - 5 * math.sqrt(128) < repeats < 128 + 5 * math.sqrt(128)


def test_streams_are_uncorrelated_across_samples_draws_and_entries() -> None:
    noise = PhiloxNormal((7, 9))
    draws = noise.normals((4, 50_000), torch.device("cpu"), torch.float64, 0, 2)  # [2, 4, D]
    rows = torch.cat([draws[0], draws[1]])  # 4 samples x 2 draws, each 50,000 entries
    corr = torch.corrcoef(rows)
    off = corr - torch.eye(8, dtype=corr.dtype)
    assert off.abs().max() < 5 / math.sqrt(50_000)
    # Neighbouring entries (which share a Philox block) are uncorrelated as well.
    x = draws[0, 0]
    assert abs(float(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1])) < 5 / math.sqrt(50_000)


def test_sample_i_does_not_depend_on_batch_offset_cache_or_shape_changes() -> None:
    cpu = torch.device("cpu")
    key = (3, 0xFFFFFFFF)
    for dtype in (torch.float64, torch.float32):
        whole = PhiloxNormal(key)
        big = [whole.randn((20, 3, 5), cpu, dtype) for _ in range(4)]
        part = PhiloxNormal(key, sample_offset=5, max_cached_draws=1)
        small = [part.randn((10, 3, 5), cpu, dtype) for _ in range(4)]
        for b, s in zip(big, small, strict=True):
            assert torch.equal(b[5:15], s)
        assert not torch.equal(big[0], big[1])  # successive draws differ
    # A change of shape mid-run keeps the draw numbering: draw 2 is draw 2.
    a = PhiloxNormal(key)
    a.randn((4, 2), cpu, torch.float64)
    a.randn((7, 2), cpu, torch.float64)
    third = a.randn((4, 2), cpu, torch.float64)
    direct = PhiloxNormal(key).normals((4, 2), cpu, torch.float64, first_draw=2)[0]
    assert torch.equal(third, direct)
    # Every key word matters, and large global sample indices work.
    ref = PhiloxNormal(key).randn((20, 3, 5), cpu, torch.float64)
    for other_key in ((3, 0x7FFFFFFF), (2, 0xFFFFFFFF)):
        other = PhiloxNormal(other_key).randn((20, 3, 5), cpu, torch.float64)
        assert not torch.isclose(other, ref).any()
    far = PhiloxNormal(key, sample_offset=2**40 + 3).randn((2, 15), cpu, torch.float64)
    near = PhiloxNormal(key, sample_offset=3).randn((2, 15), cpu, torch.float64)
    assert torch.isfinite(far).all() and not torch.allclose(far, near)


def test_chunked_sampling_with_offsets_equals_one_batch() -> None:
    sde = VPSDE()
    sampler = EulerMaruyamaSampler(sde, num_steps=20)

    def score(x, t):
        return -x

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(11)

    kw = dict(batch_invariant=True, dtype=torch.float64)
    whole = sampler.sample(score, (12, 2), generator=gen(), **kw)
    chunks = [
        sampler.sample(score, (n, 2), generator=gen(), sample_offset=lo, **kw)
        for lo, n in ((0, 5), (5, 4), (9, 3))
    ]
    assert torch.equal(torch.cat(chunks), whole)
    with pytest.raises(ValueError, match="sample_offset=3 needs batch_invariant=True"):
        sampler.sample(score, (2, 2), generator=gen(), sample_offset=3)
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        sampler.sample(score, (2, 2), generator=gen(), batch_invariant="yes")


# --- the normals against a slow reference, and the compiled CPU path ------------------------


def _reference_normals(
    key: tuple[int, int], offset: int, shape: tuple[int, int], draw: int, dtype: torch.dtype
) -> torch.Tensor:
    """The documented layout, one Python-int Philox block at a time: sample s, draw d, block j
    has counter (j, d, s mod 2^32, s div 2^32); float64 takes 53-bit uniforms from words
    (w0, w1) and (w2, w3) and gives (r cos, r sin) of one Box-Muller pair; other dtypes take
    float32 uniforms from single words and give (r1 cos, r2 cos, r1 sin, r2 sin) of the pairs
    (w0, w1), (w2, w3). Box-Muller in torch, element by element in one flat tensor."""
    b, d = shape
    wide = dtype == torch.float64
    per_block = 2 if wide else 4
    blocks = -(-d // per_block)
    u1, u2 = [], []
    for i in range(b):
        s = offset + i
        for j in range(blocks):
            w = _reference((j, draw, s & MASK, s >> 32), key)
            if wide:
                u1.append(((w[0] << 21) | (w[1] >> 11)) + 1)
                u2.append((w[2] << 21) | (w[3] >> 11))
            else:
                u1 += [w[0], w[2]]
                u2 += [w[1], w[3]]
    if wide:  # exact: integers below 2^53 + 1 times a power of two
        v1 = torch.tensor(u1, dtype=torch.float64) * 2.0**-53
        v2 = torch.tensor(u2, dtype=torch.float64) * 2.0**-53
    else:  # each word rounded once to float32, then float32 arithmetic
        v1 = (torch.tensor(u1, dtype=torch.int64).to(torch.float32) + 1.0) * 2.0**-32
        v2 = torch.tensor(u2, dtype=torch.int64).to(torch.float32) * 2.0**-32
    r = torch.sqrt(torch.log(v1) * -2.0)
    theta = v2 * (2.0 * math.pi)
    cos, sin = r * torch.cos(theta), r * torch.sin(theta)
    if wide:
        z = torch.stack([cos, sin], dim=1)  # [blocks * b, 2]
    else:
        z = torch.stack([cos[0::2], cos[1::2], sin[0::2], sin[1::2]], dim=1)
    return z.reshape(b, blocks * per_block)[:, :d].to(dtype)


@pytest.mark.parametrize("native", [True, False])
def test_normals_match_the_reference_across_32_bit_wraps(native) -> None:
    cpu = torch.device("cpu")
    rng = random.Random(5)
    keys = [(rng.getrandbits(32), rng.getrandbits(32)), (MASK, MASK)]
    # sample indices crossing 2^32 (its low word wraps, its high word counts) and the last
    # draw numbers before 2^32
    for key, offset, draw in ((keys[0], 2**32 - 3, 7), (keys[1], 2**40 - 2, 2**32 - 2)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for shape in ((6, 1), (5, 2), (4, 7), (3, 9)):
                noise = PhiloxNormal(key, sample_offset=offset)
                noise.use_native = native
                got = noise.normals(shape, cpu, dtype, first_draw=draw)[0]
                want = _reference_normals(key, offset, shape, draw, dtype)
                assert torch.equal(got, want), (key, offset, draw, dtype, shape)


def test_philox4x32_at_the_wraparound_words() -> None:
    words = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, MASK)
    rng = random.Random(9)
    counters = [tuple(rng.choice(words) for _ in range(4)) for _ in range(300)]
    for key in ((MASK, MASK), (0x80000000, 0x7FFFFFFF), (0, 0)):
        out = philox4x32(torch.tensor(counters, dtype=torch.int64).T, key)
        assert [tuple(col) for col in out.T.tolist()] == [_reference(c, key) for c in counters]


def test_compiled_path_gives_the_eager_values_in_every_layout() -> None:
    # Identical values with and without the compiled CPU code (if this machine cannot build
    # it, both sides are eager and the test still checks the cached multi-draw path).
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float64, torch.float16):
        for shape in ((10_000, 2), (257, 3), (33, 8, 3), (5, 1)):
            compiled, eager = (
                PhiloxNormal((11, 12), 2**32 - 100),
                PhiloxNormal((11, 12), 2**32 - 100),
            )
            eager.use_native = False
            for _ in range(3):  # single draws and one multi-draw fill
                assert torch.equal(
                    compiled.randn(shape, cpu, dtype), eager.randn(shape, cpu, dtype)
                )
            many = compiled.normals(shape, cpu, dtype, first_draw=2**32 - 4, num_draws=4)
            for k in range(4):
                one = eager.normals(shape, cpu, dtype, first_draw=2**32 - 4 + k)[0]
                assert torch.equal(many[k], one)


def test_a_compiled_path_that_disagrees_is_not_used(monkeypatch) -> None:
    import scoresde.samplers.philox as philox

    def wrong(*args) -> None:  # leaves the uniforms as they were: never the eager values
        return None

    # switched off by the environment, nothing is built or loaded
    with monkeypatch.context() as m:
        m.setenv("SCORESDE_NATIVE_PHILOX", "0")
        assert philox._philox_native.load() is None
    monkeypatch.setattr(philox, "_NATIVE", philox._UNSET)
    monkeypatch.setattr(philox._philox_native, "load", lambda: wrong)
    assert philox._native_uniforms() is None
    noise = PhiloxNormal((1, 2))
    eager = PhiloxNormal((1, 2))
    eager.use_native = False
    cpu = torch.device("cpu")
    assert torch.equal(
        noise.randn((50, 2), cpu, torch.float32), eager.randn((50, 2), cpu, torch.float32)
    )


def test_float32_uniforms_without_unsigned_dtypes(monkeypatch) -> None:
    # torch < 2.3 has no uint32: the words are then masked int64, with the same values.
    import scoresde.samplers.philox as philox

    cpu = torch.device("cpu")
    monkeypatch.setattr(philox, "_UINT32", None)
    noise = PhiloxNormal((3, 4), sample_offset=2**32 - 2)
    noise.use_native = False
    got = noise.normals((5, 6), cpu, torch.float32, first_draw=1)[0]
    assert torch.equal(got, _reference_normals((3, 4), 2**32 - 2, (5, 6), 1, torch.float32))
