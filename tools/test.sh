#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created on first use).
#   bash tools/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/bootstrap_env.sh
exec "$D2BN_PYTHON" -m pytest -q tests "$@"
