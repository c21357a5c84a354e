"""The sorted O(C log C) path of ``functional.recalibrated_affine`` in NumPy, for CPU tensors.

The same algorithm and the same exact kept-set rule as the torch implementation in ``functional``
(read the comment block there); NumPy's per-call overhead is a few times smaller than torch's on
CPU, which is what a layer of a few hundred channels pays. float64 throughout. Differences to the
torch version: the queries of the searchsorted are sorted first on large segments (a merge beats
random look-ups there: ``SORTED_QUERIES_FROM``), and the decay table is built from the consecutive
gaps by products (one exp per channel instead of one per table entry). Tests compare both
implementations with the dense float64 oracle. The exact kept-set rule itself (TwoSum mirror point,
interval ends) and the scan are one code for both: ``functional._mirror_point``,
``functional._split_and_ends`` and ``functional._laplace_scan_`` work on arrays as on tensors. This
module is a second implementation for speed, not an independent oracle (the tests' oracle is the
dense formula).

**Segments.** Every function here works on the channels of several layers at once, concatenated
into flat arrays of length N: layer k owns the segment [offsets[k], offsets[k + 1]) and its
correlation never leaves it. The sort, the tie groups and the searchsorted are done per segment;
the scans run over the whole flat array, with a decay of exactly 0 at every segment start (in
both directions), so that no sum crosses a segment boundary; every clamp and boundary test uses
the row's own segment bounds instead of 0 and C. One layer is the one-segment case. A sum that
would cross a boundary adds exact zeros, so a layer's results are bit-identical whether it is
computed alone or with others (``norms.batched`` does the latter: one call per network forward,
which removes the per-layer call overhead that dominates at the channel counts of real networks).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from nnunet_acnorm.norms.functional import _laplace_scan_, _mirror_point, _split_and_ends


#: segments of at least this many channels sort their queries before the searchsorted (a merge):
#: where sorting first pays for itself (measured: docs/performance.md, "Constants of the sorted path")
SORTED_QUERIES_FROM = 2048


class SourceLayout(NamedTuple):
    """What depends on the source indicators and tau alone (reusable while the source is frozen)."""

    y: np.ndarray          # the source indicators sorted within each segment
    order: np.ndarray      # sorted position -> channel
    rank: np.ndarray       # channel -> sorted position
    start: np.ndarray      # per sorted position: first position of its tie group
    end: np.ndarray        # ... and one past its last
    table: np.ndarray      # the decay table of the two scans (2, steps, N)
    offsets: tuple         # segment starts and N
    seg_lo: object         # per channel: its segment's first position (an int for one segment)
    seg_hi: object         # ... and one past its last
    lo2: object            # seg_lo and seg_hi twice over, for the queries (targets, mirror points)
    hi2: object
    memo: dict             # filled by the first call that uses the layout: "ones", the two scans of
    #                        w = 1 (2, N) that the normalisers need (a function of the source alone);
    #                        "below", kept_intervals' last search results (the next call's first guess)


def source_layout(ys: np.ndarray, tau, offsets=None) -> SourceLayout:
    """The :class:`SourceLayout` of the source indicators ``ys`` (N,) and ``tau``.

    ``tau``: a float, or one value per channel (N,) constant within each segment. ``offsets``:
    the segment starts and N (n + 1 ascending ints); default one segment [0, N)."""
    n = ys.size
    if offsets is None:
        offsets = (0, n)
        order = np.argsort(ys)  # the order within a tie group does not matter: intervals end at group bounds
        seg_lo, seg_hi = 0, n
        twice = (0, n)
    else:
        offsets = tuple(int(o) for o in offsets)
        order = np.empty(n, dtype=np.int64)
        for lo, hi in zip(offsets[:-1], offsets[1:]):
            order[lo:hi] = np.argsort(ys[lo:hi]) + lo
        sizes = np.diff(offsets)
        seg_lo = np.repeat(np.asarray(offsets[:-1], dtype=np.int64), sizes)
        seg_hi = np.repeat(np.asarray(offsets[1:], dtype=np.int64), sizes)
        twice = (np.concatenate((seg_lo, seg_lo)), np.concatenate((seg_hi, seg_hi)))   # for (targets, mirrors)
    y = ys[order]
    arange = np.arange(n)
    rank = np.empty_like(order)
    rank[order] = arange
    differs = y[1:] != y[:-1]                         # position k + 1 starts a tie group
    differs[[o - 1 for o in offsets[1:-1]]] = True    # ... and so does every segment
    start = np.maximum.accumulate(np.where(np.concatenate(([True], differs)), arange, 0))
    end = np.minimum.accumulate(np.where(np.concatenate((differs, [True])), arange + 1, n)[::-1])[::-1]
    table = _decay_table(np.stack((y, -y[::-1])), tau, offsets)
    return SourceLayout(y, order, rank, start, end, table, offsets, seg_lo, seg_hi, *twice, {})


def kept_intervals(ys: np.ndarray, yt: np.ndarray, layout: tuple | None = None):
    """(y, order, rank, q, low, high) as functional._kept_intervals (``layout``: source_layout(ys, .)).
    The layout keeps this call's search results as the next call's first guess."""
    layout = source_layout(ys, 1.0) if layout is None else layout
    y, order, rank, start, end, lo2, hi2 = (layout.y, layout.order, layout.rank, layout.start, layout.end,
                                            layout.lo2, layout.hi2)
    last_counts = layout.memo
    mirror, err = _mirror_point(ys, yt)
    values = np.concatenate((yt, mirror))
    own_start, own_end = start[rank], end[rank]             # each row's own source's tie group
    if len(layout.offsets) == 2 and ys.size < SORTED_QUERIES_FROM:   # one small layer: no guesses
        below = _search_segments(y, values, layout.offsets, lo2)
    else:
        guess = last_counts.get("below")
        if guess is None:
            guess = np.where(values <= np.concatenate((ys, ys)), np.concatenate((own_start, own_start)),
                             np.concatenate((own_end, own_end)))
        below = last_counts["below"] = _counts_below(y, values, guess, layout.offsets, lo2, hi2)
    at = np.minimum(below, hi2 - 1)
    upto = np.where((below < hi2) & (y[at] == values), end[at], below)
    q, low, high = _split_and_ends(np.where, ys, yt, err, below, upto, own_start, own_end)
    return y, order, rank, q, low, high


#: the share of queries whose first guess may be wrong for the guesses to be used (else the full
#: search, one searchsorted per segment, is cheaper: docs/performance.md, "Constants of the sorted
#: path")
GUESS_MAX_MISSES = 0.25
#: a wrong guess is first corrected within this many positions of it (most are off by a few)
GUESS_WINDOW = 16
#: the share of queries still wrong after that for which a bisection over the whole segment is
#: cheaper than the full search (it costs about twice as much per query as a searchsorted)
FAR_MAX_MISSES = 0.05


def _counts_below(y, values, guess, offsets, lo2, hi2):
    """#{y < v} within each query's segment of the sorted y (as a global position: the segment's
    start plus the count), for the 2N queries v (targets, then mirror points).

    ``guess``: a first guess per query, checked exactly (y[p - 1] < v <= y[p] within the segment,
    :func:`_is_count_below`): the previous call's counts (the targets move little in one optimizer
    step), or on a first call the edge of the row's own source's tie group on the query's side
    (the target starts at its source, the mirror point is as far on the other side). The wrong
    ones are bisected within GUESS_WINDOW positions of their guess, checked again, and what is
    still wrong is bisected over its whole segment. Where more than GUESS_MAX_MISSES are wrong, or
    more than FAR_MAX_MISSES still are after the window, one searchsorted per segment instead.
    Either way the result is the exact count (a guess only decides where to look)."""
    lo2, hi2 = np.broadcast_to(lo2, values.shape), np.broadcast_to(hi2, values.shape)
    wrong = np.flatnonzero(~_is_count_below(y, values, guess, lo2, hi2))
    if not wrong.size:
        return guess
    if wrong.size <= GUESS_MAX_MISSES * values.size:
        below = guess.copy()
        v, lo, hi, first = values[wrong], lo2[wrong], hi2[wrong], guess[wrong]
        found = _bisect(y, v, np.maximum(lo, first - GUESS_WINDOW), np.minimum(hi, first + GUESS_WINDOW))
        still = np.flatnonzero(~_is_count_below(y, v, found, lo, hi))
        if still.size <= FAR_MAX_MISSES * values.size:
            found[still] = _bisect(y, v[still], lo[still], hi[still])
            below[wrong] = found
            return below
    return _search_segments(y, values, offsets, lo2)


def _search_segments(y, values, offsets, lo2):
    """#{y < v} within each query's segment, as :func:`_counts_below` returns it, by one
    searchsorted per segment and query half (the queries sorted first in large segments)."""
    n = y.size
    below = np.empty(values.size, dtype=np.int64)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        segment = y[lo:hi]
        if hi - lo >= SORTED_QUERIES_FROM:
            queries = np.concatenate((values[lo:hi], values[n + lo:n + hi]))
            by_value = np.argsort(queries)
            found = np.empty_like(by_value)
            found[by_value] = np.searchsorted(segment, queries[by_value])   # sorted queries: a merge
            below[lo:hi], below[n + lo:n + hi] = found[:hi - lo], found[hi - lo:]
        else:
            below[lo:hi] = np.searchsorted(segment, values[lo:hi])
            below[n + lo:n + hi] = np.searchsorted(segment, values[n + lo:n + hi])
    return below + lo2


def _is_count_below(y, v, p, lo, hi):
    """Whether position p (in [lo, hi], the query's segment) is the first with y[p] >= v there."""
    last = y.size - 1
    return ((p == lo) | (y[np.maximum(p - 1, 0)] < v)) & ((p == hi) | (y[np.minimum(p, last)] >= v))


def _bisect(y, v, lo, hi):
    """The first position p in [lo, hi) with y[p] >= v (hi if none), per query; y sorted in each
    query's range."""
    lo, hi = lo.copy(), hi.copy()
    last = y.size - 1
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) >> 1
        right = active & (y[np.minimum(mid, last)] < v)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)


def _decay_table(y2: np.ndarray, tau, offsets) -> np.ndarray:
    """(2, steps, N): prod of the consecutive decays over (j - 2^s, j]; 0 where that range reaches
    past the start of j's segment (in the flipped direction: past its end)."""
    n = y2.shape[-1]
    steps = max(max(hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])) - 1, 0).bit_length()
    table = np.zeros((2, steps, n))
    if steps:
        if np.ndim(tau):   # one value per channel: position j of the flipped array is channel n - 1 - j
            tau = np.stack((tau, tau[::-1]))[:, 1:]
        gaps = y2[:, :-1] - y2[:, 1:]   # <= 0 within a segment (sorted there), so each decay is in [0, 1]
        inner = list(offsets[1:-1])
        if inner:   # a segment start has decay 0: its gap is the jump from the previous segment's
            #         largest indicator, often > 0, whose exp overflows; exp(-inf) is exactly 0
            gaps[0, [o - 1 for o in inner]] = -np.inf      # segment starts, ascending
            gaps[1, [n - o - 1 for o in inner]] = -np.inf  # segment starts of the flipped array
        table[:, 0, 1:] = np.exp(gaps / tau)
        for step in range(1, steps):
            s = 1 << (step - 1)
            table[:, step, 2 * s:] = table[:, step - 1, 2 * s:] * table[:, step - 1, s:-s]
    return table


def kept_sums(ys: np.ndarray, yt: np.ndarray, tau, weights: np.ndarray, layout: tuple | None = None):
    """As functional._sorted_kept_sums: kept sums (ch, N) by target row, and the saved state.
    ``layout``: ``source_layout(ys, tau, offsets)`` if the caller kept it (it defines the segments)."""
    n = ys.size
    layout = source_layout(ys, tau) if layout is None else layout
    y, order, rank, q, low, high = kept_intervals(ys, yt, layout)
    seg_lo, seg_hi = layout.seg_lo, layout.seg_hi
    left, right = np.maximum(q - 1, seg_lo), np.minimum(q, seg_hi - 1)
    before, last = np.maximum(low - 1, seg_lo), np.minimum(high, seg_hi - 1)
    y_at = y[np.concatenate((left, right, before, last))].reshape(4, n)
    gap_left, gap_right = yt - y_at[0], y_at[1] - yt
    gap_left[q == seg_lo] = np.inf
    gap_right[q == seg_hi] = np.inf
    nearest = np.minimum(gap_left, gap_right)
    exponent = np.empty((4, n))
    np.subtract(nearest, gap_left, out=exponent[0])
    np.subtract(nearest, gap_right, out=exponent[1])
    np.subtract(y_at[2], y_at[0], out=exponent[2])
    np.subtract(y_at[1], y_at[3], out=exponent[3])
    exponent /= tau
    factors = np.exp(exponent, out=exponent)
    factors[2, low == seg_lo] = 0.0
    factors[3, high == seg_hi] = 0.0
    rho, sigma, decay_left, decay_right = factors
    ones = layout.memo.get("ones")          # the scans of w = 1: scanned with the weights the first time
    first = int(ones is None)
    x = np.empty((2, first + weights.shape[0], n))
    x[0, :first] = 1.0
    np.take(weights, order, axis=1, out=x[0, first:])     # np.take: several times faster than x[:, idx] here
    x[1] = x[0, :, ::-1]
    _laplace_scan_(x, layout.table)
    if first:
        ones = layout.memo["ones"] = x[:, 0].copy()
    at_f, at_g = np.concatenate((left, before)), (n - 1) - np.concatenate((right, last))
    f, g = np.take(x[0, first:], at_f, axis=1), np.take(x[1, first:], at_g, axis=1)
    z = rho * ones[0, at_f[:n]] + sigma * ones[1, at_g[:n]]
    kept = (rho * (f[:, :n] - f[:, n:] * decay_left) + sigma * (g[:, :n] - g[:, n:] * decay_right)) / z
    return kept, (rank, left, right, before, last, rho / z, sigma / z, decay_left, decay_right, layout.table)


def transposed(v: np.ndarray, saved) -> np.ndarray:
    """As functional._sorted_transposed: S^T v, by source channel."""
    rank, left, right, before, last, rho_z, sigma_z, decay_left, decay_right, table = saved
    ch, n = v.shape
    a, b = v * rho_z, v * sigma_z
    x = np.empty((2, ch, n))
    to_right = np.concatenate((right, last))
    to_left = (n - 1) - np.concatenate((left, before))
    from_right = np.concatenate((b, -b * decay_right), 1)
    from_left = np.concatenate((a, -a * decay_left), 1)
    for k in range(ch):
        x[0, k] = np.bincount(to_right, from_right[k], minlength=n)
        x[1, k] = np.bincount(to_left, from_left[k], minlength=n)
    _laplace_scan_(x, table)
    return np.take(x[0] + x[1][:, ::-1], rank, axis=1)
