"""L2-SP (Li, Grandvalet, Davoine, ICML 2018, "Explicit inductive bias for transfer learning with
convolutional networks"): keep the fine-tuned weights near the pretrained starting point.

    Omega(w) = alpha / 2 * ||w_S - w0_S||^2  +  beta / 2 * ||w_new||^2

``w_S`` are the parameters that came from the pretrained network (``w0_S`` their pretrained
values, the *anchor*), ``w_new`` the parameters without a pretrained counterpart (the new head).
The paper's defaults alpha = beta = 0.01 (also those of the Transfer-Learning-Library). The
penalty replaces weight decay: a trainer using it sets the optimizer's weight decay to 0.

Every trainable parameter counts (convolutions, biases and norm affines alike). A parameter that
has no anchor is a new one: it gets the beta term, never a KeyError.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

L2SP_ALPHA = 0.01
L2SP_BETA = 0.01


def new_weights_penalty(params, beta: float) -> Tensor | float:
    """beta/2 ||w||^2 over ``params`` (weights without a pretrained value, e.g. a fresh head); 0 if beta is 0."""
    if not beta:
        return 0.0
    return 0.5 * beta * sum(p.float().pow(2).sum() for p in params)


def checked_anchor_parameters(network: nn.Module, anchor: dict[str, Tensor], method: str) -> dict[str, Tensor]:
    """The network's parameters by name, once ``anchor`` (pretrained values by parameter name) is
    checked against them: every name a parameter, every shape its shape; ValueError naming ``method``."""
    params = dict(network.named_parameters())
    unknown = sorted(set(anchor) - set(params))
    if unknown:
        raise ValueError(f"{method} anchor names {len(unknown)} parameter(s) the network does not have "
                         f"(first: '{unknown[0]}')")
    for name, value in anchor.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"{method} anchor of '{name}' has shape {tuple(value.shape)}, the parameter "
                             f"{tuple(params[name].shape)}")
    return params


class L2SPRegulariser(nn.Module):
    """The L2-SP penalty of ``network``'s trainable parameters.

    ``anchor``: parameter name -> pretrained value (a copy is kept, detached). Names of the
    network not in ``anchor`` are new parameters. The anchor lives here, not in the network's
    state dict: :meth:`state` / :meth:`from_state` carry it through a checkpoint entry, so
    prediction never needs it.
    """

    def __init__(self, network: nn.Module, anchor: dict[str, Tensor], alpha: float = L2SP_ALPHA,
                 beta: float = L2SP_BETA):
        super().__init__()
        params = checked_anchor_parameters(network, anchor, "L2-SP")
        self.alpha, self.beta = float(alpha), float(beta)
        self._network = [network]  # not a submodule: the network's state stays its own
        self.anchored_names = [n for n in params if n in anchor]
        self.new_names = [n for n in params if n not in anchor]
        self.anchor = {n: anchor[n].detach().clone().to(params[n].device) for n in self.anchored_names}

    @classmethod
    def from_network(cls, network: nn.Module, is_new=lambda name: False, **kwargs) -> "L2SPRegulariser":
        """Anchor at the network's current values, except parameters for which ``is_new(name)``."""
        anchor = {n: p.detach() for n, p in network.named_parameters() if not is_new(n)}
        return cls(network, anchor, **kwargs)

    def state(self) -> dict:
        """Plain tensors and numbers, for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {"alpha": self.alpha, "beta": self.beta,
                "anchor": {n: t.detach().cpu() for n, t in self.anchor.items()}}

    @classmethod
    def from_state(cls, network: nn.Module, state: dict, **overrides) -> "L2SPRegulariser":
        kwargs = {"alpha": state["alpha"], "beta": state["beta"], **overrides}
        return cls(network, state["anchor"], **kwargs)

    def forward(self) -> Tensor:
        params = dict(self._network[0].named_parameters())
        device = next(iter(params.values())).device
        total = torch.zeros((), device=device, dtype=torch.float32)
        if self.alpha:
            for name in self.anchored_names:
                p = params[name]
                if p.requires_grad:
                    total = total + 0.5 * self.alpha * (p.float() - self.anchor[name].float()).pow(2).sum()
        if self.beta:
            for name in self.new_names:
                p = params[name]
                if p.requires_grad:
                    total = total + 0.5 * self.beta * p.float().pow(2).sum()
        return total
