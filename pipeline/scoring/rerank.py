"""Final lists: greedy N-pick-1 under per-item traffic caps, for all requests at once.

Candidates are laid out as a [requests, candidates] matrix in score order (ties broken by item, so
the result never depends on input row order). The greedy then runs slot by slot over every request
together: each slot is a handful of whole-matrix numpy operations, never a per-request Python loop.

Caps make requests depend on each other (what request i shows uses up budget for request i+1), so
they are solved as a fixed point on "exhaustion points": e[item] = the first request (in time order)
that may no longer show the item. Given e, requests are independent; from the resulting lists, e is
recomputed as one past the request holding the item's budget-th placement. If the lists of requests
before m are right, this e is right for request m, so each round fixes at least one more request and
the fixed point is exactly the sequential, request-by-request result. Each round re-ranks only the
requests whose availability changed, which in practice is a few rounds over a small share of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtrank.pipeline.scoring.config import WindowRule
from mtrank.pipeline.scoring.fate import Fate

_PAD = -2          # attribute code of padding cells
_NONE = -1         # "nothing placed in this row at this slot": matches no attribute code
_BIG = np.iinfo(np.int32).max


@dataclass
class Ranking:
    rank: np.ndarray   # int32 per candidate: 1-based slot, 0 = not shown
    flags: np.ndarray  # int16 Fate bits: CAPPED, WINDOW_DEFERRED, WINDOW_RELAXED, CUT
    cap_rounds: int    # re-ranking rounds the caps needed (0 without caps)
    listing: np.ndarray  # row indices: requests in serving order, shown by rank, then the rest by score


class _OneValue:
    """Window counts for one attribute value per cell: cnt[r, c] = window items sharing cell c's value."""

    def __init__(self, attr: np.ndarray):
        self.attr = attr
        self.cnt = np.zeros(attr.shape, dtype=np.int8)
        self.buf = np.empty(attr.shape[0], dtype=attr.dtype)

    def full(self, k: int) -> np.ndarray:
        return self.cnt >= k

    def add(self, r: np.ndarray, j: np.ndarray, sign: int) -> None:
        self.buf.fill(_NONE)
        self.buf[r] = self.attr[r, j]
        if sign > 0:
            self.cnt += self.attr == self.buf[:, None]
        else:
            self.cnt -= self.attr == self.buf[:, None]


class _ValueSets:
    """Window counts for a set of values per cell (a list attribute: genres, tags): a cell is full when
    any of its values is held by k window items. Values are numbered per request (`local_sets`), so the
    counts are [requests, values of the widest request]; -1 (no value) counts into a sink column kept 0."""

    def __init__(self, sets: np.ndarray):
        b, c, width = sets.shape
        self.shape = (b, c, width)
        self.sink = int(sets.max()) + 1 if sets.size else 0
        self.sets = np.where(sets < 0, self.sink, sets)
        self.flat = self.sets.reshape(b, c * width)
        self.cnt = np.zeros((b, self.sink + 1), dtype=np.int16)

    def full(self, k: int) -> np.ndarray:
        return (np.take_along_axis(self.cnt, self.flat, axis=1) >= k).reshape(self.shape).any(axis=2)

    def add(self, r: np.ndarray, j: np.ndarray, sign: int) -> None:
        np.add.at(self.cnt, (r[:, None], self.sets[r, j]), sign)
        self.cnt[:, self.sink] = 0


def local_sets(sets: np.ndarray) -> np.ndarray:
    """[requests, candidates, L] value codes (-1 = none) renumbered 0.. within each request, each value
    once per cell: the window counts then need one column per value a request holds, not per value
    of the whole day."""
    b = sets.shape[0]
    sets = np.sort(sets, axis=2)
    sets[..., 1:][sets[..., 1:] == sets[..., :-1]] = -1   # a value listed twice counts once
    valid = sets >= 0
    out = np.full(sets.shape, -1, dtype=np.int64)
    if not valid.any():
        return out
    width = int(sets.max()) + 1
    key = (np.broadcast_to(np.arange(b, dtype=np.int64)[:, None, None], sets.shape) * width + sets)[valid]
    uniq, inv = np.unique(key, return_inverse=True)
    row_of = uniq // width
    first = np.searchsorted(row_of, np.arange(b))
    out[valid] = inv - first[row_of[inv]]
    return out


def _greedy(attr: np.ndarray | None, avail: np.ndarray, n: int, k: int, slots: int,
            relax: bool) -> tuple[np.ndarray, np.ndarray]:
    """(slot, relaxed) per cell; slot -1 = not placed. `avail` is consumed. `attr`: [b, c] codes, or
    [b, c, L] per-request value sets (`local_sets`) for a list attribute."""
    b, c = avail.shape
    slots = min(slots, c)
    if attr is None or n <= 1:  # no window: the first `slots` available cells in score order
        slot = np.cumsum(avail, axis=1, dtype=np.int32) - 1
        slot[~avail | (slot >= slots)] = -1
        return slot, np.zeros((b, c), dtype=bool)
    slot = np.full((b, c), -1, dtype=np.int32)
    relaxed = np.zeros((b, c), dtype=bool)
    window = _ValueSets(attr) if attr.ndim == 3 else _OneValue(attr)
    hist = np.full((b, slots), -1, dtype=np.int64)  # column placed at each slot
    rows = np.arange(b)
    live = avail.any(axis=1)
    for t in range(slots):
        if not live.any():
            break
        feasible = avail & ~window.full(k)
        j = feasible.argmax(axis=1)
        ok = feasible[rows, j] & live
        if relax:
            stuck = live & ~ok
            if stuck.any():
                j = np.where(stuck, avail.argmax(axis=1), j)
                relaxed[rows[stuck], j[stuck]] = True
                ok |= stuck
        ended = live & ~ok
        if ended.any():  # fallback "end": this request's list stops here
            avail[ended] = False
        r, jj = rows[ok], j[ok]
        slot[r, jj] = t
        avail[r, jj] = False
        hist[r, t] = jj
        window.add(r, jj, +1)
        if t >= n - 1:  # the item placed n-1 slots ago leaves the window of the next slot
            old = hist[:, t - n + 1]
            v = old >= 0
            window.add(rows[v], old[v], -1)
        live = ok & avail.any(axis=1)
    return slot, relaxed


def _exhaustion(slot: np.ndarray, item_m: np.ndarray, contested: np.ndarray, budget: np.ndarray,
                base: np.ndarray) -> np.ndarray:
    """e[item]: one past the request of the item's budget-th placement (contested items only)."""
    e = base.copy()
    pr, pc = np.nonzero((slot >= 0) & contested[item_m])
    if len(pr) == 0:
        return e
    items = item_m[pr, pc]
    o = np.lexsort((pr, items))
    items, req = items[o], pr[o]
    first = np.r_[True, items[1:] != items[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(items)), 0))
    hit = (np.arange(len(items)) - start) == budget[items] - 1
    e[items[hit]] = req[hit] + 1
    return e


def rerank(request: np.ndarray, score: np.ndarray, item: np.ndarray, *, eligible: np.ndarray,
           window: WindowRule | None = None, attribute: np.ndarray | None = None,
           budget: np.ndarray | None = None, list_size: int | None = None) -> Ranking:
    """Rank every request's candidates.

    request: int codes 0..R-1, in the order requests are served (time order): earlier requests use
        cap budget first. item: int codes 0..I-1 ordered like the item ids (the tie-break).
    attribute: int codes >= 0 for the window rule, -1 for null (a null shares nothing); or [rows, L]
        codes for a list attribute (-1 pads): an item fits while none of its values is held by k window items.
    budget: per item code, exposures still allowed today (None = uncapped).
    """
    n = len(request)
    n_req = int(request.max()) + 1 if n else 0
    n_item = int(item.max()) + 1 if n else 0
    # group by request with items ascending (one int64 sort), then a stable per-row sort by score:
    # ties keep item order. Far cheaper than a 3-key lexsort over all rows.
    grouped = np.argsort(request.astype(np.int64) * n_item + item, kind="stable")
    sizes = np.bincount(request, minlength=n_req)
    width = int(sizes.max()) if n else 0
    starts = np.cumsum(sizes) - sizes
    req_sorted = request[grouped]
    flat = req_sorted * width + (np.arange(n) - starts[req_sorted])
    idx = np.full(n_req * width, -1, dtype=np.int64)
    idx[flat] = grouped
    idx = idx.reshape(n_req, width)
    neg = np.full(idx.shape, np.inf)
    neg[idx >= 0] = -score[idx[idx >= 0]]
    idx = np.take_along_axis(idx, np.argsort(neg, axis=1, kind="stable"), axis=1)
    real = idx >= 0
    safe = np.where(real, idx, 0)
    elig = eligible[safe] & real
    use_window = window is not None and window.enabled and window.n > 1 and attribute is not None
    attr = None
    if use_window and attribute.ndim == 2:   # several values per candidate: [rows, L], -1 = none
        attr = local_sets(np.where(real[:, :, None], attribute[safe], -1))
        wn, wk, relax = window.n, window.k, window.fallback == "relax"
    elif use_window:
        attr = attribute[safe].astype(np.int64)
        null = attr < 0
        attr[null] = -3 - np.flatnonzero(null.ravel())  # unique per cell: equal to nothing else
        attr[~real] = _PAD
        wn, wk, relax = window.n, window.k, window.fallback == "relax"
    else:
        wn, wk, relax = 1, 1, False
    slots = width if list_size is None else list_size
    rows = np.arange(n_req)[:, None]

    rounds = 0
    if budget is None:
        avail = elig
        slot, relaxed = _greedy(attr, elig.copy(), wn, wk, slots, relax)
    else:
        budget = np.asarray(budget, dtype=np.int64)
        item_m = item[safe]
        demand = np.bincount(item[eligible], minlength=len(budget))
        contested = budget < demand
        base = np.where(budget <= 0, 0, n_req).astype(np.int64)
        e = base
        avail = elig & (rows < e[item_m])
        slot, relaxed = _greedy(attr, avail.copy(), wn, wk, slots, relax)
        while True:
            e_new = _exhaustion(slot, item_m, contested, budget, base)
            changed = e_new != e
            if not changed.any():
                break
            rounds += 1
            lo, hi = np.minimum(e, e_new), np.maximum(e, e_new)
            gained = (e_new > e)[item_m]
            touched = (changed[item_m] & elig & (rows >= lo[item_m]) & (rows < hi[item_m])
                       & (gained | (slot >= 0)))  # losing an item it did not show changes nothing
            redo = np.flatnonzero(touched.any(axis=1))
            e = e_new
            sub_avail = elig[redo] & (redo[:, None] < e[item_m[redo]])
            s, rl = _greedy(None if attr is None else attr[redo], sub_avail.copy(), wn, wk, slots, relax)
            slot[redo], relaxed[redo] = s, rl
        avail = elig & (rows < e[item_m])  # also for requests whose list the change did not touch

    flags = np.zeros((n_req, width), dtype=np.int16)
    flags[elig & ~avail] |= int(Fate.CAPPED)
    placed = slot >= 0
    pos = np.where(placed, slot, _BIG)
    # passed over: some lower-scored item (to the right) was placed before it
    later_min = np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1]
    later_min = np.concatenate([later_min[:, 1:], np.full((n_req, 1), _BIG, dtype=pos.dtype)], axis=1)
    deferred = avail & (later_min < pos)
    full = placed.sum(axis=1) >= min(slots, width)
    left = avail & ~placed & ~deferred
    deferred |= left & ~full[:, None]      # the list ended early: window fallback "end"
    flags[deferred] |= int(Fate.WINDOW_DEFERRED)
    flags[relaxed] |= int(Fate.WINDOW_RELAXED)
    flags[left & full[:, None]] |= int(Fate.CUT)

    rank = np.zeros(n, dtype=np.int32)
    out_flags = np.zeros(n, dtype=np.int16)
    rank[idx[real]] = slot[real] + 1
    out_flags[idx[real]] = flags[real]
    # listing order: requests as served; shown items by slot, then the rest by score; padding last
    cols = np.arange(width)
    key = np.where(placed, slot, np.where(real, width + cols, 2 * width + cols))
    listing = np.take_along_axis(idx, np.argsort(key, axis=1), axis=1)
    return Ranking(rank, out_flags, rounds, listing[listing >= 0])
