"""Run at interpreter start by ``nnunet_acnorm_ext_trainers.pth`` (installed by ``pip install``).

Appends the folder of AC-Norm trainer shims to ``nnUNet_extTrainer`` (os.pathsep-separated, the
user's folders kept first, no duplicates), so that ``nnUNetv2_train -tr nnUNetTrainerACNorm`` finds
the trainer with no set-up step. Imports nothing but ``os``: it runs in every Python process.
"""
import os


def _append_trainer_folder():
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_acnorm", "nnunet", "nnunet_ext")
    if not os.path.isdir(folder):  # e.g. a source checkout without the package next to it
        return
    current = os.environ.get("nnUNet_extTrainer", "")
    parts = [p for p in current.split(os.pathsep) if p]
    if folder not in parts:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(parts + [folder])


try:
    _append_trainer_folder()
except Exception:  # never break interpreter start-up
    pass
