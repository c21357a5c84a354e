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
