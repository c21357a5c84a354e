"""Installs ``nnunet_acnorm_ext_trainers.pth`` into site-packages next to the package.

The metadata lives in pyproject.toml. A ``.pth`` file at the root of site-packages is processed at
every interpreter start; ours imports ``_nnunet_acnorm_env``, which appends the AC-Norm trainer
shim folder to ``nnUNet_extTrainer`` (so nnU-Net finds ``-tr nnUNetTrainerACNorm`` with no set-up
step). Like setuptools' own ``distutils-precedence.pth``, the file is copied into the build root
by ``build_py`` and so lands in the wheel's root.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_FILE = "nnunet_acnorm_ext_trainers.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable installs (pip install -e): export nnUNet_extTrainer, see docs/trainers.md
        target = os.path.join(self.build_lib, PTH_FILE)
        self.copy_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH_FILE), target,
                       preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_FILE))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
