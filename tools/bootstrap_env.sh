#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs what d2_batchnorm
# needs. Idempotent: when everything already imports, it returns in seconds.
#
#   D2BN_VENV   path of the virtual environment (default: <repo>/.venv)
#
# Sourced by tools/demo.sh and tools/test.sh; exports D2BN_PYTHON.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${D2BN_VENV:-$repo_root/.venv}
py="$venv/bin/python"

log() { echo "[bootstrap] $*" >&2; }

if [ ! -x "$py" ]; then
  log "creating virtual environment at $venv"
  python3 -m venv "$venv"
fi
pip_install() {
  # the machine-wide pip config may name local indexes that lack a package: not an error
  "$py" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is neither a file nor a directory" >&2)
}

# Everything importable and d2_batchnorm installed from this checkout: nothing to do.
# (Checked from / : Python puts the working directory first on sys.path, so from the
# checkout an uninstalled d2_batchnorm would import too.)
if (cd / && PYTHONWARNINGS=ignore "$py" - "$repo_root") <<'PY' 2>/dev/null; then
import importlib, os, sys
for name in ("torch", "torchvision", "detectron2.engine", "fvcore", "pycocotools.coco",
             "matplotlib", "pytest", "submitit", "vermin", "d2_batchnorm"):
    importlib.import_module(name)
import d2_batchnorm
assert os.path.realpath(os.path.dirname(d2_batchnorm.__file__)).startswith(
    os.path.realpath(sys.argv[1]))
PY
  export D2BN_PYTHON="$py"
  return 0 2>/dev/null || exit 0
fi

# torch / torchvision: keep a pair that already imports together.
if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch 2.14.1 + torchvision 0.29.1 (a few minutes, ~5.5 GB)"
  pip_install "torch==2.14.1" "torchvision==0.29.1"
fi

deps=("setuptools<81" "numpy<2" fvcore iopath pycocotools yacs "omegaconf<2.4" hydra-core
      tabulate termcolor tqdm cloudpickle tensorboard matplotlib Pillow packaging black
      pytest "submitit==1.5.4" vermin)
log "installing Python dependencies"
pip_install "${deps[@]}"

# detectron2: keep any working install (e.g. an official build from GitHub); otherwise
# PyPI's sal-detectron2 (detectron2's official Python code, wheel tagged cp310 only).
if ! "$py" -c "import detectron2.engine" 2>/dev/null; then
  site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  target="$venv/detectron2-pkg"
  pyver=$("$py" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
  log "installing detectron2 from PyPI's sal-detectron2==0.7.2 into $target"
  rm -rf "$target"
  pip_install --no-deps --only-binary=:all: --python-version 3.10 --target "$target" \
    "sal-detectron2==0.7.2"
  # the cp310 compiled extension cannot load on other Pythons; detectron2 then falls back
  # to pure-Python code paths (pycocotools-based COCO evaluation).
  if [ "$pyver" != "3.10" ]; then rm -f "$target"/detectron2/_C*.so; fi
  echo "$target" > "$site/detectron2-pkg.pth"
  PYTHONWARNINGS=ignore "$py" -c "import detectron2.engine"
fi

log "installing d2_batchnorm (editable) from $repo_root"
pip_install --no-deps --no-build-isolation -e "$repo_root"
PYTHONWARNINGS=ignore "$py" -c "import d2_batchnorm"
export D2BN_PYTHON="$py"
