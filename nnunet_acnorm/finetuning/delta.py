"""DELTA (Li, Xiong, Wang, Huan, Chen, Liu, Xu, Guo, ICLR 2019, "DELTA: deep learning transfer
using feature map with attention for convolutional networks"): keep the *feature maps* of the
fine-tuned network near those of the frozen pretrained network on the same input.

    Omega(w) = alpha * sum_j sum_c W_jc * D_jc(w)  +  beta / 2 * ||w_new||^2
    D_jc(w)  = mean over batch and positions of (FM_jc(w, x) - FM_jc(w0, x))^2

``FM_jc`` is channel c of stage output j; ``w0`` is the frozen pretrained network (a copy, in eval
mode, no gradient). Choices made here where the paper leaves room (docs/baselines.md):

- **Feature maps:** the stage outputs, as the paper's ResNet stages: for an nnU-Net U-Net the
  encoder stages (every resolution, the bottleneck included; the decoder and the head are new or
  task specific); the frozen copy is of the encoder only.
- **Attention:** uniform, ``W_jc = 1 / C_j`` (per stage the mean over channels). The paper's
  weights need one extra forward pass of the frozen network per channel (the loss increase when
  that channel is removed), hundreds per step for a U-Net; not done.
- **Scale:** the mean (not the sum) over positions, so that alpha does not depend on the patch
  size; alpha = 0.01 (the paper's value for its behavioural term), beta = 0.01 on the new weights
  (the paper's L2 term, as L2-SP's beta); weight decay 0.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from nnunet_acnorm.finetuning.features import FeatureRecorder

DELTA_ALPHA = 0.01
DELTA_BETA = 0.01


def feature_distance(live: list[Tensor], reference: list[Tensor]) -> Tensor:
    """sum_j mean_{b, c, positions} (live_j - reference_j)^2: uniform channel attention."""
    total = live[0].new_zeros((), dtype=torch.float32)
    for a, b in zip(live, reference, strict=True):
        total = total + (a.float() - b.float().detach()).pow(2).mean()
    return total


class DELTARegulariser(nn.Module):
    """The feature term of DELTA for ``network``.

    ``trunk``: name of the submodule that gets the image and holds the stages ("" = the whole
    network; nnU-Net: "encoder"); ``stages``: their names relative to ``network``; a frozen copy of
    the trunk (its current weights = the pretrained ones) is made, or restored from
    ``reference_state``. Call :meth:`forward` after the network's forward pass in training mode.
    """

    def __init__(self, network: nn.Module, trunk: str, stages: list[str], alpha: float = DELTA_ALPHA,
                 reference_state: dict | None = None):
        super().__init__()
        self.alpha = float(alpha)
        self.trunk_name = trunk
        live_trunk = network.get_submodule(trunk) if trunk else network
        prefix = f"{trunk}." if trunk else ""
        for s in stages:
            if not s.startswith(prefix):
                raise ValueError(f"stage '{s}' is not inside the trunk '{trunk}'")
        self.stage_names = list(stages)
        reference = copy.deepcopy(live_trunk)
        if reference_state is not None:
            reference.load_state_dict(reference_state, strict=True)
        reference.eval()
        reference.requires_grad_(False)
        # a list, not a submodule: the frozen copy is no part of any state dict or optimizer
        self._reference = [reference]
        self._live = FeatureRecorder({s: network.get_submodule(s) for s in stages})
        self._input = FeatureRecorder({"input": live_trunk}, inputs=True)
        self._ref = FeatureRecorder({s: reference.get_submodule(s[len(prefix):]) for s in stages}, always=True)

    @property
    def reference(self) -> nn.Module:
        return self._reference[0]

    def reference_state(self) -> dict:
        """The frozen copy's state dict on the CPU. Keys that alias one tensor (nnU-Net's modules list
        each conv and norm twice) share one CPU tensor, so a checkpoint stores it once."""
        copies: dict[tuple, torch.Tensor] = {}
        out = {}
        for key, value in self.reference.state_dict().items():
            ident = (value.data_ptr(), tuple(value.shape), value.stride(), value.dtype)
            if ident not in copies:
                copies[ident] = value.detach().cpu()
            out[key] = copies[ident]
        return out

    def reference_bytes(self) -> int:
        """Memory of the frozen copy (its parameters and buffers, each once)."""
        return sum(t.numel() * t.element_size() for t in (*self.reference.parameters(), *self.reference.buffers()))

    def to(self, *args, **kwargs):
        self._reference[0] = self.reference.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def forward(self) -> Tensor:
        if "input" not in self._input.features or len(self._live.features) != len(self.stage_names):
            raise RuntimeError("DELTA: no training forward pass was recorded before the penalty")
        x = self._input.features["input"].detach()
        with torch.no_grad():
            self.reference(x)
        live = [self._live.features[s] for s in self.stage_names]
        ref = [self._ref.features[s] for s in self.stage_names]
        value = self.alpha * feature_distance(live, ref)
        for rec in (self._live, self._input, self._ref):
            rec.clear()
        return value

    def remove(self) -> None:
        for rec in (self._live, self._input, self._ref):
            rec.remove()
