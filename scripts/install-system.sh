#!/usr/bin/env bash
# Installs the real parts the integration tests use (Debian packages). Needs root.
set -euo pipefail
need=()
for pkg in docker.io mmdebstrap slurm-wlm munge openssh-server openssh-client wrk procps docker-registry iproute2 curl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "install-system: ok"
