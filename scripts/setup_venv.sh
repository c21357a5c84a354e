#!/usr/bin/env bash
# Create (or reuse) ./.venv and install nnunet-acnorm into it, with the extras given as $1
# (for example "test"). Used by scripts/test.sh, scripts/demo.sh and .ci/run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNUNET_ACNORM_VENV:-$repo/.venv}"
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtualenv $venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
spec="$repo"
[ -n "$extras" ] && spec="$repo[$extras]"
echo "installing $spec into $venv (first time: a few minutes, torch is large)"
"$venv/bin/python" -m pip install -q "$spec"
