#!/usr/bin/env bash
# Creates .venv-airflow: a separate environment with Apache Airflow 3, used only by
# tests/integration/test_exports_validate.py to import the exported DAG for real.
# Separate because Airflow's pins conflict with MLflow's in .venv. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv-airflow/bin/airflow ] && .venv-airflow/bin/python -c "import airflow, sys, airflow.providers.cncf.kubernetes; sys.exit(0 if airflow.__version__.startswith('3.') else 1)" 2>/dev/null; then
  echo "setup-airflow: .venv-airflow ready (airflow $(.venv-airflow/bin/python -c 'import airflow;print(airflow.__version__)'))"
  exit 0
fi
start=$(date +%s)
[ -x .venv-airflow/bin/python ] || "$PY" -m venv .venv-airflow
.venv-airflow/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
# The official constraint files live on GitHub (not reachable here): plain resolution instead.
.venv-airflow/bin/python -m pip install -q "apache-airflow>=3,<4" apache-airflow-providers-cncf-kubernetes 2>&1 | { grep -v "^WARNING: Location" || true; }
echo "setup-airflow: .venv-airflow ready (airflow $(.venv-airflow/bin/python -c 'import airflow;print(airflow.__version__)'), $(( $(date +%s) - start ))s, $(du -sh .venv-airflow | cut -f1))"
