#!/usr/bin/env bash
# Creates the project's environment in .venv (idempotent). torch is pinned to the
# CPU build: an open range would pull a multi-GB CUDA build on these machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# MLflow is pinned too: the fast `models list` reads its SQLite schema (registry/mlflow.py
# KNOWN_SCHEMAS), and a new release under an open range changed it between two CI runs.
.venv/bin/python -m pip install -q -e ".[dev]" "mlflow==3.18.0"
echo "setup-dev: .venv ready ($(.venv/bin/python -c 'import torch,sys;print("torch",torch.__version__,"python",sys.version.split()[0])'))"
