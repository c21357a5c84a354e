"""One recalibrated-affine call per network forward, for all AC-Norm layers of a CPU network.

The recalibrated affine of a layer is a handful of vector operations on C channels. At the channel
counts of real networks (ResNet-50: 53 layers of 64 to 2048 channels) its cost on CPU is the fixed
cost of each call (some 40 NumPy/torch operations per layer), not the arithmetic. The sorted
path's NumPy implementation works on several layers at once as flat segments (``_sorted_numpy``),
bit-identical to one call per layer; this module makes use of it: a forward pre-hook on the
network computes the affines of all its AC-Norm layers that need one in the autograd graph in a
single call (``functional._SortedRecalibratedAffines``) and hands each layer its own; a forward
hook (also run when the forward raises) takes them back. Every layer then runs its fused
normalization with that affine.

Which layers take part, at each forward: those with their source set, that compute their affine
in the graph (``_ACNorm.needs_affine_graph``: training, or gradients wanted), and for which
``device_policy.affine_path(..., batched=True)`` picks ``BATCHED`` (on the CPU, outside
torch.compile, which traces the per-layer torch implementation instead). All other layers, and
any layer called outside its network's forward, compute their own affine as before (eval mode
uses its cache). A batched layer always takes the sorted path, whatever its C (the per-layer
``method="auto"`` takes the dense one below ``SORTED_MIN_CHANNELS``): the same S, computed in
float64 instead of the parameters' precision.

:func:`convert_to_acnorm` installs the hooks on the model it converts (:func:`batch_affines`);
:func:`fold_acnorm` removes them once no AC-Norm layer is left. The hooks are module-level
functions holding no state: a deepcopy or a pickle of the network carries them.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_acnorm.norms.device_policy import BATCHED, affine_path
from nnunet_acnorm.norms.functional import _SortedRecalibratedAffines
from nnunet_acnorm.norms.modules import PREPARED_AFFINE_KEY, _ACNorm
from nnunet_acnorm.norms.torch_compat import is_compiling

#: the network's ``__dict__`` keys: the layout cache of its layers' sources, and the stack of the
#: layer lists each running forward prepared (nested and re-entrant calls each take back their own)
_LAYOUT_KEY, _PREPARED_KEY = "_acnorm_batched_layout", "_acnorm_batched_prepared"


def _batchable(layer: _ACNorm, compiling: bool) -> bool:
    return affine_path(layer.num_features, layer.weight.device, compiling, batched=True) == BATCHED \
        and layer.source_is_set and PREPARED_AFFINE_KEY not in layer.__dict__ and layer.needs_affine_graph()


def _prepare_affines(network: nn.Module, args) -> None:
    """Forward pre-hook: the affines of the network's batchable AC-Norm layers, in one call."""
    prepared = network.__dict__.setdefault(_PREPARED_KEY, [])
    layers = []
    prepared.append(layers)
    compiling = is_compiling()
    if compiling or not (network.training or torch.is_grad_enabled()):
        return   # (inference: the layers use their eval caches; a layer in training mode its own call;
        #          under torch.compile affine_path batches no layer, and nothing here need be traced)
    candidates = [m for m in network.modules() if isinstance(m, _ACNorm) and _batchable(m, compiling)]
    if len(candidates) < 2:
        return
    cache = network.__dict__.setdefault(_LAYOUT_KEY, {})
    taus = tuple(float(m.tau) for m in candidates)
    tensors = [m.source_weight for m in candidates] + [m.source_bias for m in candidates] + \
        [m.weight for m in candidates] + [m.bias for m in candidates]
    affines = _SortedRecalibratedAffines.apply(taus, cache, *tensors)
    grad_mode = torch.is_grad_enabled()
    n = len(candidates)
    for k, layer in enumerate(candidates):
        layer.__dict__[PREPARED_AFFINE_KEY] = (affines[k], affines[n + k], grad_mode)
        layers.append(layer)


def _release_affines(network: nn.Module, args, output) -> None:
    """Forward hook (always called): the layers prepared by this forward compute their own again."""
    prepared = network.__dict__.get(_PREPARED_KEY)
    if prepared:
        for layer in prepared.pop():
            layer.__dict__.pop(PREPARED_AFFINE_KEY, None)


def batch_affines(network: nn.Module) -> None:
    """Install the hooks on ``network`` (once; idempotent)."""
    if _prepare_affines not in network._forward_pre_hooks.values():
        network.register_forward_pre_hook(_prepare_affines)
        network.register_forward_hook(_release_affines, always_call=True)


def unbatch_affines(network: nn.Module) -> None:
    """Remove the hooks of :func:`batch_affines` and their caches from ``network``."""
    for hooks, hook in ((network._forward_pre_hooks, _prepare_affines), (network._forward_hooks, _release_affines)):
        for handle_id in [key for key, value in hooks.items() if value is hook]:
            del hooks[handle_id]
            getattr(network, "_forward_hooks_always_called", {}).pop(handle_id, None)
    for key in (_LAYOUT_KEY, _PREPARED_KEY):
        network.__dict__.pop(key, None)
