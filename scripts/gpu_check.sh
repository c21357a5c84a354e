#!/usr/bin/env bash
# Check a CUDA machine in one command (docs/performance.md, "The GPU check"): the CUDA-only tests,
# nnUNetv2_train of AC-Norm and vanilla with nnU-Net's defaults (AMP, torch.compile), the norm-layer
# benchmark under float16/bfloat16 autocast (eager and compiled), folded/unfolded inference and, with
# 2 or more GPUs, nnUNetv2_train -num_gpus 2; about 8 minutes on one current GPU. Writes
# gpu_check.json and gpu_check.md (--output DIR; default ./gpu_check_<UTC time>).
#
# Uses the virtualenv $NNUNET_ACNORM_VENV (default ./.venv) when nnunet-acnorm is installed there,
# else creates it as scripts/test.sh does (a CUDA build of torch from PyPI). Without an NVIDIA GPU
# it says so in one line and exits 1, before installing or writing anything. --allow-cpu writes the
# report on the CPU with every CUDA part skipped (the report format's test; not a GPU check).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
allow_cpu=0
for arg in "$@"; do
    [ "$arg" = "--allow-cpu" ] && allow_cpu=1
done
if [ "$allow_cpu" = 0 ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; }; then
    echo "gpu_check: error: no NVIDIA GPU on this machine (nvidia-smi lists none); run it on a CUDA machine (nothing was installed or written)" >&2
    exit 1
fi
venv="${NNUNET_ACNORM_VENV:-$repo/.venv}"
if ! "$venv/bin/python" -c "import nnunet_acnorm, pytest" >/dev/null 2>&1; then
    bash "$repo/scripts/setup_venv.sh" test
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
exec "$venv/bin/python" "$repo/scripts/gpu_check.py" "$@"
