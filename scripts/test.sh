#!/usr/bin/env bash
# The whole test suite: unit tests, then integration tests against the real parts
# (Docker engine, Slurm, MLflow, sshd, Jupyter). Run scripts/start-services.sh first (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q --durations=25 "$@"  # the slowest tests: where CI time goes
