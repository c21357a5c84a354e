"""What the two implementations of the sorted O(C log C) path share: the exact kept-set rule and
the Laplace scan.

The torch implementation (``functional``: any device, and under torch.compile) and the NumPy one
(``_sorted_numpy``: CPU, several layers at once) call these with tensors or with arrays: the same
operations, hence the same results; each caller does its own sort and search. The algorithm is
described in the comment block above ``functional._tie_groups``. ``functional`` calls
``_sorted_numpy``, never the reverse.
"""
from __future__ import annotations


def mirror_point(ys, yt):
    """The mirror point 2t - ys_i, as mirror + err exactly (TwoSum; 2t is exact). Tensors or arrays."""
    two_t = 2.0 * yt
    mirror = two_t - ys
    back = mirror - two_t
    return mirror, (two_t - (mirror - back)) + (-ys - back)


def split_and_ends(where, ys, yt, err, below, upto, own_start, own_end):
    """The split q and the kept interval [L, R) of each row, from the counts of the sorted source
    indicators below (#{y < v}) and up to (#{y <= v}) the queries v = (yt, mirror) concatenated, and
    each row's own tie group [own_start, own_end) in sorted positions. ``where``: ``torch.where`` or
    ``numpy.where``, as the arrays are."""
    c = ys.shape[0]
    q = upto[:c]
    below_m, upto_m = below[c:], upto[c:]
    diagonal_left = ys <= yt
    # diagonal left of t: kept y in [ys_i, mirror]; right of t: kept y in [mirror, ys_i]
    low = where(diagonal_left, own_start, where(err <= 0, below_m, upto_m))
    high = where(diagonal_left, where(err >= 0, upto_m, below_m), own_end)
    return q, low, high


def laplace_scan_(x, table):
    """In place, x (2, ch, C): x[d, :, j] <- sum_{k <= j} x[d, :, k] exp((y2[d, k] - y2[d, j]) / tau),
    with ``table`` the decay table of the sorted indicators y2 (2, C). Tensors or NumPy arrays."""
    for step in range(table.shape[1]):
        shift = 1 << step
        x[..., shift:] += table[:, None, step, shift:] * x[..., :-shift]
    return x
