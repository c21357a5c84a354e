#!/usr/bin/env bash
# Create .venv, install this repository into it (regular install: nnU-Net finds the AC-Norm
# trainers with no set-up step) and run the bundled CT -> MR example (a few minutes on CPU).
# Extra arguments go to nnUNetv2_acnorm_demo (e.g. --output DIR --finetune-epochs 10).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --upgrade pip >/dev/null
echo "Installing nnunet-acnorm and its dependencies (nnU-Net, torch) into .venv ..."
.venv/bin/python -m pip install .
exec .venv/bin/nnUNetv2_acnorm_demo "$@"
