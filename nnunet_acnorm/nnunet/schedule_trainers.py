"""Schedule lengths of every fine-tuning trainer, named as nnU-Net names its own
(``nnUNetTrainer_1epoch``, ``nnUNetTrainer_5epochs``, ...): ``nnUNetTrainerACNorm_1epoch``,
``nnUNetTrainerFinetune_20epochs``, ``nnUNetTrainerL2SP_5epochs``, ...

One idea, as nnU-Net's ``nnUNetTrainer_Xepochs``: a variant sets ``finetune_num_epochs`` and
nothing else (the warm-up is 10 % of it, the poly decay ends at it; iterations per epoch stay
nnU-Net's 250). The trainer name is the run's results folder, so runs of different lengths never
share one, and ``--c``, ``--val`` and ``nnUNetv2_predict -tr`` find the length by name.

Instead of a hand-written class per trainer and length, this module derives them, when it is
imported, for every fine-tuning trainer of the trainer modules it imports (:data:`BASE_MODULES`);
no trainer module imports this one. Each variant is a module-level class of this module
(``__module__``/``__qualname__`` set): importable, picklable, found by nnU-Net through the shim
``nnunet_ext/nnunet_acnorm_schedule_trainers.py``, and listed in the package's registry
(:mod:`~nnunet_acnorm.nnunet.trainer_registry`). A variant is equivalent to::

    class nnUNetTrainerACNorm_5epochs(nnUNetTrainerACNorm):
        finetune_num_epochs = 5
"""
from __future__ import annotations

import re

from nnunet_acnorm.nnunet import baseline_trainers, trainers
from nnunet_acnorm.nnunet.trainers import nnUNetTrainerFinetune

#: the trainer modules whose fine-tuning trainers get schedule variants
BASE_MODULES = (trainers, baseline_trainers)

#: the schedule lengths every fine-tuning trainer gets (nnU-Net ships 1, 5, 10, 20, 50, 100, 250,
#: 500, ...; 250 is the fine-tuning trainers' own default)
SCHEDULE_EPOCHS = (1, 5, 10, 20, 50, 100, 500)

_VARIANT_NAME = re.compile(r"_\d+epochs?$")


def schedule_name(trainer_name: str, epochs: int) -> str:
    """nnU-Net's naming: ``<trainer>_1epoch``, ``<trainer>_<n>epochs``."""
    return f"{trainer_name}_{epochs}epoch{'' if epochs == 1 else 's'}"


def schedule_variant(trainer: type, epochs: int) -> type:
    """``trainer`` with ``finetune_num_epochs = epochs``, as a class of this module."""
    name = schedule_name(trainer.__name__, epochs)
    return type(name, (trainer,), {"finetune_num_epochs": epochs, "__module__": __name__, "__qualname__": name,
                                   "__doc__": f"{trainer.__name__} with a {epochs}-epoch schedule."})


def has_schedule_variants(trainer: type) -> bool:
    """Whether ``trainer`` gets schedule variants: a fine-tuning trainer that is not itself one."""
    return issubclass(trainer, nnUNetTrainerFinetune) and not _VARIANT_NAME.search(trainer.__name__)


_BASES = {name: cls for module in BASE_MODULES for name, cls in module.TRAINERS.items()}
SCHEDULE_TRAINERS = {schedule_name(name, epochs): schedule_variant(trainer, epochs)
                     for name, trainer in sorted(_BASES.items()) if has_schedule_variants(trainer)
                     for epochs in SCHEDULE_EPOCHS}
globals().update(SCHEDULE_TRAINERS)
#: every trainer of this module, by name (as the other trainer modules' ``TRAINERS``)
TRAINERS = SCHEDULE_TRAINERS

__all__ = list(SCHEDULE_TRAINERS)
