"""StochNorm (Kou, Wu, Wang, Long, Wang, NeurIPS 2020, "Stochastic normalization"): in training,
each channel of a BatchNorm uses the moving (running) statistics instead of the batch statistics
with probability ``p``; in eval mode it is a plain BatchNorm.

    y_c = s_c * BN_moving(x)_c + (1 - s_c) * BN_batch(x)_c,   s_c ~ Bernoulli(p), one draw per
                                                              channel and step

``BN_moving`` normalises with the running statistics from before this step; the running statistics
are then updated from the batch as by BatchNorm (every channel, whatever its draw). Default p = 0.5
(the paper's). For 1-D, 2-D and 3-D inputs ((N, C[, L]), (N, C, H, W), (N, C, D, H, W)).

The modules are BatchNorms (subclasses of ``nn.BatchNorm1d/2d/3d``) with exactly their state dict
keys, so a BatchNorm checkpoint loads strictly and a StochNorm checkpoint loads into a BatchNorm
network. :func:`convert_to_stochnorm` swaps them in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STOCHNORM_P = 0.5


class _StochNormMixin:
    p: float = STOCHNORM_P

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training or not self.track_running_stats or self.p <= 0:
            return super().forward(x)
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError("StochNorm needs running statistics (track_running_stats=True)")
        moving = F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias,
                              False, 0.0, self.eps)
        batch = super().forward(x)  # batch statistics; updates the running statistics
        if self.p >= 1:
            return moving
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        s = torch.bernoulli(torch.full((x.shape[1],), float(self.p), device=x.device)).to(x.dtype).view(shape)
        return s * moving + (1 - s) * batch

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class StochNorm1d(_StochNormMixin, nn.BatchNorm1d):
    pass


class StochNorm2d(_StochNormMixin, nn.BatchNorm2d):
    pass


class StochNorm3d(_StochNormMixin, nn.BatchNorm3d):
    pass


_STOCHNORM_OF = {nn.BatchNorm1d: StochNorm1d, nn.BatchNorm2d: StochNorm2d, nn.BatchNorm3d: StochNorm3d}


def convert_to_stochnorm(network: nn.Module, p: float = STOCHNORM_P) -> int:
    """Replace every ``nn.BatchNorm1d/2d/3d`` (exactly those types) of ``network`` by the StochNorm
    of the same dimension, with the same parameters and statistics; returns the number replaced."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"StochNorm probability p must be in [0, 1], got {p}")
    count = 0
    for name, module in list(network.named_modules()):
        for child_name, child in list(module.named_children()):
            target = _STOCHNORM_OF.get(type(child))
            if target is None or not child.track_running_stats:
                continue
            new = target(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                         track_running_stats=True, device=child.running_mean.device,
                         dtype=child.running_mean.dtype)
            new.load_state_dict(child.state_dict(), strict=True)
            new.train(child.training)
            new.p = float(p)
            setattr(module, child_name, new)
            count += 1
    return count
