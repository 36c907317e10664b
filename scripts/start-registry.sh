#!/usr/bin/env bash
# Two local container registries (Debian's docker-registry, Docker Distribution 2.8) on 127.0.0.1
# for `capsule image push` tests: an open one on $CAPSULE_REGISTRY_PORT (5070) and one that
# requires credentials on $CAPSULE_REGISTRY_AUTH_PORT (5071). Docker pushes to 127.0.0.0/8 without
# TLS. Idempotent: a registry that already answers is left alone. Needs root. `stop` ends both.
set -euo pipefail
LOGDIR=${CAPSULE_SERVICE_LOGS:-/tmp/capsule-services}
PORT=${CAPSULE_REGISTRY_PORT:-5070}
AUTH_PORT=${CAPSULE_REGISTRY_AUTH_PORT:-5071}
CONF=/etc/docker/registry
STORE=/var/lib/capsule-registry
mkdir -p "$LOGDIR" "$CONF" "$STORE/open" "$STORE/auth"

answers() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/v2/" | grep -qE '^(200|401)$'; }

if [ "${1:-}" = stop ]; then
  for name in open auth; do
    pidf=/run/capsule-registry-$name.pid
    [ -f "$pidf" ] && kill "$(cat "$pidf")" 2>/dev/null || true
    rm -f "$pidf"
  done
  exit 0
fi

start() {  # start NAME PORT AUTH_YAML
  local name=$1 port=$2 auth=$3
  if answers "$port"; then return 0; fi
  cat >"$CONF/capsule-$name.yml" <<CONF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $STORE/$name}
  delete: {enabled: true}
http:
  addr: 127.0.0.1:$port
$auth
CONF
  nohup docker-registry serve "$CONF/capsule-$name.yml" >"$LOGDIR/registry-$name.log" 2>&1 &
  echo $! >/run/capsule-registry-$name.pid
  for _ in $(seq 1 30); do answers "$port" && return 0; sleep 1; done
  echo "registry $name did not answer on 127.0.0.1:$port"; tail -20 "$LOGDIR/registry-$name.log"; exit 1
}
start open "$PORT" ""
# htpasswd auth (user capsule, password capsule-test; bcrypt): pushes without `docker login` get
# 401 with a Basic challenge, as from a real private registry.
echo 'capsule:$2b$05$593fQ45lbFXEaKTkvvZ/1OAjEkZd0FQJrRVTs.RdBX4I0cURiMptG' >"$CONF/capsule-auth.htpasswd"
start auth "$AUTH_PORT" "auth:
  htpasswd: {realm: capsule-test, path: $CONF/capsule-auth.htpasswd}"
echo "registry: 127.0.0.1:$PORT (open), 127.0.0.1:$AUTH_PORT (credentials required)"
