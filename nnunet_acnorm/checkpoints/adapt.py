"""Pretrained tensors fitted to a network that differs only where a tensor can be bridged: the
stem's number of input channels, and the spatial size of a convolution kernel.

- :func:`adapt_stem_weight`: [out, c_pre, *k] -> [out, c, *k], averaging the pretrained filters over
  their input channels, repeating them and scaling by c_pre / c, so that an input whose channels all
  carry the same image gives the pretrained response.
- :func:`bridge_kernel`: [out, in, *k_pre] -> [out, in, *k], per axis: a larger kernel gets the
  pretrained taps in its centre and zeros around them (the same function); a smaller one keeps the
  centre taps, except that an axis reduced to 1 sums its taps (the same response to an input that is
  constant along that axis, which is what a 1-wide kernel assumes, e.g. thick slices). Only odd
  kernel sizes are bridged (an even one has no centre to align; in nnU-Net's networks it is a
  transposed convolution's stride).
- :func:`fit_tensor`: one of the two, or None when the shapes differ otherwise (another depth or
  width: nothing to bridge).
"""
from __future__ import annotations

import torch


def adapt_stem_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-convolution weight [out, c_pre, *k] to ``in_channels`` inputs (1 -> n: repeat
    and divide by n; 3 -> 1: the sum of the three filters, as timm does for RGB -> grey)."""
    c_pre = weight.shape[1]
    if in_channels == c_pre:
        return weight.clone()
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, *([1] * (weight.dim() - 2))) * (c_pre / in_channels)


def kernel_bridgeable(file_shape: tuple[int, ...], network_shape: tuple[int, ...]) -> bool:
    """Whether a conv weight of ``file_shape`` can be bridged to ``network_shape``: same channels, odd
    kernel sizes on both sides (centred "same" convolutions; a transposed convolution's even kernel
    is its stride, which no bridging can change)."""
    if len(file_shape) != len(network_shape) or len(file_shape) not in (4, 5) or file_shape == network_shape:
        return False
    if file_shape[:2] != network_shape[:2]:
        return False
    return all(a % 2 == 1 and b % 2 == 1 for a, b in zip(file_shape[2:], network_shape[2:]))


def bridge_kernel(weight: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """``weight`` [out, in, *k_pre] with spatial size ``kernel`` (see the module's docstring)."""
    if not kernel_bridgeable(tuple(weight.shape), (*weight.shape[:2], *kernel)):
        raise ValueError(f"kernel {tuple(weight.shape[2:])} cannot be bridged to {tuple(kernel)}")
    out = weight
    for axis, size in enumerate(kernel, start=2):
        have = out.shape[axis]
        if size == have:
            continue
        if size > have:
            pad = [0, 0] * (out.dim() - 1 - axis) + [(size - have) // 2] * 2
            out = torch.nn.functional.pad(out, pad)
        elif size == 1:
            out = out.sum(dim=axis, keepdim=True)
        else:
            out = out.narrow(axis, (have - size) // 2, size)
    return out.contiguous()


def fit_tensor(value: torch.Tensor, network_shape: tuple[int, ...], is_stem: bool,
               in_channels: int) -> tuple[torch.Tensor, str] | None:
    """``(tensor of network_shape, what was done)`` where the file's ``value`` can be bridged; None
    where it cannot (another depth or width). ``is_stem``: the first convolution, whose input
    channels may be adapted to ``in_channels``."""
    shape = tuple(value.shape)
    if shape == tuple(network_shape):
        return value, ""
    done = []
    if is_stem and len(shape) == len(network_shape) and len(shape) >= 3 and shape[0] == network_shape[0] \
            and shape[1] != network_shape[1] and network_shape[1] == in_channels:
        value = adapt_stem_weight(value, in_channels)
        done.append(f"{shape[1]} -> {in_channels} input channels")
        shape = tuple(value.shape)
    if shape != tuple(network_shape):
        if not kernel_bridgeable(shape, tuple(network_shape)):
            return None
        value = bridge_kernel(value, tuple(network_shape[2:]))
        done.append(f"kernel {list(shape[2:])} -> {list(network_shape[2:])}")
    return value, ", ".join(done)
