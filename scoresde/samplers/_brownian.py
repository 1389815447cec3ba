"""Per-sample Brownian paths revealed one query at a time, with memory of rejected steps
(private; used by `AdaptiveSDESampler`).

An adaptive reverse-time solver moves every sample i from t = T down to eps and asks for
W_i at its next time q < t_i; the step is then accepted (t_i <- q) or rejected (q is tried
again closer to t_i). The path is a Brownian motion in reverse time, W_i(T) = 0, sampled
lazily: each query value is drawn from its exact conditional law given every value revealed
so far (Rackauckas & Nie 2017, "rejection sampling with memory"). A rejected query's value
is stored, never redrawn: redrawing it (as in Jolicoeur-Martineau et al. 2021) accepts
preferentially the draws that make the error small and biases the samples.

Future queries are all below the current time t_i, so by the Markov property only W_i(t_i)
and the revealed points below t_i matter: the rejected query times r < t_i (a few per
sample). For a query q with the nearest revealed points u >= q (t_i if none) and l < q:

    W(q) = W(u) + (u - q) / (u - l) (W(l) - W(u)) + sqrt((u - q)(q - l) / (u - l)) z

(a Brownian bridge), or W(q) = W(u) + sqrt(u - q) z when nothing is revealed below q
(l = -inf makes the bridge formula reduce to this). q = u returns W(u) exactly.

z comes from the caller (the sampler's `ctx.randn_like`, so the generator and the
batch-invariant per-sample streams apply). One normal per element per query, O(1) work:
no tree descent, no resolution limit.
"""

from __future__ import annotations

import torch

from scoresde._typing import Tensor


def _take(a: Tensor, idx: Tensor | None) -> Tensor:
    return a if idx is None else a[idx]


def _put(a: Tensor, idx: Tensor | None, value: Tensor) -> Tensor:
    """a[idx] = value (or a = value for idx None); returns the updated tensor."""
    if idx is None:
        return value
    a[idx] = value
    return a


class BrownianMemory:
    """W_i(t) for B samples of D elements each, revealed at decreasing accepted times.

    State: `w` `[B, D]`, W at each sample's current time (0 at the start, t = T), and a
    per-sample stack of the revealed points below it, in increasing time: `times` `[B, K]`
    (-inf past the top), `values` `[B, K, D]` and the stack sizes `size` `[B]`. A query
    above the top (the usual case) and a rejection pushed on the top cost O(1) per sample;
    only a query that jumps over revealed points needs the rows shifted (those rows only).
    K follows the largest stack.

    Args:
        batch, dim: B and D; device, dtype: of the values (times are float64).
    """

    def __init__(self, batch: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> None:
        self.w = torch.zeros(batch, dim, device=device, dtype=dtype)
        self.times = torch.empty(batch, 0, device=device, dtype=torch.float64)
        self.values = torch.empty(batch, 0, dim, device=device, dtype=dtype)
        self.size = torch.zeros(batch, device=device, dtype=torch.int64)
        self.rows = torch.arange(batch, device=device)
        self._above: Tensor | None = None  # per queried sample: revealed points >= q

    def query(self, idx: Tensor | None, t: Tensor, q: Tensor, z: Tensor) -> Tensor:
        """W(q) `[b, D]` for the samples idx `[b]` (None: all) at current times t `[b]` and
        query times q <= t `[b]` (float64), from standard normals z `[b, D]`."""
        w_t = _take(self.w, idx)
        if self.times.shape[1] == 0:  # nothing revealed below t: a free Brownian step
            self._above = None
            return torch.addcmul(w_t, (t - q).sqrt().to(z.dtype)[:, None], z)
        rt = _take(self.times, idx)  # [b, K]
        size = _take(self.size, idx)
        rows = _take(self.rows, idx)
        above = (rt >= q[:, None]).sum(dim=1)  # the top `above` points are >= q
        last = self.times.shape[1] - 1
        # The nearest revealed points: u >= q at position size - above (if above > 0, else
        # u = t) and l < q just below it (if any, else l = -inf: a free step below u).
        up = (size - above).clamp_(max=last)
        lo = (size - above - 1).clamp_(min=0)
        has_up = above > 0
        has_lo = size > above
        u = torch.where(has_up, rt.gather(1, up[:, None])[:, 0], t)
        lo_t = torch.where(has_lo, rt.gather(1, lo[:, None])[:, 0], -torch.inf)
        w_u = torch.where(has_up[:, None], self.values[rows, up], w_t)
        w_l = self.values[rows, lo]
        pull = (u - q) / (u - lo_t)  # (u - q) / (u - l), 0 when l = -inf
        std = ((u - q) * (1.0 - pull)).clamp_(min=0.0).sqrt()
        mean = torch.lerp(w_u, w_l, pull.to(z.dtype)[:, None])
        self._above = above
        return torch.addcmul(mean, std.to(z.dtype)[:, None], z)

    def commit(self, idx: Tensor | None, q: Tensor, w_q: Tensor, accept: Tensor) -> None:
        """Record the outcome of the last `query` (same idx, q; W(q) `[b, D]`): an accepted
        sample moves to q and pops the revealed points >= q (no later query reaches them);
        a rejected one inserts (q, W(q)) below them."""
        self.w = _put(self.w, idx, torch.where(accept[:, None], w_q, _take(self.w, idx)))
        rejected = ~accept
        above = self._above
        if above is None:
            if not bool(rejected.any()):
                return
            above = torch.zeros_like(q, dtype=torch.int64)
        size = _take(self.size, idx)
        rows = _take(self.rows, idx)
        new_size = torch.where(accept, size - above, size + 1)
        self.size = _put(self.size, idx, new_size)
        self._resize(int(self.size.max()))
        if self.times.shape[1] == 0:
            return
        jumped = above > 0
        # Accepted past revealed points: clear the popped slots (queries count times >= q).
        popped = torch.nonzero(accept & jumped).squeeze(1)
        if popped.numel() > 0:
            r = rows[popped]
            keep = self._slots < new_size[popped, None]
            self.times[r] = torch.where(keep, self.times[r], -torch.inf)
        # Rejected below the top: shift the points >= q up one slot (those rows only).
        shift = torch.nonzero(rejected & jumped).squeeze(1)
        if shift.numel() > 0:
            r, pos = rows[shift], (size - above)[shift, None]
            src = torch.where(self._slots > pos, self._slots - 1, self._slots)
            self.times[r] = self.times[r].gather(1, src)
            self.values[r] = self.values[r].gather(1, src[:, :, None].expand(-1, -1, w_q.shape[1]))
        ins = torch.nonzero(rejected).squeeze(1)
        if ins.numel() > 0:
            r, pos = rows[ins], (size - above)[ins]
            self.times[r, pos] = q[ins]
            self.values[r, pos] = w_q[ins]

    def _resize(self, k: int) -> None:
        """K >= the largest stack k: one more slot when full, k slots when k is at most
        half of K (0: the free fast path), so the per-query [b, K] work stays small."""
        b, k_old, d = self.values.shape
        if k > k_old:
            self.times = torch.cat([self.times, self.times.new_full((b, 1), -torch.inf)], dim=1)
            self.values = torch.cat([self.values, self.values.new_zeros(b, 1, d)], dim=1)
        elif k == 0 or 2 * k <= k_old:  # slots past every stack's top hold nothing; not
            # shrunk on every pop, so the buffers are not re-allocated at every step
            self.times = self.times[:, :k].contiguous()
            self.values = self.values[:, :k].contiguous()
        if self.times.shape[1] != k_old:
            self._slots = torch.arange(k, device=self.times.device)
