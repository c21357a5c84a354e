"""AC-Norm modules: thin state around one fused normalization call.

Each module holds

- the *target* affines as its trainable parameters ``weight`` and ``bias`` (the names of the
  plain norm, so optimizers, weight-decay rules and plain state dicts see what they expect);
- the *source* affines as the frozen buffers ``source_weight`` and ``source_bias``.

The source is "not set" on a freshly built module. It is set by loading a state dict (a plain
norm's state dict sets source and target to the same values: this is how pretrained weights
arrive), by :meth:`_ACNorm.set_source`, or, failing both, by the first forward pass in training
mode (the affines the layer holds when fine-tuning starts). While it is not set the module's
state dict holds only the plain norm's keys, so loaders that demand every key of the network
(nnU-Net's ``-pretrained_weights``) accept a plain checkpoint of the same architecture.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_acnorm.norms.device_policy import SORTED_NUMPY, affine_path
from nnunet_acnorm.norms.functional import (DEFAULT_DIAGONAL, calibrated_tau, recalibrated_affine,
                                            sparse_correlation)
from nnunet_acnorm.norms.torch_compat import is_compiling

SOURCE_KEYS = ("source_weight", "source_bias")
#: the ``__dict__`` key of (weight, bias, grad mode) that the running network forward prepared for
#: a layer together with its other layers (``norms.batched``)
PREPARED_AFFINE_KEY = "_prepared_affine"
#: ``tau=AUTO_TAU``: a per-layer temperature calibrated from the source affines (functional.calibrated_tau)
AUTO_TAU = "auto"
#: the temperature a calibrated layer uses where calibration is impossible (near-constant source
#: indicators) and before its source is set: the paper's
FALLBACK_TAU = 1.0


class _ACNorm(nn.Module):
    """Shared state and logic of every AC-Norm type; subclasses define :meth:`_normalize`."""

    #: the plain norm class this AC-Norm replaces and folds back into
    plain_norm_class: type[nn.Module]
    #: True: a state dict must hold this layer's source affines (a plain one is an error). The
    #: nnU-Net trainers build their networks strict; only -pretrained_weights turns it off
    #: (nnunet_acnorm.nnunet.pretrained.set_strict_source)
    strict_source: bool = False

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, tau: float | str = 1.0,
                 device=None, dtype=None, tau_diagonal: float = DEFAULT_DIAGONAL) -> None:
        super().__init__()
        if not affine:
            raise ValueError(
                f"{type(self).__name__} needs affine parameters (affine=True): a norm without them has "
                f"nothing to collaborate. Keep the plain {self.plain_norm_class.__name__} for it.")
        self.tau_mode, self.tau = _check_tau(type(self).__name__, tau)
        if not 0.0 < tau_diagonal < 1.0:
            raise ValueError(f"{type(self).__name__}: tau_diagonal must be in (0, 1), got {tau_diagonal}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = True
        #: calibrated temperatures: the mean step-0 diagonal of A they aim at
        self.tau_diagonal = float(tau_diagonal)
        #: calibrated temperatures: False where the source indicators are near-constant (tau = FALLBACK_TAU)
        self.tau_calibrated = False
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("source_weight", torch.ones(num_features, **factory), persistent=False)
        self.register_buffer("source_bias", torch.zeros(num_features, **factory), persistent=False)
        self.source_is_set = False
        #: eval mode: the recalibrated affine of the current parameter version (see _eval_affine)
        self._affine_cache = None
        #: the sorted path's source-only state (functional.recalibrated_affine(layout_cache=...))
        self._layout_cache = {}

    # -- source affines ----------------------------------------------------------------------
    @torch.no_grad()
    def set_source(self, weight: Tensor | None = None, bias: Tensor | None = None) -> None:
        """Freeze ``weight``/``bias`` (default: the current target affines) as the source."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        for what, value in (("source weight", weight), ("source bias", bias)):
            if tuple(value.shape) != (self.num_features,):
                raise ValueError(f"{type(self).__name__}: {what} has shape {tuple(value.shape)}, "
                                 f"expected ({self.num_features},)")
            _check_finite(value, f"{type(self).__name__} {what}")
        self.source_weight.copy_(weight)
        self.source_bias.copy_(bias)
        self.clear_affine_cache()
        self._mark_source(is_set=True)
        self._calibrate_tau()

    def _mark_source(self, is_set: bool) -> None:
        self.clear_affine_cache()
        # the buffers exist from the start (devices, DDP); only a set source is saved
        for key in SOURCE_KEYS:
            self.register_buffer(key, getattr(self, key), persistent=is_set)
        self.source_is_set = is_set

    def _calibrate_tau(self) -> None:
        """``tau="auto"``: set the temperature from the (just set) source affines; a function of the
        source alone, so a checkpoint that restores the source restores the temperature exactly."""
        if self.tau_mode != AUTO_TAU:
            return
        tau = calibrated_tau(self.source_weight, self.source_bias, self.tau_diagonal)
        self.tau_calibrated = tau is not None
        self.tau = FALLBACK_TAU if tau is None else tau

    def sparse_correlation(self) -> Tensor:
        """The current S (C x C, no gradient): rows target channels, columns source channels."""
        return sparse_correlation(*self._source(), self.weight, self.bias, self.tau)

    def recalibrated_affine(self) -> tuple[Tensor, Tensor]:
        """((I + S) gamma_t, (I + S) beta_t): the affine the fused call applies. The NumPy sorted
        path keeps the frozen source's layout in the layer (never under torch.compile, whose older
        versions cannot trace a module's ``__dict__``: its path is another)."""
        cache = None
        if self.source_is_set and affine_path(self.num_features, self.weight.device, is_compiling()) == SORTED_NUMPY:
            cache = self.__dict__.setdefault("_layout_cache", {})
        return recalibrated_affine(*self._source(), self.weight, self.bias, self.tau, layout_cache=cache)

    def _source(self) -> tuple[Tensor, Tensor]:
        if self.source_is_set:
            return self.source_weight, self.source_bias
        return self.weight, self.bias  # until it is set, the source is the current affine

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        if self.training and not self.source_is_set:
            warnings.warn(f"{type(self).__name__}: training started before any source affines were "
                          "loaded; the current affines become the frozen source. Load pretrained "
                          "weights first: AC-Norm needs a pretrained source.", stacklevel=2)
            self.set_source()
        # (never prepared under torch.compile, whose older versions cannot trace a module's __dict__)
        prepared = None if is_compiling() else self.__dict__.get(PREPARED_AFFINE_KEY)
        if prepared is not None and prepared[2] == torch.is_grad_enabled():
            weight, bias = prepared[0], prepared[1]   # computed with the network's other layers (norms.batched)
        elif self.needs_affine_graph():
            weight, bias = self.recalibrated_affine()
        else:
            weight, bias = self._eval_affine()
        return self._normalize(input, weight, bias)

    def needs_affine_graph(self) -> bool:
        """Whether this forward computes the affine in the autograd graph (training, or gradients
        wanted for the affines, or under torch.compile) rather than from the eval-mode cache."""
        return self.training or (torch.is_grad_enabled() and (self.weight.requires_grad or self.bias.requires_grad)) \
            or is_compiling()

    # -- free inference --------------------------------------------------------------------------
    def _affine_key(self) -> tuple:
        """What the recalibrated affine depends on: the four affine tensors themselves (held by the
        cache, so that their memory cannot be reused by others), their data pointers (``.data``
        reassignment), version counters (bumped by every in-place update: optimizer steps,
        ``load_state_dict``, ``copy_`` under no_grad, torch.nn.init), dtypes and devices; the
        temperature, whether the source is set, and inference mode."""
        tensors = (self.weight, self.bias, self.source_weight, self.source_bias)
        key = [self.tau, self.source_is_set, torch.is_inference_mode_enabled()]
        for t in tensors:
            key += (id(t), t.data_ptr(), t._version, t.dtype, t.device)
        return tensors, tuple(key)

    def _eval_affine(self) -> tuple[Tensor, Tensor]:
        """The recalibrated affine when no gradient is needed (eval mode): computed once per
        parameter version and reused, so that an unfolded AC-Norm predicts at a plain norm's cost.

        Limitation: an in-place update through ``.data`` (``layer.weight.data.mul_(2)``) bypasses
        the version counter; call :meth:`clear_affine_cache` after one (torch.nn.init, optimizers,
        ``load_state_dict``, ``.to()`` and ``set_source`` are all seen)."""
        tensors, key = self._affine_key()
        cache = getattr(self, "_affine_cache", None)
        if cache is None or cache[1] != key:
            with torch.no_grad():
                weight, bias = self.recalibrated_affine()
            self._affine_cache = cache = (tensors, key, weight, bias)
        return cache[2], cache[3]

    def clear_affine_cache(self) -> None:
        """Forget the cached eval-mode affine (it is recomputed at the next eval forward) and the
        sorted path's cached source layout."""
        self._affine_cache = None
        self.__dict__["_layout_cache"] = {}

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half(), ...: new tensors (the key would see them too; this frees the old)
        self.clear_affine_cache()
        return super()._apply(fn, *args, **kwargs)

    def _normalize(self, input: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        raise NotImplementedError

    # -- conversion ----------------------------------------------------------------------------
    def _plain_kwargs(self) -> dict:
        return {"num_features": self.num_features, "eps": self.eps}

    @classmethod
    def _kwargs_from_plain(cls, norm: nn.Module) -> dict:
        return {"num_features": norm.num_features, "eps": norm.eps}

    @classmethod
    def from_norm(cls, norm: nn.Module, tau: float | str = 1.0, set_source: bool = True,
                  tau_diagonal: float = DEFAULT_DIAGONAL) -> "_ACNorm":
        """The AC-Norm twin of a plain ``norm``: target = a copy of its state, source = its affines
        (or left unset with ``set_source=False``, to be filled by the pretrained weights)."""
        ref = norm.weight
        module = cls(**cls._kwargs_from_plain(norm), tau=tau, device=ref.device, dtype=ref.dtype,
                     tau_diagonal=tau_diagonal)
        module.load_state_dict(norm.state_dict(), strict=True)  # also sets the source
        if not set_source:
            module._mark_source(is_set=False)
        module.train(norm.training)
        return module

    @torch.no_grad()
    def to_plain(self) -> nn.Module:
        """The plain norm with weight (I+S) gamma_t and bias (I+S) beta_t: equal at inference."""
        ref = self.weight
        plain = self.plain_norm_class(**self._plain_kwargs(), affine=True, device=ref.device,
                                      dtype=ref.dtype)
        weight, bias = self.recalibrated_affine()
        state = {k: v for k, v in self.state_dict().items() if k not in SOURCE_KEYS}
        state.update(weight=weight.detach().clone(), bias=bias.detach().clone())
        plain.load_state_dict(state, strict=True)
        plain.train(self.training)
        return plain

    # -- state dict ----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self.clear_affine_cache()
        n_errors = len(error_msgs)
        for key, value in state_dict.items():
            if key.startswith(prefix) and "." not in key[len(prefix):] and value.is_floating_point() \
                    and not torch.isfinite(value).all():
                error_msgs.append(f"{key} contains NaN or infinite values: the checkpoint is "
                                  "corrupted or comes from a diverged run; load another one.")
        has_source = all(prefix + key in state_dict for key in SOURCE_KEYS)
        if self.strict_source and not has_source and (prefix + "weight" in state_dict or prefix + "bias" in state_dict):
            error_msgs.append(f"{prefix}source_weight/source_bias are missing: this AC-Norm layer needs its frozen "
                              "source affines; the checkpoint was stripped or is not one of an AC-Norm trainer "
                              "(plain checkpoints are for nnUNetv2_train -pretrained_weights only)")
            return
        was_set = self.source_is_set
        if has_source:
            self._mark_source(is_set=True)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if has_source:
            if len(error_msgs) > n_errors and not was_set:
                self._mark_source(is_set=False)  # a failed load leaves the source as it was
            elif len(error_msgs) == n_errors:
                self._calibrate_tau()
            return
        # a plain norm's state dict: its affines become both source and target
        for key in SOURCE_KEYS:
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
        weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
        if weight is not None and bias is not None and len(error_msgs) == n_errors:
            self.set_source(weight, bias)

    def extra_repr(self) -> str:
        source = "set" if self.source_is_set else "not set"
        tau = f"{self.tau:.4g}"
        if self.tau_mode == AUTO_TAU:
            state = "calibrated" if self.tau_calibrated else "not calibrated"
            tau = f"auto ({tau}, {state}, diagonal {self.tau_diagonal})"
        return f"{self.num_features}, eps={self.eps}, tau={tau}, source={source}"


def describe_temperatures(layers) -> str:
    """One line on the temperatures of AC-Norm ``layers``: fixed value(s), or the calibrated range."""
    layers = list(layers)
    fixed = sorted({m.tau for m in layers if m.tau_mode != AUTO_TAU})
    auto = [m for m in layers if m.tau_mode == AUTO_TAU]
    parts = []
    if fixed:
        parts.append(f"fixed tau = {', '.join(f'{t:g}' for t in fixed)}")
    if auto:
        taus = [m.tau for m in auto if m.tau_calibrated]
        text = f"calibrated per layer (mean step-0 diagonal {auto[0].tau_diagonal:g})"
        if taus:
            text += f": tau {min(taus):.3g} .. {max(taus):.3g} in {len(taus)} layer(s)"
        missing = len(auto) - len(taus)
        if missing:
            text += (f"; {missing} layer(s) with near-constant source indicators (untrained affines?) "
                     f"use tau = {FALLBACK_TAU:g}")
        parts.append(text)
    return "; ".join(parts) or "no AC-Norm layer"


def _check_tau(owner: str, tau) -> tuple[str, float]:
    """(mode, initial temperature) for a ``tau`` argument: a number > 0 or ``"auto"``."""
    if isinstance(tau, str):
        if tau != AUTO_TAU:
            raise ValueError(f"{owner}: tau must be a number > 0 or {AUTO_TAU!r}, got {tau!r}")
        return AUTO_TAU, FALLBACK_TAU
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0 or tau != tau \
            or tau == float("inf"):
        raise ValueError(f"{owner}: the temperature tau must be > 0 (finite) or {AUTO_TAU!r}, got {tau}")
    return "fixed", float(tau)


def _check_finite(value: Tensor, what: str) -> None:
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise ValueError(f"{what} contains NaN or infinite values; AC-Norm cannot use it. "
                         "Check the pretrained checkpoint.")


class _ACNormWithRunningStats(_ACNorm):
    """Shared state of the norms that can track running statistics (BatchNorm, InstanceNorm)."""

    def __init__(self, num_features: int, eps: float, momentum: float | None, affine: bool,
                 track_running_stats: bool, tau: float | str, device, dtype,
                 tau_diagonal: float = DEFAULT_DIAGONAL) -> None:
        super().__init__(num_features, eps, affine, tau, device, dtype, tau_diagonal)
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _plain_kwargs(self) -> dict:
        return {**super()._plain_kwargs(), "momentum": self.momentum,
                "track_running_stats": self.track_running_stats}

    @classmethod
    def _kwargs_from_plain(cls, norm: nn.Module) -> dict:
        return {**super()._kwargs_from_plain(norm), "momentum": norm.momentum,
                "track_running_stats": norm.track_running_stats}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checkpoints written before torch 0.4.1 (and some re-saved ones) lack num_batches_tracked
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict and prefix + "running_mean" in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, momentum={self.momentum}, "
                f"track_running_stats={self.track_running_stats}")


class _ACBatchNorm(_ACNormWithRunningStats):
    """AC-Norm over batch statistics; running statistics updated once per training step.

    Not a subclass of ``torch.nn.modules.batchnorm._BatchNorm``, so that
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` (nnU-Net's DDP set-up) cannot replace it by a plain
    SyncBatchNorm. :func:`nnunet_acnorm.acnorm_sync_batchnorm` switches on synchronised
    statistics instead.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, tau: float | str = 1.0,
                 device=None, dtype=None, tau_diagonal: float = DEFAULT_DIAGONAL) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, tau, device, dtype,
                         tau_diagonal)
        self.sync_batch_stats = False
        self.process_group = None

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def _normalize(self, input: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        world_size = self._world_size() if self.training else 1
        if world_size > 1:  # the autograd function behind nn.SyncBatchNorm, with our affine
            return torch.nn.modules._functions.SyncBatchNorm.apply(
                input, weight, bias, running_mean, running_var, self.eps, factor,
                self.process_group or dist.group.WORLD, world_size)
        return F.batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats,
                            factor, self.eps)

    def _world_size(self) -> int:
        """Ranks to synchronise statistics over: 1 unless switched on, distributed and on a GPU."""
        if not (self.sync_batch_stats and dist.is_available() and dist.is_initialized()):
            return 1
        if self.weight.device.type == "cpu":
            warnings.warn("AC-BatchNorm: synchronised batch statistics need a GPU (as torch's "
                          "SyncBatchNorm does); on CPU each rank normalises with its own batch.")
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)


class ACBatchNorm1d(_ACBatchNorm):
    plain_norm_class = nn.BatchNorm1d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"ACBatchNorm1d expects 2D or 3D input (got {input.dim()}D)")


class ACBatchNorm2d(_ACBatchNorm):
    plain_norm_class = nn.BatchNorm2d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"ACBatchNorm2d expects 4D input (got {input.dim()}D)")


class ACBatchNorm3d(_ACBatchNorm):
    plain_norm_class = nn.BatchNorm3d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"ACBatchNorm3d expects 5D input (got {input.dim()}D)")


class _ACInstanceNorm(_ACNormWithRunningStats):
    """AC-Norm over per-sample, per-channel statistics (train and eval alike)."""

    #: input dims of a batched input
    batched_dim: int

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = False, tau: float | str = 1.0,
                 device=None, dtype=None, tau_diagonal: float = DEFAULT_DIAGONAL) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, tau, device, dtype,
                         tau_diagonal)

    def _normalize(self, input: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if input.dim() == self.batched_dim - 1:  # unbatched input
            return self._normalize(input.unsqueeze(0), weight, bias).squeeze(0)
        if input.dim() != self.batched_dim:
            raise ValueError(f"{type(self).__name__} expects {self.batched_dim}D input "
                             f"(or {self.batched_dim - 1}D unbatched), got {input.dim()}D")
        if input.size(1) != self.num_features:
            raise ValueError(f"{type(self).__name__} expects {self.num_features} channels at dim 1, "
                             f"got {input.size(1)}")
        use_input_stats = self.training or not self.track_running_stats
        momentum = 0.1 if self.momentum is None else self.momentum
        return F.instance_norm(input, self.running_mean, self.running_var, weight, bias,
                               use_input_stats, momentum, self.eps)

class ACInstanceNorm1d(_ACInstanceNorm):
    plain_norm_class = nn.InstanceNorm1d
    batched_dim = 3


class ACInstanceNorm2d(_ACInstanceNorm):
    plain_norm_class = nn.InstanceNorm2d
    batched_dim = 4


class ACInstanceNorm3d(_ACInstanceNorm):
    plain_norm_class = nn.InstanceNorm3d
    batched_dim = 5


class ACGroupNorm(_ACNorm):
    """AC-Norm over per-sample group statistics (train and eval alike)."""

    plain_norm_class = nn.GroupNorm

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 tau: float | str = 1.0, device=None, dtype=None,
                 tau_diagonal: float = DEFAULT_DIAGONAL) -> None:
        if num_channels % num_groups:
            raise ValueError(f"ACGroupNorm: num_channels ({num_channels}) must be divisible by "
                             f"num_groups ({num_groups})")
        super().__init__(num_channels, eps, affine, tau, device, dtype, tau_diagonal)
        self.num_groups = num_groups
        self.num_channels = num_channels

    def _plain_kwargs(self) -> dict:
        return {"num_groups": self.num_groups, "num_channels": self.num_channels, "eps": self.eps}

    @classmethod
    def _kwargs_from_plain(cls, norm: nn.Module) -> dict:
        return {"num_groups": norm.num_groups, "num_channels": norm.num_channels, "eps": norm.eps}

    def _normalize(self, input: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {super().extra_repr()}"


#: plain norm class -> AC-Norm class (exact types: subclasses may behave differently)
ACNORM_FOR_PLAIN: dict[type[nn.Module], type[_ACNorm]] = {
    cls.plain_norm_class: cls
    for cls in (ACBatchNorm1d, ACBatchNorm2d, ACBatchNorm3d, ACInstanceNorm1d, ACInstanceNorm2d,
                ACInstanceNorm3d, ACGroupNorm)
}
