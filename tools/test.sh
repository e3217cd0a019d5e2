#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created on first use).
#   bash tools/test.sh [pytest args]
#
# Tests marked `slurm` run against a real single-node SLURM cluster on localhost
# (tools/local_slurm.sh): this script starts one when it can — SLURM installed, or root with
# apt-get to install it — and stops it afterwards (unless it was already running). Elsewhere
# those tests skip, saying how to enable them. D2BN_SLURM=0 skips them here too;
# D2BN_SLURM=1 makes a cluster that fails to start an error instead of a skip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/bootstrap_env.sh

started=0
if [ "${D2BN_SLURM:-auto}" != 0 ] && { command -v slurmctld >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }; }; then
  if bash tools/local_slurm.sh status >/dev/null 2>&1; then
    echo "[test] slurm tests: using the running local cluster (tools/local_slurm.sh)" >&2
  elif bash tools/local_slurm.sh start >/dev/null; then
    started=1
    echo "[test] slurm tests: started a local cluster (tools/local_slurm.sh; stopped at the end)" >&2
  elif [ "${D2BN_SLURM:-auto}" = 1 ]; then
    echo "[test] error: D2BN_SLURM=1 but tools/local_slurm.sh start failed" >&2
    exit 1
  else
    echo "[test] slurm tests will skip: tools/local_slurm.sh start failed (see above)" >&2
  fi
  eval "$(bash tools/local_slurm.sh env)"
fi
if [ $started = 1 ]; then
  trap 'bash tools/local_slurm.sh stop >/dev/null' EXIT
  "$D2BN_PYTHON" -m pytest -q tests "$@"
else
  exec "$D2BN_PYTHON" -m pytest -q tests "$@"
fi
