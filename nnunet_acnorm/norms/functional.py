"""AC-Norm as functions of affine parameters (``docs/method.md``, section 1).

Everything here acts on per-channel vectors of length C; the normalization itself is left to
the norm type's own functional call (``F.batch_norm``, ``F.instance_norm``, ``F.group_norm``).
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

import torch
from torch import Tensor

from nnunet_acnorm.norms.torch_compat import autocast_off, has_float64, is_compiling

#: eps of the domain indicator y = beta / (|gamma| + eps); fixed by the method, not the norm's eps.
INDICATOR_EPS = 1e-5


def domain_indicator(weight: Tensor, bias: Tensor, eps: float = INDICATOR_EPS) -> Tensor:
    """y = beta / (|gamma| + eps), per channel."""
    return bias / (weight.abs() + eps)


@torch.no_grad()
def sparse_correlation(source_weight: Tensor, source_bias: Tensor, target_weight: Tensor,
                       target_bias: Tensor, tau: float = 1.0) -> Tensor:
    """The sparse channel correlation S (rows: target channels, columns: source channels).

    A[i, j] = softmax_j(-|yt[i] - ys[j]| / tau); S keeps A[i, j] where A[i, j] >= A[i, i] (ties
    kept, no renormalisation). S carries no gradient. Computed in at least float32 (half-precision
    affines are upcast), so that precision cannot change which entries survive.
    """
    # at least float32 (torch.promote_types, written out: torch 2.1's TorchDynamo cannot trace it)
    dtype = torch.float64 if target_weight.dtype == torch.float64 else torch.float32
    ys = domain_indicator(source_weight.to(dtype), source_bias.to(dtype))
    yt = domain_indicator(target_weight.to(dtype), target_bias.to(dtype))
    a = torch.softmax(-(yt[:, None] - ys[None, :]).abs() / tau, dim=1)
    keep = a >= a.diagonal()[:, None]
    return torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))


#: indicators whose largest deviation from their median is below this (relative to 1 + |median|)
#: are taken as constant: untrained affines (gamma = 1, beta = 0 give y = 0 in every channel)
NEAR_CONSTANT_TOL = 1e-4


def indicators_near_constant(y: Tensor, tol: float = NEAR_CONSTANT_TOL) -> bool:
    """Whether the indicators y are (nearly) equal in every channel: no correlation to express.
    (Decided in float64 on the CPU: every device type, mps included, gives the same answer.)"""
    y = _cpu_float64(y)
    median = y.median()
    return bool((y - median).abs().max() <= tol * (1.0 + median.abs()))


def _cpu_float64(t: Tensor) -> Tensor:
    """``t`` as a float64 tensor on the CPU (mps has no float64; the calibration is a few C-vectors)."""
    return t.detach().to(device="cpu", dtype=torch.float64)


#: the mean diagonal of A at the source point that a calibrated temperature gives (see calibrated_tau)
DEFAULT_DIAGONAL = 0.5


@torch.no_grad()
def source_diagonal(source_weight: Tensor, source_bias: Tensor, tau: float) -> float:
    """Mean over channels of A[i, i] when the target equals the source (the step-0 diagonal),
    computed in float64 on the CPU."""
    ys = domain_indicator(_cpu_float64(source_weight), _cpu_float64(source_bias))
    return float(torch.softmax(-(ys[:, None] - ys[None, :]).abs() / tau, dim=1).diagonal().mean())


@torch.no_grad()
def calibrated_tau(source_weight: Tensor, source_bias: Tensor, diagonal: float = DEFAULT_DIAGONAL,
                   rel_tol: float = 1e-6) -> float | None:
    """The temperature at which the mean step-0 diagonal of A equals ``diagonal``.

    A layer's softmax row i spreads its mass over the source channels whose indicators lie within
    about tau of yt[i]; its own diagonal A[i, i] falls monotonically from (nearly) 1 at tau -> 0 to
    1/C at tau -> inf. A fixed tau therefore means different things on layers whose indicators
    spread over 0.01 or over 10. Calibrating tau so that the mean diagonal at the pretrained point
    is ``diagonal`` (default 0.5: the row's own channel holds half the mass, the other half sits on
    the channels nearest in y) gives every layer of every network the same sharpness.

    Solved by bisection in log tau, in float64 on the CPU (any device, mps included), from the
    source affines alone. A function of their values: it is computed once per distinct source
    (the result is remembered by value, so reloading the same weights, as nnU-Net's predictor does
    per case and fold, or a layer reached under two names, costs a lookup). Returns None when no
    temperature reaches ``diagonal``: a layer whose indicators are (nearly) all equal (untrained
    affines, C = 1) keeps a diagonal near 1/C for every tau, or near 1 only through ties; the
    caller decides what to do then.
    """
    if not 0.0 < diagonal < 1.0:
        raise ValueError(f"the calibration diagonal must be in (0, 1), got {diagonal}")
    weight, bias = _cpu_float64(source_weight).contiguous(), _cpu_float64(source_bias).contiguous()
    key = hashlib.blake2b(struct.pack("<qdd", weight.numel(), diagonal, rel_tol) + weight.numpy().tobytes() +
                          bias.numpy().tobytes(), digest_size=20).digest()
    if key in _CALIBRATED:
        _CALIBRATED.move_to_end(key)
        return _CALIBRATED[key]
    tau = _bisect_tau(weight, bias, float(diagonal), float(rel_tol))
    _CALIBRATED[key] = tau
    if len(_CALIBRATED) > CALIBRATION_CACHE_SIZE:
        _CALIBRATED.popitem(last=False)
    return tau


#: how many distinct (source affines, diagonal) temperatures are remembered (by a 20-byte digest of
#: their values; a network has a few dozen layers, a 5-fold ensemble five times that)
CALIBRATION_CACHE_SIZE = 4096
_CALIBRATED: OrderedDict[bytes, float | None] = OrderedDict()


def _bisect_tau(source_weight: Tensor, source_bias: Tensor, diagonal: float, rel_tol: float) -> float | None:
    """:func:`calibrated_tau` of float64 CPU source affines, computed."""
    ys = domain_indicator(source_weight, source_bias)
    c = ys.numel()
    if c < 2 or diagonal <= 1.0 / c or indicators_near_constant(ys):
        return None
    spread = float((ys - ys.median()).abs().max())
    lo, hi = spread * 1e-9, spread * 1e6   # diagonal(lo) ~ 1 (up to ties), diagonal(hi) ~ 1/C
    if source_diagonal(source_weight, source_bias, lo) < diagonal or \
            source_diagonal(source_weight, source_bias, hi) > diagonal:
        return None
    while hi / lo > 1.0 + rel_tol:
        mid = (lo * hi) ** 0.5
        if source_diagonal(source_weight, source_bias, mid) > diagonal:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


#: the smallest channel count for which ``recalibrated_affine(method="auto")`` takes the sorted
#: O(C log C) path, per device type; below it the dense C x C path is faster. CPU: where the
#: forward + backward times of the two paths cross for the affine alone of one AC-Norm layer (CPU
#: time, one thread): ``benchmarks/benchmark_norm_layers.py --affine-only`` measures it, the figures
#: are in docs/performance.md ("The recalibrated affine alone"). With several torch threads on a
#: machine whose cores are busy, every small dense op opens a parallel region that waits for a core
#: (same page; hence _DenseOneThread); the sorted path runs single-threaded in NumPy. The rule does
#: not depend on the thread count, so that results do not either. CUDA: not measured (nothing has
#: run on a GPU: docs/performance.md); the dense path is a few large kernels and the sorted one
#: about a hundred small ones, so the dense one is kept up to 8192 channels (its saved S is then
#: 256 MiB). Other devices: dense. Change these where that benchmark shows otherwise.
SORTED_MIN_CHANNELS = {"cpu": 300, "cuda": 8192}


def use_sorted_path(num_channels: int, device: torch.device | str) -> bool:
    """Whether ``recalibrated_affine(method="auto")`` takes the sorted path for this layer."""
    threshold = SORTED_MIN_CHANNELS.get(torch.device(device).type)
    return threshold is not None and num_channels >= threshold


def recalibrated_affine(source_weight: Tensor, source_bias: Tensor, target_weight: Tensor,
                        target_bias: Tensor, tau: float = 1.0, method: str = "auto",
                        layout_cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """The one affine that AC-Norm applies to x-hat: ((I + S) gamma_t, (I + S) beta_t).

    Gradients flow to the target affines through both the identity and the S term; S itself is
    a constant. ``method``:

    - ``"dense"``: S as a C x C matrix (:func:`sparse_correlation`, at least float32) and two fused
      matrix-vector products (``addmv``), autocast off so that the affine stays in the parameters'
      precision. The reference; O(C^2) time and saved memory.
    - ``"sorted"``: the same quantity in O(C log C) without forming S (float64 throughout, then
      cast to the parameters' dtype): see :func:`_sorted_kept_sums` and ``docs/method.md``.
    - ``"auto"`` (default): ``"sorted"`` where :func:`use_sorted_path` says it is faster (never on a
      device without float64, such as mps).

    ``layout_cache``: optional dict owned by the caller, where the sorted path keeps what depends on
    the source affines and tau alone, reused while those tensors are unchanged (AC-Norm layers pass
    their own: the source is frozen during fine-tuning).
    """
    if method == "auto":
        method = "sorted" if use_sorted_path(target_weight.numel(), target_weight.device) else "dense"
    if method == "sorted":
        if not has_float64(target_weight.device.type):
            raise ValueError(f"recalibrated_affine: the sorted path computes in float64, which "
                             f"{target_weight.device.type} tensors cannot hold; use method='dense' (or 'auto')")
        return _SortedRecalibratedAffine.apply(source_weight, source_bias, target_weight, target_bias,
                                               float(tau), layout_cache)
    if method != "dense":
        raise ValueError(f"recalibrated_affine: method must be 'auto', 'dense' or 'sorted', got {method!r}")
    if target_weight.device.type == "cpu" and not is_compiling() and torch.get_num_threads() > 1:
        return _DenseOneThread.apply(source_weight, source_bias, target_weight, target_bias, tau)
    s = sparse_correlation(source_weight, source_bias, target_weight, target_bias, tau)
    s = s.to(target_weight.dtype)
    with autocast_off(target_weight.device.type):
        weight = torch.addmv(target_weight, s, target_weight)
        bias = torch.addmv(target_bias, s, target_bias)
    return weight, bias


class _one_thread:
    """Run torch CPU ops with one intra-op thread, then restore the thread count."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


class _DenseOneThread(torch.autograd.Function):
    """The dense path on a CPU with several torch threads, computed with one thread.

    Its ops are tiny (C <= SORTED_MIN_CHANNELS["cpu"] in auto mode), so splitting them gains nothing,
    but each opens a parallel region that waits for a busy core on a shared machine (measured:
    docs/performance.md, "The recalibrated affine alone"). The same ops as the plain dense
    formula (S by sparse_correlation, addmv; backward g + S^T g as autograd forms it), so the
    result is that of a one-thread run."""

    @staticmethod
    def forward(ctx, source_weight, source_bias, target_weight, target_bias, tau):
        with _one_thread(), torch.no_grad(), torch.autocast("cpu", enabled=False):
            s = sparse_correlation(source_weight, source_bias, target_weight, target_bias, tau)
            s = s.to(target_weight.dtype)
            weight = torch.addmv(target_weight, s, target_weight)
            bias = torch.addmv(target_bias, s, target_bias)
        ctx.save_for_backward(s)
        return weight, bias

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weight, grad_bias):
        (s,) = ctx.saved_tensors
        with _one_thread():
            st = s.t()
            return None, None, grad_weight + torch.mv(st, grad_weight), grad_bias + torch.mv(st, grad_bias), None


# -- the sorted path ---------------------------------------------------------------------------
#
# Sort the source indicators: y[0] <= ... <= y[C-1] (``order``: sorted position -> channel).
# Row i (target channel, indicator t) keeps the source channels j with |t - y_j| <= |t - ys_i|:
# an interval [L, R) of sorted positions that contains ys_i, split by q = #{y <= t} into a left
# part [L, q) (weights exp((y_k - t) / tau)) and a right part [q, R) (weights exp((t - y_k) / tau)).
# With m = min_k |t - y_k| (the nearest source) every weight is multiplied by exp(m / tau), which
# cancels in S = weights / (sum of all weights) and keeps the largest weight at 1.
#
# The sums come from two Laplace scans over the sorted positions,
#     F(j) = sum_{k <= j} w_k exp((y_k - y_j) / tau),   G(j) = sum_{k >= j} w_k exp((y_j - y_k) / tau),
# computed by log2(C) doubling steps (Hillis-Steele) whose factors exp(-(gap) / tau) are all <= 1:
# nothing overflows whatever (y_max - y_min) / tau is, and signed weights need no splitting. With
# p = q - 1 (nearest source on the left) and s = q (on the right):
#     left  = exp((y_p - t + m) / tau) * (F(p) - F(L - 1) exp((y_{L-1} - y_p) / tau)),
#     right = exp((t - y_s + m) / tau) * (G(s) - G(R) exp((y_s - y_R) / tau)),
# and the normaliser Z is the same with w = 1 over the full ranges. Every factor is <= 1, so the
# rounding error of a kept sum is a few ulps of max|w| (about that of the dense float64 product).
# The backward pass needs S^T g: the adjoint of "gather F at p and L - 1" is a scatter, and the
# adjoint of the ascending scan is the descending one (and vice versa), so it is the same two
# scans again, of the scattered cotangents.
#
# Which entries are kept is decided exactly, on the float64 indicators: |t - y_j| <= |t - ys_i| in
# real arithmetic. One end of the interval is ys_i itself; the other is the mirror point 2t - ys_i,
# whose rounding error is recovered exactly (TwoSum), so that a source exactly at the mirror point
# (a tie) is kept and one a rounding error beyond it is not. The dense path compares the rounded
# softmax values instead; the two can differ only for an entry whose distance differs from the
# diagonal's by less than the rounding of the softmax (relative 1e-16 in float64, 1e-7 in float32).

def _tie_groups(y: Tensor, arange: Tensor) -> tuple[Tensor, Tensor]:
    """For sorted y: first position and one past the last position of each entry's tie group."""
    c = y.numel()
    differs = y[1:] != y[:-1]
    true = differs.new_ones(1)
    start = torch.cummax(torch.where(torch.cat([true, differs]), arange, 0), 0).values
    end = torch.where(torch.cat([differs, true]), arange + 1, c).flip(0)
    return start, torch.cummin(end, 0).values.flip(0)


def _kept_intervals(ys: Tensor, yt: Tensor):
    """Sorted source indicators and, per target row, the kept interval [L, R) and the split q.

    Returns (y, order, rank, q, L, R): y = ys[order] ascending (stable), rank[order] = arange.
    """
    c = ys.numel()
    arange = torch.arange(c, device=ys.device)
    y, order = torch.sort(ys, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, arange)
    start, end = _tie_groups(y, arange)
    mirror, err = _mirror_point(ys, yt)
    values = torch.cat([yt, mirror])
    below = torch.searchsorted(y, values)                     # #{y < v}
    at = below.clamp(max=c - 1)
    upto = torch.where((below < c) & (y[at] == values), end[at], below)   # #{y <= v}
    q, low, high = _split_and_ends(torch.where, ys, yt, err, below, upto, start[rank], end[rank])
    return y, order, rank, q, low, high


# The two helpers below are the exact kept-set rule, shared by this torch implementation and the
# NumPy one (``_sorted_numpy``): the same operations on tensors or on arrays, hence the same
# results; each caller does its own sort and search.

def _mirror_point(ys, yt):
    """The mirror point 2t - ys_i, as mirror + err exactly (TwoSum; 2t is exact). Tensors or arrays."""
    two_t = 2.0 * yt
    mirror = two_t - ys
    back = mirror - two_t
    return mirror, (two_t - (mirror - back)) + (-ys - back)


def _split_and_ends(where, ys, yt, err, below, upto, own_start, own_end):
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


def _decay_table(y2: Tensor, tau: float) -> Tensor:
    """y2 (2, C), rows ascending -> (2, steps, C): exp((y2[j - 2^s] - y2[j]) / tau), 0 for j < 2^s."""
    c = y2.shape[-1]
    steps = max(c - 1, 0).bit_length()
    shift = (1 << torch.arange(steps, device=y2.device))[:, None]
    source = torch.arange(c, device=y2.device)[None, :] - shift
    gap = (y2[:, source.clamp(min=0)] - y2[:, None, :]) / tau
    return torch.exp(gap.masked_fill_(source < 0, float("-inf")))


def _laplace_scan_(x: Tensor, table: Tensor) -> Tensor:
    """In place, x (2, ch, C): x[d, :, j] <- sum_{k <= j} x[d, :, k] exp((y2[d, k] - y2[d, j]) / tau).
    Tensors or NumPy arrays (the NumPy path uses it too)."""
    for step in range(table.shape[1]):
        shift = 1 << step
        x[..., shift:] += table[:, None, step, shift:] * x[..., :-shift]
    return x


def _sorted_kept_sums(ys: Tensor, yt: Tensor, tau: float, weights: Tensor):
    """(S @ weights^T)^T for float64 indicators ys, yt (C,) and weights (ch, C), without forming S.

    Returns the kept sums (ch, C, by target row) and what :func:`_sorted_transposed` needs.
    """
    c = ys.numel()
    y, order, rank, q, low, high = _kept_intervals(ys, yt)
    left, right = (q - 1).clamp(min=0), q.clamp(max=c - 1)        # nearest sources, sorted positions
    before, last = (low - 1).clamp(min=0), high.clamp(max=c - 1)
    y_at = y[torch.cat([left, right, before, last])].view(4, c)
    inf = torch.tensor(float("inf"), dtype=y.dtype, device=y.device)
    gap_left = torch.where(q > 0, yt - y_at[0], inf)
    gap_right = torch.where(q < c, y_at[1] - yt, inf)
    nearest = torch.minimum(gap_left, gap_right)
    rho = torch.exp((nearest - gap_left) / tau)                  # 0 where there is no left source
    sigma = torch.exp((nearest - gap_right) / tau)
    decay_left = torch.exp((y_at[2] - y_at[0]) / tau) * (low > 0)
    decay_right = torch.exp((y_at[1] - y_at[3]) / tau) * (high < c)
    table = _decay_table(torch.stack([y, -y.flip(0)]), tau)
    ch = weights.shape[0] + 1
    x = y.new_empty(2, ch, c)
    x[0, 0] = 1.0
    x[0, 1:] = weights[:, order]
    x[1] = x[0].flip(-1)
    _laplace_scan_(x, table)
    flipped = c - 1
    index = torch.stack([torch.cat([left, before]), flipped - torch.cat([right, last])])
    picked = torch.gather(x, 2, index[:, None, :].expand(2, ch, 2 * c))   # F at (p, L-1), G at (s, R)
    f_p, f_before = picked[0, :, :c], picked[0, :, c:]
    g_s, g_last = picked[1, :, :c], picked[1, :, c:]
    z = rho * f_p[0] + sigma * g_s[0]
    kept = (rho * (f_p[1:] - f_before[1:] * decay_left) + sigma * (g_s[1:] - g_last[1:] * decay_right)) / z
    saved = (rank, left, right, before, last, rho / z, sigma / z, decay_left, decay_right, table)
    return kept, saved


def _sorted_transposed(v: Tensor, saved) -> Tensor:
    """S^T v for v (ch, C) by target row; the result (ch, C) by source channel."""
    rank, left, right, before, last, rho_z, sigma_z, decay_left, decay_right, table = saved
    ch, c = v.shape
    a, b = v * rho_z, v * sigma_z
    x = v.new_zeros(2, ch, c)
    # right parts were read from G (descending scan) at s and R: their adjoint scans ascending
    x[0].index_add_(1, torch.cat([right, last]), torch.cat([b, -b * decay_right], 1))
    # left parts were read from F (ascending) at p and L - 1: adjoint scans descending (flipped)
    x[1].index_add_(1, (c - 1) - torch.cat([left, before]), torch.cat([a, -a * decay_left], 1))
    _laplace_scan_(x, table)
    return (x[0] + x[1].flip(-1))[:, rank]


def _torch_affine(source_weight, source_bias, target_weight, target_bias, tau, layout_cache=None):
    """Sorted path in torch (any device): ((I+S) gamma_t, (I+S) beta_t) in float64, and the state."""
    f64 = torch.float64
    ys = domain_indicator(source_weight.detach().to(f64), source_bias.detach().to(f64))
    tw, tb = target_weight.detach().to(f64), target_bias.detach().to(f64)
    kept, saved = _sorted_kept_sums(ys, domain_indicator(tw, tb), tau, torch.stack([tw, tb]))
    return tw + kept[0], tb + kept[1], saved


def _torch_affine_backward(grad_weight, grad_bias, saved):
    g = torch.stack([grad_weight.to(torch.float64), grad_bias.to(torch.float64)])
    g = g + _sorted_transposed(g, saved)
    return g[0], g[1]


def _numpy_affines(sources, targets, taus, layout_cache=None):
    """Sorted path in NumPy (CPU tensors) for n layers at once, as one set of flat segments
    (``_sorted_numpy``): the recalibrated affines of every layer as one (2, N) float64 array
    (row 0 the weights, row 1 the biases, layer after layer in the order given) and the state the
    backward pass needs.

    ``sources``, ``targets``: n (weight, bias) pairs of 1-D tensors; ``taus``: n floats.
    ``layout_cache``: a dict owned by the caller (an AC-Norm layer, or a network for all of its
    layers) in which what depends on the sources and taus alone (the indicators, the sorts, tie
    groups and decay table) is kept and reused while the source tensors and taus are unchanged
    (same tensors, same data pointers and version counters)."""
    from nnunet_acnorm.norms import _sorted_numpy as np_path
    np = np_path.np

    def flat(tensors):  # 1-D tensors, any dtype (NumPy has no bfloat16); a copy, so that NumPy cannot write into them
        tensors = list(tensors)
        joined = tensors[0].detach() if len(tensors) == 1 else torch.cat(tensors)   # (called under no_grad)
        return joined.to(torch.float64, copy=True).numpy()

    sizes = [w.numel() for w, _ in targets]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    taus = tuple(float(t) for t in taus)
    tau = taus[0] if len(set(taus)) == 1 else np.repeat(taus, sizes)
    entry = key = None
    if layout_cache is not None:
        entry = layout_cache.get("sorted")
        source_tensors = [t for pair in sources for t in pair]
        key = (taus, tuple((t.data_ptr(), t._version, t.dtype) for t in source_tensors))
    if entry is not None and entry[1] == key and all(a is b for a, b in zip(entry[0], source_tensors)):
        ys, layout = entry[2], entry[3]
    else:
        sw, sb = flat(w for w, _ in sources), flat(b for _, b in sources)
        ys = sb / (abs(sw) + INDICATOR_EPS)
        layout = np_path.source_layout(ys, tau, offsets if len(sizes) > 1 else None)
        if layout_cache is not None:
            layout_cache["sorted"] = (source_tensors, key, ys, layout)
    weights = np.empty((2, offsets[-1]))
    weights[0], weights[1] = flat(w for w, _ in targets), flat(b for _, b in targets)
    yt = weights[1] / (abs(weights[0]) + INDICATOR_EPS)
    kept, saved = np_path.kept_sums(ys, yt, tau, weights, layout)
    weights += kept
    return weights, saved


def _numpy_affines_backward(g, saved):
    """(I + S)^T g for the (2, N) float64 array g of incoming gradients (in place)."""
    from nnunet_acnorm.norms import _sorted_numpy as np_path

    g += np_path.transposed(g, saved)
    return g


def _numpy_affine(source_weight, source_bias, target_weight, target_bias, tau, layout_cache=None):
    """Sorted path in NumPy for one layer: the one-segment case of :func:`_numpy_affines`."""
    weights, saved = _numpy_affines([(source_weight, source_bias)], [(target_weight, target_bias)], [tau],
                                    layout_cache)
    return torch.from_numpy(weights[0]), torch.from_numpy(weights[1]), saved


def _numpy_affine_backward(grad_weight, grad_bias, saved):
    g = torch.stack([grad_weight.detach(), grad_bias.detach()]).to(torch.float64)
    g = torch.from_numpy(_numpy_affines_backward(g.numpy(), saved))
    return g[0], g[1]


class _SortedRecalibratedAffine(torch.autograd.Function):
    """((I + S) gamma_t, (I + S) beta_t) by the sorted path; backward (I + S)^T g (S constant).

    Computed in float64 (NumPy on CPU, torch elsewhere), returned in the parameters' dtypes."""

    @staticmethod
    def forward(ctx, source_weight, source_bias, target_weight, target_bias, tau, layout_cache):
        # NumPy cannot be traced by torch.compile: the torch implementation there
        on_cpu = target_weight.device.type == "cpu" and not is_compiling()
        affine = _numpy_affine if on_cpu else _torch_affine
        ctx.backward_fn = _numpy_affine_backward if on_cpu else _torch_affine_backward
        with torch.no_grad(), autocast_off(target_weight.device.type):
            weight, bias, ctx.saved = affine(source_weight, source_bias, target_weight, target_bias, tau,
                                             layout_cache)
        ctx.dtypes = (target_weight.dtype, target_bias.dtype)
        return weight.to(target_weight.dtype), bias.to(target_bias.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weight, grad_bias):
        gw, gb = ctx.backward_fn(grad_weight, grad_bias, ctx.saved)
        return None, None, gw.to(ctx.dtypes[0]), gb.to(ctx.dtypes[1]), None, None


class _SortedRecalibratedAffines(torch.autograd.Function):
    """The sorted path (NumPy, CPU) of n AC-Norm layers in one call: ``apply(taus, layout_cache,
    *source_weights, *source_biases, *target_weights, *target_biases)`` returns the n recalibrated
    weights, then the n biases, each a new tensor in its parameter's dtype. The same values as n
    calls of :func:`recalibrated_affine` with ``method="sorted"`` (bit for bit: the segments of
    ``_sorted_numpy`` never mix layers), at the per-call cost of one. Backward returns None for an
    affine whose output received no gradient (as a parameter unused in the forward gets none)."""

    @staticmethod
    def forward(ctx, taus, layout_cache, *tensors):
        n = len(taus)
        sw, sb, tw, tb = (tensors[k * n:(k + 1) * n] for k in range(4))
        ctx.set_materialize_grads(False)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            weights, ctx.saved = _numpy_affines(list(zip(sw, sb)), list(zip(tw, tb)), taus, layout_cache)
        ctx.dtypes = [t.dtype for t in tw + tb]
        ctx.sizes = [t.numel() for t in tw] * 2     # the 2n pieces of the flat (2 N,) arrays
        out = torch.from_numpy(weights).view(-1)
        return tuple(_segments(out, ctx.sizes, ctx.dtypes))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        n = len(grads) // 2
        g = torch.zeros(sum(ctx.sizes), dtype=torch.float64)
        for piece, grad in zip(torch.split(g, ctx.sizes), grads):
            if grad is not None:
                piece.copy_(grad.detach().reshape(-1))
        g = torch.from_numpy(_numpy_affines_backward(g.numpy().reshape(2, -1), ctx.saved)).view(-1)
        out = _segments(g, ctx.sizes, ctx.dtypes)
        targets = [None if grad is None or not needed else value
                   for grad, value, needed in zip(grads, out, ctx.needs_input_grad[2 + 2 * n:])]
        return (None, None) + (None,) * (2 * n) + tuple(targets)


def _segments(flat: Tensor, sizes, dtypes):
    """The pieces of ``sizes`` (weights, then biases) of a flat (2 N,) array, in ``dtypes``: views of
    one converted copy where all dtypes are equal (one call, not 2n), else one new tensor each."""
    if len(set(dtypes)) == 1:
        return list(torch.split(flat.to(dtypes[0], copy=True), sizes))
    return [piece.to(dtype, copy=True) for piece, dtype in zip(torch.split(flat, sizes), dtypes)]
