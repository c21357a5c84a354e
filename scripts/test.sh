#!/usr/bin/env bash
# Fresh machine to test results in one command: installs nnunet-acnorm with its test extras into
# ./.venv (a regular, non-editable install) and runs the whole test suite, one pytest worker per
# CPU (pytest-xdist; PYTEST_WORKERS=1 for a serial run). --dist loadfile keeps each test file in one
# worker, so its module fixtures (planned datasets, trained models) are built once.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_venv.sh" test
venv="${NNUNET_ACNORM_VENV:-$repo/.venv}"
cd "$repo"
workers="${PYTEST_WORKERS:-auto}"
if [ "$workers" = "1" ]; then
    exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
fi
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile "$@"
