"""Every nnU-Net trainer of this package, by name: the one registry (``nnUNetv2_acnorm_fold``, the
benchmark's aliases, the GPU check).

The trainer modules do not know each other's registries: each one lists its own classes in its
``TRAINERS``; :mod:`~nnunet_acnorm.nnunet.schedule_trainers` derives the schedule lengths of the
fine-tuning trainers of the modules before it; this module, above all of them, joins the lists.
A new trainer module goes into :data:`TRAINER_MODULES` (and, for schedule variants, into
``schedule_trainers.BASE_MODULES``). nnU-Net itself finds the classes by scanning the shim folder
(``nnunet_ext/``), one shim per trainer module, not through this registry.
"""
from __future__ import annotations

from nnunet_acnorm.nnunet import baseline_trainers, schedule_trainers, trainers

#: the trainer modules, in registry order: the fine-tuning trainers, the baselines, their schedule lengths
TRAINER_MODULES = (trainers, baseline_trainers, schedule_trainers)

#: every trainer class of the package by name, the schedule variants (``_1epoch``, ``_5epochs``, ...) included
TRAINERS: dict[str, type] = {name: cls for module in TRAINER_MODULES for name, cls in module.TRAINERS.items()}
