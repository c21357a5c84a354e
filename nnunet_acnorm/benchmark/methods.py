"""The methods of a benchmark: nnU-Net trainer names, and short aliases for this package's trainers.

An alias is derived from the trainer's class name in the registry (:data:`nnunet_acnorm.nnunet.trainers.TRAINERS`,
which the fine-tuning baselines extend), so that every trainer the package ships has one and a new
trainer gets one by being registered:

==============================  =================================  ==============================
trainer                         alias                              pretrained weights
==============================  =================================  ==============================
``nnUNetTrainerFinetune``       ``vanilla``                        yes
``nnUNetTrainerACNorm_tau1``    ``acnorm_tau1``                    yes
``nnUNetTrainerACNormBN``       ``acnorm_BN``                      yes
``nnUNetTrainerACNorm_L2SP``    ``acnorm_l2sp``                    yes
``nnUNetTrainerDiscriminativeLR``  ``dlr``                         yes
``nnUNetTrainerFinetune_100epochs``  ``vanilla_100epochs``         yes
``nnUNetTrainerFinetune``       ``scratch`` (every ``vanilla*``    no: the same recipe and budget
                                alias has a ``scratch*`` twin)     from a random start
``nnUNetTrainerSPD``            ``spd``                            yes
``nnUNetTrainerPretrainedRecipe``  ``nnunet_recipe``               yes
``..PretrainedRecipe_fromScratch``  ``nnunet_recipe_scratch``      no: the class trains from a
                                                                   random start (``from_scratch``)
==============================  =================================  ==============================

Any other name is taken as an nnU-Net trainer class, found the way ``nnUNetv2_train`` finds it
(nnU-Net's own trainers, then the folders of ``nnUNet_extTrainer``), and trained with the
pretrained weights (except this package's ``from_scratch`` trainers). :func:`alias_table` lists every alias.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass

from nnunet_acnorm.errors import InputError

#: the part of a trainer name that names a method -> its alias (the rest of the name is kept)
METHOD_WORDS = {"Finetune": "vanilla", "ACNorm": "acnorm", "L2SP": "l2sp", "DELTA": "delta", "BSS": "bss",
                "LPFT": "lpft", "DiscriminativeLR": "dlr", "StochNorm": "stochnorm", "SPD": "spd",
                "PretrainedRecipe": "nnunet_recipe", "fromScratch": "scratch"}
TRAINER_PREFIX = "nnUNetTrainer"
#: aliases of the vanilla recipe have a twin that trains without pretrained weights
SCRATCH = ("vanilla", "scratch")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class UnknownMethodError(InputError):
    """A method is neither an alias nor a trainer nnU-Net can find."""


@dataclass(frozen=True)
class Method:
    """One method of the comparison: ``nnUNetv2_train -tr trainer`` with or without the pretrained weights.

    Args:
        name: the name in folders and tables (the alias, or the trainer name)
        trainer: the nnU-Net trainer class name
        pretrained: whether the runs get ``-pretrained_weights``
    """
    name: str
    trainer: str
    pretrained: bool = True


def alias_of(trainer: str) -> str | None:
    """The alias of one of this package's trainer names (``nnUNetTrainerACNormBN_tau1`` -> ``acnorm_BN_tau1``)."""
    if not trainer.startswith(TRAINER_PREFIX):
        return None
    head, *rest = trainer[len(TRAINER_PREFIX):].split("_")
    bn = head.endswith("BN") and head[:-2] in METHOD_WORDS
    head = head[:-2] if bn else head
    if head not in METHOD_WORDS:
        return None
    words = [METHOD_WORDS[head]] + (["BN"] if bn else []) + [METHOD_WORDS.get(w, w) for w in rest]
    return "_".join(words)


def _registry() -> dict:
    """Every trainer of this package by name, the schedule variants (``_1epoch``, ``_5epochs``, ...) included."""
    from nnunet_acnorm.nnunet import schedule_trainers  # noqa: F401 - registers the schedule variants
    from nnunet_acnorm.nnunet.trainers import TRAINERS

    return TRAINERS


def alias_table() -> dict[str, Method]:
    """Every alias -> its method, derived from the trainer registry (sorted by alias)."""
    TRAINERS = _registry()

    table = {}
    for trainer in TRAINERS:
        alias = alias_of(trainer)
        if alias is None:
            continue
        table[alias] = Method(alias, trainer, pretrained=takes_pretrained_weights(trainer))
        if alias.startswith(SCRATCH[0]):
            twin = SCRATCH[1] + alias[len(SCRATCH[0]):]
            table[twin] = Method(twin, trainer, pretrained=False)
    return dict(sorted(table.items()))


def takes_pretrained_weights(trainer: str) -> bool:
    """Whether a run of ``trainer`` gets ``-pretrained_weights``: yes, except this package's trainers that
    train from a random start by design (``from_scratch``, e.g. ``nnUNetTrainerPretrainedRecipe_fromScratch``,
    which refuse the option)."""
    cls = _registry().get(trainer)
    return not getattr(cls, "from_scratch", False)


def find_trainer_class(name: str, ext_trainer_path: str | None = None):
    """The trainer class ``nnUNetv2_train -tr name`` would use, or None: nnU-Net's own trainers first, then
    each folder of ``ext_trainer_path`` (``nnUNet_extTrainer``'s format), as nnU-Net's
    ``recursive_find_trainer_class_by_name`` searches, without its printing."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                        "nnunetv2.training.nnUNetTrainer", nnunetv2.__path__[0])
    for path in (ext_trainer_path or "").split(os.pathsep):
        if found is not None:
            break
        if path.strip() and os.path.isdir(path):
            found = recursive_find_python_class(path, name, None, base_folder=path,
                                                cleanup_imports_from_base_folder=True)
    return found


def trainer_exists(trainer: str, ext_trainer_path: str | None = None) -> bool:
    """Whether ``nnUNetv2_train -tr trainer`` finds an nnU-Net trainer class of that name."""
    TRAINERS = _registry()

    if trainer in TRAINERS:
        return True
    if not _NAME.fullmatch(trainer):
        return False
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cls = find_trainer_class(trainer, ext_trainer_path)
    return isinstance(cls, type) and issubclass(cls, nnUNetTrainer)


def resolve_method(token, ext_trainer_path: str | None = None, aliases: dict | None = None,
                   epochs: int | None = None) -> Method:
    """An alias or a trainer name (with ``epochs``: its ``_<epochs>epochs`` variant), or a :class:`Method` (a
    script's own name for a trainer), as a :class:`Method`; :class:`UnknownMethodError` if nnU-Net has no such
    trainer."""
    aliases = alias_table() if aliases is None else aliases
    if isinstance(token, Method):
        if not _METHOD_NAME.fullmatch(token.name):
            raise UnknownMethodError(f"method name {token.name!r}: use letters, digits and _ . + - only")
        if not trainer_exists(token.trainer, ext_trainer_path):
            raise UnknownMethodError(f"method {token.name}: nnU-Net finds no trainer class {token.trainer}")
        return token
    name = token if epochs is None else f"{token}_{epochs}epochs"
    if name in aliases:
        return aliases[name]
    if trainer_exists(name, ext_trainer_path):
        return Method(name, name, pretrained=takes_pretrained_weights(name))
    shown = f"-tr {token}" + (f" with --epochs {epochs}: no alias or trainer {name}" if epochs is not None else
                              ": no such alias, and nnU-Net finds no trainer class of that name")
    close = difflib.get_close_matches(name, list(aliases), n=4, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"aliases: {', '.join(list(aliases)[:8])}, ..."
    if epochs is not None:
        hint = f"subclass it with that schedule in a --trainer-folder, or {hint}"
    raise UnknownMethodError(f"{shown} (searched nnunetv2 and nnUNet_extTrainer={ext_trainer_path or ''}); {hint} "
                             "(nnUNetv2_acnorm_benchmark --list-methods)")


def resolve_methods(tokens: list, ext_trainer_path: str | None = None, epochs: int | None = None) -> list[Method]:
    """Every token as a :class:`Method`; two tokens for the same method, or two methods of one name, are refused."""
    aliases = alias_table()
    methods = [resolve_method(t, ext_trainer_path, aliases, epochs) for t in tokens]
    seen: dict = {}
    for m in methods:
        for key in ((m.trainer, m.pretrained), m.name):
            if key in seen:
                raise UnknownMethodError(f"-tr {seen[key]} and {m.name} are the same method ({m.trainer}"
                                         f"{'' if m.pretrained else ' without pretrained weights'}); give it once")
            seen[key] = m.name
    return methods
