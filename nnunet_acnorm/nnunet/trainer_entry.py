"""The error boundary of the fine-tuning trainers: where an :class:`~nnunet_acnorm.errors.InputError`
becomes the one-line exit.

The package's own commands turn an ``InputError`` into ``<command>: error: <message>`` in
:func:`nnunet_acnorm.commands._cli.run_command`. The trainers run under ``nnUNetv2_train``, nnU-Net's
console script, which this package does not own; their boundary is the methods through which
nnU-Net (its console script, or a Python caller) enters a trainer, :data:`ENTRY_METHODS`. Every
fine-tuning trainer class gets them wrapped once (:func:`install_entry_boundary`, called by
``nnUNetTrainerFinetune.__init_subclass__``, so that a subclass's own overrides are wrapped too):
an ``InputError`` raised anywhere below ends the process with ``SystemExit("<trainer>: error:
<message>")``, which Python prints as that one line (exit status 1). The trainers' code below the
boundary raises ``InputError`` subclasses and clears up what a refused run wrote before raising.
"""
from __future__ import annotations

import functools

from nnunet_acnorm.errors import InputError

#: the trainer methods nnU-Net calls from outside (run_training.py: the constructor,
#: maybe_load_checkpoint, run_training, perform_actual_validation)
ENTRY_METHODS = ("__init__", "initialize", "load_checkpoint", "run_training", "perform_actual_validation")


def exits_on_input_error(method):
    """``method`` with an ``InputError`` turned into ``SystemExit("<trainer class>: error: <message>")``."""

    @functools.wraps(method)  # keeps the signature: nnU-Net records __init__'s arguments by name
    def entry(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except InputError as e:
            raise SystemExit(f"{type(self).__name__}: error: {e}") from None

    entry.input_error_boundary = True
    return entry


def install_entry_boundary(cls: type) -> type:
    """Wrap the :data:`ENTRY_METHODS` of ``cls`` (those it defines or inherits unwrapped) with
    :func:`exits_on_input_error`; one already wrapped is left as it is. Returns ``cls``."""
    for name in ENTRY_METHODS:
        method = getattr(cls, name, None)
        if method is not None and not getattr(method, "input_error_boundary", False):
            setattr(cls, name, exits_on_input_error(method))
    return cls


def check_plans_at_import() -> None:
    """The boundary of the trainer shims (``nnunet_ext/``), which ``nnUNetv2_train`` imports before it
    reads the plans: a missing ``-p`` plans file ends the process with one line."""
    from nnunet_acnorm.nnunet.training_guards import TrainingStartError, check_plans_file

    try:
        check_plans_file()
    except TrainingStartError as e:
        raise SystemExit(f"nnUNetv2_train: error: {e}") from None
