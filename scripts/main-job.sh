#!/usr/bin/env bash
# The README's main job: sets up .venv, then runs the digits example on this machine's CPU
# with the embedded defaults (local backend, SQLite-backed MLflow) and prints what it did.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
export PATH="$PWD/.venv/bin:$PATH"
cd examples/digits
echo "== capsule doctor"; capsule doctor
echo "== capsule validate"; capsule validate
