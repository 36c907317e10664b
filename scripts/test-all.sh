#!/usr/bin/env bash
# The README's test command: installs and starts every real part the tests use, then runs
# the whole suite. Needs root (apt-get, dockerd, slurmctld). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== install system packages"; bash scripts/install-system.sh
echo "== set up .venv";             bash scripts/setup-dev.sh
echo "== set up .venv-airflow";     bash scripts/setup-airflow.sh
echo "== start services";           bash scripts/start-services.sh
echo "== local base image";         bash scripts/make-base-image.sh
echo "== tests";                    exec bash scripts/test.sh "$@"
