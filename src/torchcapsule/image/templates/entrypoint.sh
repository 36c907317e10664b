#!/bin/bash
# capsule-entrypoint: run by tini as PID 1's child. Checks the environment like NGC's entrypoint
# (warnings, never failures), maps the container user to the host user, then runs
#   dev          sshd (if present) + Jupyter Lab, until SIGTERM
#   jupyter      Jupyter Lab only          sshd   sshd only
#   healthcheck  exit 0 when the services this container started answer
#   CMD...       any other command, as the unprivileged user
# Environment: HOST_UID, HOST_GID, SSH_AUTHORIZED_KEYS, SSH_AUTHORIZED_KEYS_FILE, SSH_PORT,
# SSH_BIND, JUPYTER_TOKEN, JUPYTER_TOKEN_FILE, JUPYTER_PORT, JUPYTER_IP, CAPSULE_QUIET.
set -euo pipefail

USER_NAME=${CAPSULE_USER:-mluser}
RUN_DIR=/run/capsule
TOKEN_OUT=$RUN_DIR/jupyter_token

log()  { echo "capsule: $*" >&2; }
warn() { [ "${CAPSULE_QUIET:-0}" = 1 ] || echo "capsule: WARNING: $*" >&2; }

# -- healthcheck (runs as whatever user docker uses; reads the services file) ---------------
if [ "${1:-}" = healthcheck ]; then
  [ -f "$RUN_DIR/services" ] || exit 0
  while read -r svc port; do
    case $svc in
      jupyter) python3 -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/api', timeout=5)" || exit 1 ;;
      sshd) python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 5).close()" || exit 1 ;;
    esac
  done < "$RUN_DIR/services"
  exit 0
fi

# -- checks: warn, never fail ------------------------------------------------------------------
if [ "${CAPSULE_CUDA:-cpu}" != cpu ]; then
  if [ -r /proc/driver/nvidia/version ] || ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    drv=$(sed -n 's/.*Kernel Module *\([0-9.]*\).*/\1/p' /proc/driver/nvidia/version 2>/dev/null | head -1)
    if [ -n "${drv:-}" ] && [ -n "${CAPSULE_MIN_DRIVER:-}" ] \
       && [ "$(printf '%s\n%s\n' "$CAPSULE_MIN_DRIVER" "$drv" | sort -V | head -1)" != "$CAPSULE_MIN_DRIVER" ]; then
      warn "NVIDIA driver $drv is older than $CAPSULE_MIN_DRIVER, the minimum for CUDA $CAPSULE_CUDA; upgrade the host driver"
    fi
  else
    warn "no NVIDIA driver or GPU device is visible; GPU functionality will not be available. Start the container with \`docker run --gpus all\` and install the NVIDIA Container Toolkit on the host"
  fi
fi
shm_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $2}')
if [ -n "${shm_kb:-}" ] && [ "$shm_kb" -lt 1048576 ]; then
  warn "/dev/shm is only $((shm_kb / 1024)) MiB; DataLoader workers and NCCL need more: use \`docker run --ipc=host\` or \`--shm-size=8g\`"
fi

# -- user mapping ------------------------------------------------------------------------------
if [ "$(id -u)" = 0 ]; then
  want_uid=${HOST_UID:-}
  want_gid=${HOST_GID:-${HOST_UID:-}}
  if [ "${want_uid:-}" = 0 ] || [ "${want_gid:-}" = 0 ]; then
    warn "HOST_UID/HOST_GID 0 (root) ignored: the container user stays non-root ($USER_NAME)"
    want_uid=""; want_gid=""
  fi
  if [ -n "$want_gid" ] && [ "$want_gid" != "$(id -g "$USER_NAME")" ]; then
    groupmod -o -g "$want_gid" "$USER_NAME"
  fi
  if [ -n "$want_uid" ] && [ "$want_uid" != "$(id -u "$USER_NAME")" ]; then
    usermod -o -u "$want_uid" "$USER_NAME" >/dev/null
  fi
  if [ -n "$want_uid$want_gid" ]; then
    home=$(getent passwd "$USER_NAME" | cut -d: -f6)
    chown -R "$USER_NAME:$USER_NAME" "$home" "$RUN_DIR"
    # Volume directories that are not mounted belong to the image: give them to the new uid.
    # Mounted ones are the host's and keep their owner.
    for d in /workspace /data /models /logs; do
      if [ -d "$d" ] && ! mountpoint -q "$d"; then chown "$USER_NAME:$USER_NAME" "$d"; fi
    done
  fi
  for d in /workspace /data /models /logs; do
    if mountpoint -q "$d" && ! setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups test -w "$d"; then
      warn "$d is not writable by $USER_NAME (uid $(id -u "$USER_NAME")); start with HOST_UID=\$(id -u) HOST_GID=\$(id -g) (capsule dev does) or fix the owner of the host directory"
    fi
  done
  as_user() { exec setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups \
                env HOME="$(getent passwd "$USER_NAME" | cut -d: -f6)" USER="$USER_NAME" LOGNAME="$USER_NAME" "$@"; }
  spawn_user() { setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups \
                   env HOME="$(getent passwd "$USER_NAME" | cut -d: -f6)" USER="$USER_NAME" LOGNAME="$USER_NAME" "$@" & }
  IS_ROOT=1
else
  # Started with --user UID:GID: already unprivileged; files written are that user's.
  [ -w "${HOME:-/}" ] || export HOME=/tmp/home-$(id -u)
  mkdir -p "$HOME"
  as_user() { exec "$@"; }
  spawn_user() { "$@" & }
  IS_ROOT=0
fi

mode=${1:-dev}

start_sshd() {
  if ! command -v sshd >/dev/null; then log "sshd is not in this image (flavor ${CAPSULE_FLAVOR:-?})"; return 1; fi
  if [ "$IS_ROOT" != 1 ]; then warn "sshd not started: it needs the container to start as root (no --user); use HOST_UID/HOST_GID instead"; return 1; fi
  # Host keys are made here, at first start, so no two containers share them.
  ssh-keygen -A >/dev/null
  home=$(getent passwd "$USER_NAME" | cut -d: -f6)
  install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$home/.ssh"
  keys=""
  [ -n "${SSH_AUTHORIZED_KEYS:-}" ] && keys="$SSH_AUTHORIZED_KEYS"
  if [ -n "${SSH_AUTHORIZED_KEYS_FILE:-}" ]; then
    if [ -r "$SSH_AUTHORIZED_KEYS_FILE" ]; then keys="$keys"$'\n'"$(cat "$SSH_AUTHORIZED_KEYS_FILE")"
    else warn "SSH_AUTHORIZED_KEYS_FILE=$SSH_AUTHORIZED_KEYS_FILE cannot be read"; fi
  fi
  if [ -n "$keys" ]; then
    printf '%s\n' "$keys" | sed '/^\s*$/d' > "$home/.ssh/authorized_keys"
    chown "$USER_NAME:$USER_NAME" "$home/.ssh/authorized_keys"; chmod 0600 "$home/.ssh/authorized_keys"
  elif [ ! -s "$home/.ssh/authorized_keys" ]; then
    warn "no SSH key given (SSH_AUTHORIZED_KEYS or SSH_AUTHORIZED_KEYS_FILE): nobody can log in over SSH"
  fi
  mkdir -p /run/sshd && chmod 0755 /run/sshd
  /usr/sbin/sshd -D -e -p "${SSH_PORT:-22}" -o "ListenAddress=${SSH_BIND:-0.0.0.0}" -o "AllowUsers=$USER_NAME" &
  SSHD_PID=$!
  echo "sshd ${SSH_PORT:-22}" >> "$RUN_DIR/services"
  log "sshd listening on ${SSH_BIND:-0.0.0.0}:${SSH_PORT:-22} (user $USER_NAME, keys only)"
}

start_jupyter() {
  if ! command -v jupyter >/dev/null; then log "Jupyter is not in this image (flavor ${CAPSULE_FLAVOR:-?})"; return 1; fi
  local token=""
  if [ -n "${JUPYTER_TOKEN:-}" ]; then token=$JUPYTER_TOKEN
  elif [ -n "${JUPYTER_TOKEN_FILE:-}" ]; then
    [ -r "$JUPYTER_TOKEN_FILE" ] || { log "JUPYTER_TOKEN_FILE=$JUPYTER_TOKEN_FILE cannot be read"; exit 2; }
    token=$(tr -d '[:space:]' < "$JUPYTER_TOKEN_FILE")
  fi
  if [ -z "$token" ]; then
    token=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
    log "generated a Jupyter token (${token:0:4}...); read it with: docker exec CONTAINER cat $TOKEN_OUT"
  else
    log "Jupyter token given (${token:0:4}...)"
  fi
  # The server reads the token from this 0600 file (jupyter_server_config.py), never from
  # its command line or environment, and prints it masked.
  (umask 077; printf '%s' "$token" > "$TOKEN_OUT")
  [ "$IS_ROOT" = 1 ] && chown "$USER_NAME:$USER_NAME" "$TOKEN_OUT"
  unset JUPYTER_TOKEN token
  spawn_user env -u JUPYTER_TOKEN CAPSULE_JUPYTER_TOKEN_FILE="$TOKEN_OUT" \
    jupyter lab --ip="${JUPYTER_IP:-0.0.0.0}" --port="${JUPYTER_PORT:-8888}" --no-browser \
    --ServerApp.root_dir=/workspace
  JUPYTER_PID=$!
  echo "jupyter ${JUPYTER_PORT:-8888}" >> "$RUN_DIR/services"
}

case $mode in
  dev|jupyter|sshd)
    : > "$RUN_DIR/services"
    SSHD_PID=""; JUPYTER_PID=""
    stop() {
      log "stopping"
      for p in $JUPYTER_PID $SSHD_PID; do kill -TERM "$p" 2>/dev/null || true; done
      wait 2>/dev/null || true
      exit 0
    }
    trap stop TERM INT
    [ "$mode" != jupyter ] && { start_sshd || [ "$mode" = dev ] || exit 1; }
    [ "$mode" != sshd ] && { start_jupyter || [ "$mode" = dev ] || exit 1; }
    if [ -z "$SSHD_PID$JUPYTER_PID" ]; then log "nothing to run in this image; pass a command"; exit 1; fi
    # Exit when either service dies (docker's restart policy or the user decides what next).
    wait -n || true
    log "a service exited; stopping the container"
    stop
    ;;
  *)
    as_user "$@"
    ;;
esac
