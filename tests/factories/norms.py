"""Norm layers with affines like a pretrained network's, for the AC-Norm layer tests."""
import torch


def pretrained_affines(norm, set_source: bool = False):
    """Give ``norm`` (plain or AC-Norm) distinct affines like trained ones, in place: weights
    uniform in [0.5, 1.5], biases standard normal, drawn (in that order) from the global generator
    of the layer's device: seed it first. ``set_source``: then make them the AC-Norm source.
    Returns ``norm``."""
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    if set_source:
        norm.set_source()
    return norm


def dense_oracle_s(sw, sb, tw, tb, tau):
    """The sparse correlation S by the method's formula, vectorised in float64 (test code, no
    package code: the oracle of the sorted and batched paths): A = softmax(-|yt_i - ys_j| / tau),
    S = A where A >= diag(A)."""
    sw, sb, tw, tb = (t.detach().double() for t in (sw, sb, tw, tb))
    ys, yt = sb / (sw.abs() + 1e-5), tb / (tw.abs() + 1e-5)
    a = torch.softmax(-(yt[:, None] - ys[None, :]).abs() / tau, dim=1)
    return torch.where(a >= a.diagonal()[:, None], a, torch.zeros(()).double())
