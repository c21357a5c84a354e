"""A regular (non-editable) ``pip install`` makes nnU-Net find the AC-Norm trainers with no set-up step.

The test builds a fresh venv, makes the running environment's packages (nnU-Net, torch) visible in
it through a plain path file (so none of that environment's start-up hooks, such as an editable
install of this project, run), installs this repository into it with pip, non-editable and
without dependencies, and checks from a new interpreter, with nnUNet_extTrainer unset, that
nnU-Net's own trainer lookup (as nnUNetv2_train runs it) finds nnUNetTrainerACNorm in the
installed copy.
"""
from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _run(cmd, env, cwd, timeout=600) -> subprocess.CompletedProcess:
    # cwd outside the repository: `python -c` puts the cwd first on sys.path
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_pip_install_registers_trainers_without_setup_step(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    parent_paths = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    (purelib / "zz_parent_environment.pth").write_text("\n".join(dict.fromkeys(parent_paths)) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "PYTHONPATH")}
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", REPO], env, tmp_path)
    installed_shims = purelib / "nnunet_acnorm" / "nnunet" / "nnunet_ext"
    assert (purelib / "nnunet_acnorm_ext_trainers.pth").is_file()
    assert installed_shims.is_dir()

    # a new interpreter, variable unset: the .pth hook sets it; nnU-Net's lookup finds the installed class
    code = ("import os, sys\n"
            "print('VAR', os.environ.get('nnUNet_extTrainer'))\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            "for name in ('nnUNetTrainerACNorm', 'nnUNetTrainerACNormBN', 'nnUNetTrainerFinetune'):\n"
            "    cls = find(name)\n"
            "    print('FOUND', name, sys.modules[cls.__module__].__file__)\n")
    out = _run([python, "-c", code], env, tmp_path).stdout
    assert f"VAR {installed_shims}" in out
    found = [line.split()[-1] for line in out.splitlines() if line.startswith("FOUND")]
    assert len(found) == 3 and all(path.startswith(str(purelib)) for path in found), out[-3000:]

    # the user's own folders are kept (appended after them)
    out = _run([python, "-c", "import os; print(os.environ['nnUNet_extTrainer'])"],
               {**env, "nnUNet_extTrainer": "/my/trainers"}, tmp_path).stdout.strip()
    assert out.split(os.pathsep) == ["/my/trainers", str(installed_shims)]

    # the explicit way: the console script installed with the package prints the same folder
    printed = _run([env_dir / "bin" / "nnUNetv2_acnorm_trainer_path"], env, tmp_path).stdout.strip()
    assert printed == str(installed_shims)
