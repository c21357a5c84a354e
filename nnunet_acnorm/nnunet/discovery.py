"""Where nnU-Net finds our trainers: the shim folder to list in ``nnUNet_extTrainer``.

nnU-Net >= 2.8 imports every module of every folder listed in ``nnUNet_extTrainer`` and takes the
first class with the requested name. The shim folder holds only modules that import our trainers
from the package, so nnU-Net gets the real classes (importable, picklable). After ``pip install``
the variable is extended at interpreter start by ``_nnunet_acnorm_env`` (installed with a ``.pth``
file); ``nnUNetv2_acnorm_trainer_path`` prints the folder for an explicit
``export nnUNet_extTrainer=$(nnUNetv2_acnorm_trainer_path)``.
"""
from __future__ import annotations

import os

ENV_VAR = "nnUNet_extTrainer"


def trainer_shim_folder() -> str:
    """Absolute path of the folder of shim modules for ``nnUNet_extTrainer``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")


def with_trainer_folder(value: str | None, folder: str | None = None) -> str:
    """``value`` (an ``os.pathsep`` list, may be empty/None) with ``folder`` appended once."""
    folder = trainer_shim_folder() if folder is None else folder
    parts = [p for p in (value or "").split(os.pathsep) if p]
    if os.path.normcase(os.path.abspath(folder)) not in {os.path.normcase(os.path.abspath(p)) for p in parts}:
        parts.append(folder)
    return os.pathsep.join(parts)
