"""The one error type of nnunet-acnorm.

Every input the user can get wrong (a file, a folder, keys, shapes, options, NaNs) raises a subclass
of :class:`InputError` whose message names what is wrong and what to do. The console scripts
(:mod:`nnunet_acnorm.commands`) print it as one line, ``<command>: error: <message>``, and exit
with status 1 (argparse's own usage errors keep status 2). The subclasses only say where the error
comes from, so that library callers can catch one kind (e.g. a checkpoint that cannot be read).
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message says what is wrong and what to do."""
