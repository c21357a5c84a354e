"""Swap norms of any torch model for AC-Norm (``convert_to_acnorm``) and back (``fold_acnorm``).

Modules are replaced by object identity: every name under which a norm is registered (for
example ``.norm`` and ``.all_modules.1`` in dynamic-network-architectures blocks, or the
``decoder.encoder`` alias of the encoder) gets the same new module, so that forward() runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from nnunet_acnorm.norms.batched import batch_affines, unbatch_affines
from nnunet_acnorm.norms.functional import DEFAULT_DIAGONAL
from nnunet_acnorm.norms.modules import ACNORM_FOR_PLAIN, _ACBatchNorm, _ACNorm
from nnunet_acnorm.norms.torch_compat import RMS_NORM


#: what AC-Norm needs, and what to do instead, in the words every refusal uses
ACNORM_NEEDS = ("AC-Norm needs affine BatchNorm/InstanceNorm/GroupNorm layers (per-channel affines it keeps as the "
                "frozen source)")
WITHOUT_ACNORM = ("fine-tune it without AC-Norm: nnUNetTrainerFinetune (vanilla, same recipe) for a network nnU-Net "
                  "builds, or the network's own training code")
#: norm classes that normalise over features (per token or position), not per channel
FEATURE_NORM_NAMES = ("layernorm", "rmsnorm")


def is_feature_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm and their relatives (e.g. dynamic-network-architectures' LayerNormNd)."""
    if isinstance(module, (nn.LayerNorm,) + ((RMS_NORM,) if RMS_NORM is not None else ())):
        return True
    return next(module.children(), None) is None and any(n in type(module).__name__.lower()
                                                         for n in FEATURE_NORM_NAMES)


def not_applicable(feature_norms: int, what: str = "the model") -> str:
    """The line for a model in which AC-Norm has nothing to convert."""
    found = (f"{what} has {feature_norms} LayerNorm/RMSNorm layer(s), which normalise over features, not channels, "
             "and no affine BatchNorm/InstanceNorm/GroupNorm" if feature_norms else
             f"{what} has no affine BatchNorm/InstanceNorm/GroupNorm layer")
    return f"AC-Norm cannot apply: {found}; {ACNORM_NEEDS}; {WITHOUT_ACNORM}"


@dataclass
class ConversionReport:
    """What a conversion did: module names (first registered name) and, for the rest, why.
    ``feature_norms``: LayerNorm/RMSNorm layers found (left as they are); ``excluded``: convertible
    norms left plain because ``include`` did not accept them."""

    converted: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    feature_norms: int = 0
    excluded: int = 0

    @property
    def applicable(self) -> bool:
        """Whether the model has anything AC-Norm can convert (False: AC-Norm cannot apply to it)."""
        return bool(self.converted) or bool(self.excluded)

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} norm layer(s) converted"]
        lines += [f"  left as is: {name} ({why})" for name, why in self.left.items()]
        if not self.applicable:
            lines.append(not_applicable(self.feature_norms))
        return "\n".join(lines)


def _replace_modules(model: nn.Module, replacement_for: Callable[[str, nn.Module], nn.Module | None]
                     ) -> list[str]:
    """Replace every module for which ``replacement_for(name, module)`` gives a new one, under all
    of its names. Returns the first name of each replaced module."""
    names_of: dict[int, list[tuple[nn.Module, str, str]]] = {}
    modules: dict[int, tuple[str, nn.Module]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            names_of.setdefault(id(child), []).append((parent, child_name, full))
            modules.setdefault(id(child), (full, child))
    replaced = []
    for key, (name, module) in modules.items():
        new = replacement_for(name, module)
        if new is None:
            continue
        for parent, child_name, _ in names_of[key]:
            setattr(parent, child_name, new)
        replaced.append(name)
    return replaced


def _why_not_convertible(module: nn.Module) -> str | None:
    """None for a convertible norm; a reason for a norm that stays; '' for a non-norm."""
    if isinstance(module, _ACNorm):
        return "already AC-Norm"
    if type(module) in ACNORM_FOR_PLAIN:
        if not getattr(module, "affine", False):
            return "no affine parameters (affine=False): nothing to collaborate"
        return None
    if isinstance(module, nn.SyncBatchNorm):
        return ("SyncBatchNorm: convert the model before the DDP set-up, then call "
                "acnorm_sync_batchnorm")
    if is_feature_norm(module):
        return f"{type(module).__name__} normalises over features, not channels: not supported"
    if "norm" in type(module).__name__.lower() and next(module.children(), None) is None:
        return (f"unknown norm type {type(module).__module__}.{type(module).__name__}: replace it by "
                "a torch.nn BatchNorm/InstanceNorm/GroupNorm first")
    return ""


def convert_to_acnorm(model: nn.Module, tau: float | str = 1.0, set_source: bool = True,
                      tau_diagonal: float = DEFAULT_DIAGONAL,
                      include: Callable[[str], bool] | None = None) -> ConversionReport:
    """Replace, in place, every affine BatchNorm/InstanceNorm/GroupNorm of ``model`` by its AC-Norm.

    The target affines (and running statistics) are copies of the current ones. With
    ``set_source=True`` the current affines also become the frozen source (the model holds the
    pretrained weights); with ``set_source=False`` the source is taken from the next state dict
    loaded (build first, then load a pretrained checkpoint). ``tau``: a fixed temperature (the
    paper's 1.0) or ``"auto"``, a temperature per layer calibrated from its source affines so that
    the mean step-0 diagonal of the correlation is ``tau_diagonal`` (``functional.calibrated_tau``).
    It also installs, on ``model``, the hooks that compute the affines of all its AC-Norm layers in
    one call per forward on CPU (``norms.batched``; the same values as one call per layer).
    ``include(name)``: convert only the norms whose (first registered) module name it accepts, e.g.
    the encoder's; the others stay plain norms and are listed in the report. A model with nothing to
    convert gets a report that says AC-Norm cannot apply (LayerNorm-only transformers, for example).
    """
    if type(model) in ACNORM_FOR_PLAIN:
        raise TypeError(f"convert_to_acnorm replaces submodules; for a bare {type(model).__name__} "
                        f"use {ACNORM_FOR_PLAIN[type(model)].__name__}.from_norm(norm)")
    report = ConversionReport()

    def replacement(name: str, module: nn.Module) -> nn.Module | None:
        why = _why_not_convertible(module)
        if why is None and include is not None and not include(name):
            why = "outside the part to convert (include)"
            report.excluded += 1
        if why is None:
            return ACNORM_FOR_PLAIN[type(module)].from_norm(module, tau=tau, set_source=set_source,
                                                            tau_diagonal=tau_diagonal)
        if why:
            report.left[name] = why
            report.feature_norms += is_feature_norm(module)
        return None

    report.converted = _replace_modules(model, replacement)
    if any(isinstance(m, _ACNorm) for m in model.modules()):
        batch_affines(model)  # on CPU, one affine call per forward for all layers (norms.batched)
    return report


def fold_acnorm(model: nn.Module) -> list[str]:
    """Replace, in place, every AC-Norm by the plain norm with its recalibrated affine.

    The result has exactly the original architecture and computes, in eval mode, the same
    outputs; its state dict loads strictly into the unmodified model, and the hooks that
    :func:`convert_to_acnorm` installed (``norms.batched``) are removed. Returns the folded names.
    """
    folded = _replace_modules(model, lambda name, m: m.to_plain() if isinstance(m, _ACNorm) else None)
    if not any(isinstance(m, _ACNorm) for m in model.modules()):
        for module in model.modules():   # the hooks of convert_to_acnorm, also on a converted submodule
            unbatch_affines(module)
    return folded


def acnorm_sync_batchnorm(model: nn.Module, process_group=None) -> int:
    """Synchronise the batch statistics of every AC-BatchNorm across DDP ranks (the AC-Norm
    counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm``). Returns how many were switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, _ACBatchNorm):
            module.sync_batch_stats = True
            module.process_group = process_group
            count += 1
    return count


def acnorm_modules(model: nn.Module) -> dict[str, _ACNorm]:
    """Every AC-Norm of ``model`` under its first registered name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _ACNorm)}
