#!/usr/bin/env bash
# The README's main job: sets up .venv, then runs the digits example's whole pipeline on this
# machine's CPU with the embedded defaults (local backend, SQLite-backed MLflow under
# examples/digits/.capsule/) and prints what it did:
#   doctor -> test -> train (2-rank DDP) -> evaluate -> register (+ promotion rule) -> serve smoke test
# A second run skips the stages whose inputs did not change (pass --force to rerun them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
export PATH="$PWD/.venv/bin:$PATH"
cd examples/digits
capsule pipeline run "$@"
echo
echo "== registered versions (capsule models list digits)"
capsule models list digits
