"""SPD, selective projection decay (Tian, Huang, Kira, NeurIPS 2024, "Rethinking weight decay for
robust fine-tuning of foundation models"): an L2-SP-like pull toward the pretrained weights, applied
after the optimiser's step and only to the layers for which it is selected.

For every parameter tensor ("layer": a weight and a bias are two, as in the authors' optimiser),
with ``w0`` its value at the start of fine-tuning (the *anchor*), ``w`` its value before the step,
``g`` its gradient and ``w~`` the value the optimiser's own step gave::

    c     = -g . (w - w0)                                  (selection: c < 0)
    r     = clip((||w~ - w0|| - ||w - w0||) / ||w~ - w0||, 0, 1)
    w_new = w~ - lambda * r * (w~ - w0)    if c < 0,   else   w_new = w~

``c < 0``: the gradient points along the displacement from the anchor, so the descent direction
leads back toward the pretrained weights: the progress made in this layer so far is not
consistent with the loss any more, and the layer is pulled back. ``r`` (the paper's deviation
ratio) is the part of the new displacement that this step added; with ``lambda = 1`` the selected
layer is projected back onto the sphere of its previous distance to the anchor (its displacement
does not grow), ``lambda < 1`` keeps part of the growth. Layers not selected move freely. The rule
runs after any optimiser's step (here nnU-Net's SGD with Nesterov momentum; the paper's is Adam),
through the optimiser's step hooks: a step that ``GradScaler`` skips (inf/NaN gradients) is not
projected either. It replaces weight decay: a trainer using it sets the optimiser's weight decay to 0.

Anchor: every trainable parameter at the start of fine-tuning, the new ones (a fresh head,
a fresh decoder) at their initialisation, as the authors' optimiser is used (a copy of every
parameter it optimises).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nnunet_acnorm.finetuning.l2sp import checked_anchor_parameters

#: the strength lambda, our default (the paper tunes it per benchmark: docs/baselines.md): at 1 a
#: selected layer's displacement from the pretrained weights does not grow
SPD_LAMBDA = 1.0


class SelectiveProjectionDecay:
    """SPD on ``network``'s parameters, anchored at ``anchor`` (name -> value; a copy is kept).

    :meth:`attach` hooks it to an optimiser: before each step the selection ``c < 0`` and the
    displacement norm ``||w - w0||`` are computed from the gradients (no host synchronisation),
    after the step the selected layers are projected. Parameters without a gradient in a step are
    left alone. The anchor lives here, not in the network's state dict: :meth:`state` /
    :meth:`from_state` carry it through a checkpoint entry, so prediction never needs it.
    """

    def __init__(self, network: nn.Module, anchor: dict[str, Tensor], strength: float = SPD_LAMBDA):
        params = checked_anchor_parameters(network, anchor, "SPD")
        if not strength >= 0:
            raise ValueError(f"SPD strength (lambda) must be >= 0, got {strength}")
        self.strength = float(strength)
        self._network = [network]  # not owned: the network's state stays its own
        self.anchored_names = [n for n in params if n in anchor]
        self.anchor = {n: anchor[n].detach().clone().to(device=params[n].device, dtype=params[n].dtype)
                       for n in self.anchored_names}
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        #: selected and projected layer-steps since :meth:`take_counts` (tensors: no synchronisation per step)
        self._selected = self._seen = None
        self._handles: list = []

    @classmethod
    def from_network(cls, network: nn.Module, **kwargs) -> "SelectiveProjectionDecay":
        """Anchor every trainable parameter at its current value."""
        return cls(network, {n: p.detach() for n, p in network.named_parameters() if p.requires_grad}, **kwargs)

    def state(self) -> dict:
        """Plain tensors and numbers, for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {"strength": self.strength, "anchor": {n: t.detach().cpu() for n, t in self.anchor.items()}}

    @classmethod
    def from_state(cls, network: nn.Module, state: dict, **overrides) -> "SelectiveProjectionDecay":
        return cls(network, state["anchor"], **{"strength": state["strength"], **overrides})

    # -- the update rule ---------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Selection and displacement norm of every anchored parameter that has a gradient (call
        right before ``optimizer.step()``, after any gradient clipping / unscaling)."""
        params = dict(self._network[0].named_parameters())
        self._pending = []
        for name in self.anchored_names:
            p = params[name]
            if p.grad is None or not p.requires_grad:
                continue
            anchor = self.anchor[name]
            displacement = p.detach().float() - anchor.float()
            selected = (p.grad.float() * displacement).sum() > 0  # c = -g.(w - w0) < 0
            self._pending.append((p, anchor, selected, displacement.norm()))

    @torch.no_grad()
    def after_step(self) -> None:
        """Project the selected parameters (call right after ``optimizer.step()``)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        projected = []
        for p, anchor, selected, previous in pending:
            displacement = p.detach().float() - anchor.float()
            norm = displacement.norm()
            ratio = ((norm - previous) / torch.where(norm > 0, norm, torch.ones_like(norm))).clamp(0.0, 1.0)
            scale = self.strength * ratio * selected
            p.sub_((scale * displacement).to(p.dtype))
            projected.append(selected & (ratio > 0))
        counts = torch.stack(projected).sum()
        self._selected = counts if self._selected is None else self._selected + counts
        self._seen = len(pending) + (self._seen or 0)

    def take_counts(self) -> tuple[int, int]:
        """(layer-steps projected, layer-steps seen) since the last call (one synchronisation)."""
        selected, seen = self._selected, self._seen or 0
        self._selected = self._seen = None
        return (int(selected.item()) if selected is not None else 0), seen

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run :meth:`before_step` / :meth:`after_step` around every ``optimizer.step()``."""
        self.detach()
        self._handles = [optimizer.register_step_pre_hook(lambda *_: self.before_step()),
                         optimizer.register_step_post_hook(lambda *_: self.after_step())]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
