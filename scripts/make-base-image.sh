#!/usr/bin/env bash
# Builds the local base image the image tests use (no registry can be reached here):
# Debian 12 (Python 3.11.2) from Debian's own packages with mmdebstrap, then `docker import`.
# Idempotent: an existing image with this tag is left alone (pass --force to rebuild).
# Usage: scripts/make-base-image.sh [TAG]   (default local/debian:bookworm). Needs root.
set -euo pipefail
TAG=${1:-local/debian:bookworm}
FORCE=${FORCE:-0}
[ "${1:-}" = "--force" ] && { FORCE=1; TAG=${2:-local/debian:bookworm}; }
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "$FORCE" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "make-base-image: $TAG already present"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# python3 + python3-venv: the interpreter the image's venv is made from; ca-certificates for
# users' own HTTPS. Everything else (tini, sshd, compilers) the Dockerfile apt-gets itself.
mmdebstrap --quiet --variant=minbase --include=ca-certificates,python3,python3-venv \
  bookworm "$tmp/base.tar" "$MIRROR"
# Docker's import keeps no CMD/ENV: set a PATH so RUN steps find apt-get and python3.
docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' "$tmp/base.tar" "$TAG" >/dev/null
echo "make-base-image: built $TAG ($(docker run --rm --network host "$TAG" python3 --version))"
