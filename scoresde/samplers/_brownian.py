"""Per-sample Brownian paths fixed before any query: a virtual Brownian tree (private; used by
`AdaptiveSDESampler`).

An adaptive reverse-time solver moves every sample i from t = T down to eps and asks for
W_i at its next time q < t_i; the step is then accepted (t_i <- q) or rejected (q is tried
again closer to t_i). Each path W_i on [0, T] is a pure function of (key, sample index, time)
(Gaines & Lyons 1997; Li et al. 2020's virtual Brownian tree): W(0) = 0, W(T) = sqrt(T) z_0,
and the midpoint of every dyadic interval [a, b] of the tree, down to `depth` levels, is the
Brownian bridge value

    W((a + b) / 2) = (W(a) + W(b)) / 2 + sqrt((b - a) / 4) z_node,

with z_node a standard normal of its own Philox-4x32-10 stream, counter (entry block, node,
sample index). A query descends from the root to the finest interval holding q and returns
the bridge mean there (linear interpolation: off by a N(0, <= 2^-depth T / 4) term, 1.5e-5
for T = 1 at depth 30).

Why a fixed path rather than values drawn as the queries arrive:
- Rejections cannot bias it. Redrawing the noise after a rejection (Jolicoeur-Martineau et
  al. 2021) accepts preferentially the draws that make the error small (std ~1.26 instead of
  1 on N(0, I) data in 2-D); here W(q) is the same whatever was accepted or rejected.
- The sample is a continuous function of the solver's decisions: two runs that take other
  steps (another tolerance, or a network that rounds differently in the last bit for another
  batch size and so flips one accept/reject decision) integrate the same path and end near
  each other, within the solver's error, instead of continuing on other draws.
- Batch invariance: sample i's path depends on its global index, never on the batch.

Cost: one Philox call for the depth + 1 normals of every entry of the queried samples, and a
descent of `depth` short elementwise steps, per query (one query per solver iteration).
"""

from __future__ import annotations

import math

import torch

from scoresde._typing import Tensor
from scoresde.samplers.philox import _MASK, _round_keys, _Rounds, check_philox, derive_key

# The Brownian trees' key family (derived from the run's key: "BRWN").
_DOMAIN = 0x4252574E


def _take(a: Tensor, idx: Tensor | None) -> Tensor:
    return a if idx is None else a[idx]


def _put(a: Tensor, idx: Tensor | None, value: Tensor) -> Tensor:
    """a[idx] = value (or a = value for idx None); returns the updated tensor."""
    if idx is None:
        return value
    a[idx] = value
    return a


class BrownianTree:
    """W_i(t), t in [0, T], for B samples of D entries each (module docstring).

    Args:
        key: the run's 64-bit Philox key (two 32-bit words); the tree uses a key derived
            from it, so its normals are none of the run's other noise.
        samples: the global index of each sample `[B]` (int64; a run's `sample_offset` + i).
        dim: D; T: the end of the time interval; depth: levels of the tree (<= 31).
        device, dtype: of the values W (the tree is computed in float64).
    """

    def __init__(
        self,
        key: tuple[int, int],
        samples: Tensor,
        dim: int,
        T: float,
        *,
        depth: int = 30,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if not 1 <= depth <= 31:
            raise ValueError(f"depth must be in [1, 31], got {depth!r}")
        check_philox(device)
        self.key = derive_key(key, _DOMAIN)
        self.samples = samples.to(device=device, dtype=torch.int64)
        self.dim, self.T, self.depth = int(dim), float(T), int(depth)
        self.device, self.dtype = torch.device(device), dtype
        # Normals per Philox block: two from 53-bit uniforms for float64 values, four from
        # 32-bit uniforms otherwise (the descent itself runs in float64 either way).
        self.per_block = 2 if dtype == torch.float64 else 4
        self.blocks = -(-self.dim // self.per_block)
        self._keys = _round_keys(self.key, self.device)
        # Level l of the descent (1..depth) halves intervals of length T 2^-(l-1): the
        # bridge standard deviations sqrt(length / 4), and the 2^(l-1) node-number offsets.
        self._std = [math.sqrt(self.T * 2.0 ** -(level + 1)) for level in range(1, depth + 1)]
        self._first_node = 2 ** torch.arange(self.depth, device=self.device)

    def query(self, idx: Tensor | None, q: Tensor) -> Tensor:
        """W(q) `[b, D]` for the samples idx `[b]` (None: all) at times q `[b]` (float64,
        in [0, T])."""
        samples = _take(self.samples, idx)
        b, n = samples.shape[0], self.depth
        u = (q.to(torch.float64) / self.T).clamp(0.0, 1.0)
        # k[:, l]: index of the interval of level l (length 2^-l) holding u, l = 0..depth;
        # u = 1 belongs to the last one. Exact in float64: the scalings are powers of two.
        scale = 2.0 ** torch.arange(n + 1, dtype=torch.float64, device=q.device)
        k = torch.minimum((u[:, None] * scale).floor(), scale - 1).to(torch.int64)
        # Node numbers: 0 for W(T), 2^(l-1) + k[:, l-1] for the midpoint drawn at level l.
        nodes = torch.cat([k.new_zeros(b, 1), self._first_node + k[:, :n]], dim=1)  # [b, n+1]
        z = self._normals(samples, nodes)  # [n+1, b, D]
        w_lo = torch.zeros(b, self.dim, dtype=torch.float64, device=q.device)
        w_hi = z[0] * math.sqrt(self.T)
        right = (k[:, 1:] - 2 * k[:, :n]).bool()  # [b, n]: the half holding u at level l
        for level in range(n):
            mid = torch.add(w_lo, w_hi).mul_(0.5).add_(z[level + 1], alpha=self._std[level])
            go_right = right[:, level, None]
            w_lo = torch.where(go_right, mid, w_lo)
            w_hi = torch.where(go_right, w_hi, mid)
        frac = u * scale[n] - k[:, n]  # position in the finest interval, in [0, 1]
        return torch.lerp(w_lo, w_hi, frac[:, None]).to(self.dtype)

    def _normals(self, samples: Tensor, nodes: Tensor) -> Tensor:
        """Standard normals `[m, b, D]` (float64) of each sample's nodes `[b, m]`: Philox
        counter (block, node, sample mod 2^32, sample div 2^32) under the tree's key, then
        Box-Muller on pairs of uniforms (53-bit for float64 values, else 32-bit)."""
        b, m = nodes.shape
        shape = (m, b, self.blocks)
        # The counter as Philox's two packed lanes (`philox._Rounds`): (block << 32) | node
        # and (sample mod 2^32) << 32 | (sample div 2^32).
        rounds = _Rounds(m * b * self.blocks, nodes.device)
        blocks = torch.arange(self.blocks, device=nodes.device) << 32
        torch.bitwise_or(blocks, nodes.t()[:, :, None], out=rounds.y[0].view(shape))
        lane_b = ((samples & _MASK) << 32) | (samples >> 32)
        rounds.y[1].view(shape).copy_(lane_b[None, :, None].expand(shape))
        y = rounds.run(self._keys)  # [2, n]: (w0 << 32 | w1), (w2 << 32 | w3)
        hi, lo = (y >> 32) & _MASK, y & _MASK
        if self.per_block == 2:  # u = (w_even >> 5, w_odd >> 6) as 53 bits, per lane
            top = ((hi >> 5) << 26 | (lo >> 6)).to(torch.float64) * 2.0**-53
            u1, u2 = 1.0 - top[0], top[1]  # u1 in (0, 1]: a finite log
        else:  # four 32-bit uniforms: (w0, w1) and (w2, w3) pairs
            u1 = 1.0 - hi.to(torch.float64) * 2.0**-32
            u2 = lo.to(torch.float64) * 2.0**-32
        r = (-2.0 * u1.log()).sqrt()
        theta = (2.0 * math.pi) * u2
        z = torch.stack([r * theta.cos(), r * theta.sin()], dim=-1)  # [lanes, n, 2]
        if self.per_block == 4:
            z = z.permute(1, 0, 2)  # [n, lane, 2]: 4 normals per block
        return z.reshape(m, b, self.per_block * self.blocks)[..., : self.dim]
