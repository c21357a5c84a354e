"""LP-FT (Kumar, Raghunathan, Jones, Ma, Liang, ICLR 2022, "Fine-tuning can distort pretrained
features and underperform out-of-distribution"): first train only the new part with the pretrained
encoder frozen (the linear probe; for a U-Net the decoder and the head), then fine-tune everything.
And discriminative learning rates (Howard & Ruder, ACL 2018, "Universal language model
fine-tuning"): the pretrained encoder learns at ``factor`` x the learning rate of the rest.

- :func:`set_frozen`: switch an encoder's parameters off (``requires_grad=False``; with
  ``zero_grad(set_to_none=True)`` SGD then skips them: no update, no weight decay, no momentum) and
  its BatchNorms (plain and AC-BatchNorm) to eval mode, so that the frozen features really stay the
  pretrained ones.
- :func:`rewrap_ddp`: under DDP, a wrapper rebuilt for the parameters that require gradients now.
  DDP registers those when it is built and waits for each of them in every backward pass; freezing
  after nnU-Net wrapped the network would leave it waiting for gradients that never come ("Expected
  to have finished reduction in the prior iteration" at the second step on every rank).
- :func:`frozen_epochs`: the length of the frozen phase.
- :func:`discriminative_param_groups`: optimizer parameter groups with an ``lr_scale`` each, which
  :class:`ScaledWarmupPolyLRScheduler` (the trainers' schedule) multiplies in.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_acnorm.finetuning.schedules import WarmupPolyLRScheduler
from nnunet_acnorm.norms.modules import _ACBatchNorm

LPFT_FROZEN_FRACTION = 0.1
ENCODER_LR_FACTOR = 0.1


def frozen_epochs(num_epochs: int, fraction: float) -> int:
    """round(fraction * num_epochs), at least 1 when fraction > 0, but at most num_epochs - 1 (the
    last epoch always fine-tunes everything)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the frozen fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return 0
    return max(0, min(max(1, int(round(fraction * num_epochs))), num_epochs - 1))


def set_frozen(encoder: nn.Module, frozen: bool) -> None:
    """Freeze (or release) ``encoder``: parameters' requires_grad, and BatchNorms in eval mode while
    frozen (call it after ``network.train()``, which puts them back in training mode)."""
    for p in encoder.parameters():
        p.requires_grad_(not frozen)
    if frozen:
        for m in encoder.modules():
            if isinstance(m, (_BatchNorm, _ACBatchNorm)):
                m.eval()


def rewrap_ddp(ddp: DDP) -> DDP:
    """A new ``DistributedDataParallel`` around ``ddp.module``, built for the parameters that require
    gradients now (call it on every rank, after :func:`set_frozen` changed them, before the next
    forward). Built as nnU-Net builds its wrapper: ``ddp``'s ``device_ids``, torch's defaults
    otherwise. The old wrapper's gradient hooks are removed."""
    remove_hooks = getattr(getattr(ddp, "reducer", None), "_remove_autograd_hooks", None)
    if remove_hooks is not None:
        remove_hooks()
    return DDP(ddp.module, device_ids=ddp.device_ids)


def discriminative_param_groups(network: nn.Module, is_encoder, factor: float = ENCODER_LR_FACTOR) -> list[dict]:
    """Two parameter groups: the rest (decoder and head), ``lr_scale = 1``, first (nnU-Net logs the
    learning rate of group 0), then the encoder's (``is_encoder(name)``), ``lr_scale = factor``.
    Empty groups are left out."""
    encoder, rest = [], []
    for name, p in network.named_parameters():
        (encoder if is_encoder(name) else rest).append(p)
    groups = [{"params": rest, "lr_scale": 1.0, "name": "decoder_and_head"},
              {"params": encoder, "lr_scale": float(factor), "name": "encoder"}]
    return [g for g in groups if g["params"]]


class ScaledWarmupPolyLRScheduler(WarmupPolyLRScheduler):
    """The trainers' warm-up + poly schedule, each group at ``group['lr_scale']`` (default 1) x it."""

    def step(self, current_step: int | None = None) -> None:
        super().step(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
