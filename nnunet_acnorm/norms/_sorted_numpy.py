"""The sorted O(C log C) path of ``functional.recalibrated_affine`` in NumPy, for CPU tensors.

The same algorithm and the same exact kept-set rule as the torch implementation in
``functional`` (read the comment block there); NumPy's per-call overhead is a few times smaller
than torch's on CPU, which is what a layer of a few hundred channels pays. float64 throughout.
Differences to the torch version: the queries of the searchsorted are sorted first (a merge is
about 4x faster than random look-ups), and the decay table is built from the consecutive gaps by
products (one exp per channel instead of one per table entry). Tests compare both implementations
with the dense float64 oracle. The exact kept-set rule itself (TwoSum mirror point, interval ends)
and the scan are one code for both: ``functional._mirror_point``, ``functional._split_and_ends``
and ``functional._laplace_scan_`` work on arrays as on tensors. This module is a second
implementation for speed, not an independent oracle (the tests' oracle is the dense formula).
"""
from __future__ import annotations

import numpy as np

from nnunet_acnorm.norms.functional import _laplace_scan_, _mirror_point, _split_and_ends


def source_layout(ys: np.ndarray, tau: float) -> tuple:
    """What depends on the source indicators and tau alone (reusable while the source is frozen):
    (y sorted, order, rank, tie-group start, tie-group end, decay table)."""
    c = ys.size
    order = np.argsort(ys)  # the order within a tie group does not matter: intervals end at group bounds
    y = ys[order]
    rank = np.empty_like(order)
    rank[order] = np.arange(c)
    differs = y[1:] != y[:-1]
    arange = np.arange(c)
    start = np.maximum.accumulate(np.where(np.concatenate(([True], differs)), arange, 0))
    end = np.minimum.accumulate(np.where(np.concatenate((differs, [True])), arange + 1, c)[::-1])[::-1]
    return y, order, rank, start, end, _decay_table(np.stack((y, -y[::-1])), tau)


def kept_intervals(ys: np.ndarray, yt: np.ndarray, layout: tuple | None = None):
    """(y, order, rank, q, low, high) as functional._kept_intervals (``layout``: source_layout(ys, .))."""
    c = ys.size
    y, order, rank, start, end, _ = source_layout(ys, 1.0) if layout is None else layout
    mirror, err = _mirror_point(ys, yt)
    values = np.concatenate((yt, mirror))
    by_value = np.argsort(values)
    below = np.empty(2 * c, dtype=np.int64)
    below[by_value] = np.searchsorted(y, values[by_value])      # sorted queries: a merge
    at = np.minimum(below, c - 1)
    upto = np.where((below < c) & (y[at] == values), end[at], below)
    q, low, high = _split_and_ends(np.where, ys, yt, err, below, upto, start[rank], end[rank])
    return y, order, rank, q, low, high

def _decay_table(y2: np.ndarray, tau: float) -> np.ndarray:
    """(2, steps, C): prod of the consecutive decays over (j - 2^s, j]; 0 for j < 2^s."""
    c = y2.shape[-1]
    steps = max(c - 1, 0).bit_length()
    table = np.zeros((2, steps, c))
    if steps:
        table[:, 0, 1:] = np.exp((y2[:, :-1] - y2[:, 1:]) / tau)
        for step in range(1, steps):
            s = 1 << (step - 1)
            table[:, step, 2 * s:] = table[:, step - 1, 2 * s:] * table[:, step - 1, s:-s]
    return table

def kept_sums(ys: np.ndarray, yt: np.ndarray, tau: float, weights: np.ndarray, layout: tuple | None = None):
    """As functional._sorted_kept_sums: kept sums (ch, C) by target row, and the saved state.
    ``layout``: ``source_layout(ys, tau)`` if the caller kept it."""
    c = ys.size
    layout = source_layout(ys, tau) if layout is None else layout
    y, order, rank, q, low, high = kept_intervals(ys, yt, layout)
    left, right = np.maximum(q - 1, 0), np.minimum(q, c - 1)
    before, last = np.maximum(low - 1, 0), np.minimum(high, c - 1)
    y_at = y[np.concatenate((left, right, before, last))].reshape(4, c)
    gap_left, gap_right = yt - y_at[0], y_at[1] - yt
    gap_left[q == 0] = np.inf
    gap_right[q == c] = np.inf
    nearest = np.minimum(gap_left, gap_right)
    exponent = np.empty((4, c))
    np.subtract(nearest, gap_left, out=exponent[0])
    np.subtract(nearest, gap_right, out=exponent[1])
    np.subtract(y_at[2], y_at[0], out=exponent[2])
    np.subtract(y_at[1], y_at[3], out=exponent[3])
    exponent /= tau
    factors = np.exp(exponent, out=exponent)
    factors[2, low == 0] = 0.0
    factors[3, high == c] = 0.0
    rho, sigma, decay_left, decay_right = factors
    table = layout[5]
    ch = weights.shape[0] + 1
    x = np.empty((2, ch, c))
    x[0, 0] = 1.0
    x[0, 1:] = weights[:, order]
    x[1] = x[0, :, ::-1]
    _laplace_scan_(x, table)
    f = x[0][:, np.concatenate((left, before))]
    g = x[1][:, (c - 1) - np.concatenate((right, last))]
    z = rho * f[0, :c] + sigma * g[0, :c]
    kept = (rho * (f[1:, :c] - f[1:, c:] * decay_left) + sigma * (g[1:, :c] - g[1:, c:] * decay_right)) / z
    return kept, (rank, left, right, before, last, rho / z, sigma / z, decay_left, decay_right, table)

def transposed(v: np.ndarray, saved) -> np.ndarray:
    """As functional._sorted_transposed: S^T v, by source channel."""
    rank, left, right, before, last, rho_z, sigma_z, decay_left, decay_right, table = saved
    ch, c = v.shape
    a, b = v * rho_z, v * sigma_z
    x = np.empty((2, ch, c))
    to_right = np.concatenate((right, last))
    to_left = (c - 1) - np.concatenate((left, before))
    from_right = np.concatenate((b, -b * decay_right), 1)
    from_left = np.concatenate((a, -a * decay_left), 1)
    for k in range(ch):
        x[0, k] = np.bincount(to_right, from_right[k], minlength=c)
        x[1, k] = np.bincount(to_left, from_left[k], minlength=c)
    _laplace_scan_(x, table)
    return (x[0] + x[1][:, ::-1])[:, rank]
