#!/usr/bin/env bash
# Fresh machine to test results in one command: installs nnunet-acnorm with its test extras into
# ./.venv (a regular, non-editable install) and runs the whole test suite.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_venv.sh" test
venv="${NNUNET_ACNORM_VENV:-$repo/.venv}"
cd "$repo"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
