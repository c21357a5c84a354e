"""An independent, straightforward two-pass AC-Norm, written from the paper's formula.

It calls the plain normalization twice (once with the target affines, once with the
recalibrated ones) and adds the results, as the public reference implementation does. Tests
compare the fused modules against it; it shares no code with ``nnunet_acnorm``.
"""
import torch
import torch.nn.functional as F


def correlation_matrix(sw, sb, tw, tb, tau):
    ys = sb / (sw.abs() + 1e-5)
    yt = (tb / (tw.abs() + 1e-5)).detach()
    rows = []
    for i in range(len(yt)):
        logits = torch.stack([-(yt[i] - ys[j]).abs() / tau for j in range(len(ys))])
        a = torch.softmax(logits, dim=0)
        rows.append(torch.where(a >= a[i], a, torch.zeros_like(a)))
    return torch.stack(rows).detach()


def two_pass(norm_fn, x, sw, sb, tw, tb, tau=1.0):
    """norm_fn(x, weight, bias) is the plain norm's functional call."""
    s = correlation_matrix(sw, sb, tw, tb, tau)
    return norm_fn(x, tw, tb) + norm_fn(x, s @ tw, s @ tb)


def batch_norm_fn(running_mean, running_var, training, momentum=0.1, eps=1e-5):
    return lambda x, w, b: F.batch_norm(x, running_mean, running_var, w, b, training, momentum, eps)


def instance_norm_fn(eps=1e-5):
    return lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.1, eps)


def group_norm_fn(groups, eps=1e-5):
    return lambda x, w, b: F.group_norm(x, groups, w, b, eps)


def step0_mean_diagonal(sw, sb, tau):
    """Mean over channels of A[i, i] with the target at the source (a plain loop, float64)."""
    ys = (sb.double() / (sw.double().abs() + 1e-5)).tolist()
    total = 0.0
    for i, yi in enumerate(ys):
        logits = [-abs(yi - yj) / tau for yj in ys]
        top = max(logits)
        weights = [2.718281828459045 ** (v - top) for v in logits]
        total += weights[i] / sum(weights)
    return total / len(ys)
