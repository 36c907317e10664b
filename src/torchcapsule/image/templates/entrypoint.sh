#!/bin/bash
# capsule-entrypoint: run by tini as PID 1's child. Checks the environment like NGC's entrypoint
# (warnings, never failures), then runs, always as an unprivileged user:
#   dev          sshd (if present) + Jupyter Lab, until SIGTERM
#   jupyter      Jupyter Lab only          sshd   sshd only
#   healthcheck  exit 0 when the services of this container's mode answer
#   CMD...       any other command
# The root boundary (docs/image.md, "Threat model"): nothing here runs as root. The image's USER is
# the unprivileged user and `capsule dev` starts the container as --user HOST_UID:HOST_GID. Started
# as root anyway (--user 0), it only parses HOST_UID/HOST_GID as numbers (0 refused in any
# spelling), hands the image's own volume directories to them (chown -h, never recursive, never
# into anything the user could have written) and re-executes itself as that user.
# sshd then runs as the user too: it can log in no one else, and needs no capability.
# Environment: HOST_UID, HOST_GID (root start only), SSH_AUTHORIZED_KEYS, SSH_AUTHORIZED_KEYS_FILE,
# SSH_PORT, SSH_BIND, JUPYTER_TOKEN, JUPYTER_TOKEN_FILE, JUPYTER_PORT, JUPYTER_IP, CAPSULE_QUIET.
set -euo pipefail

USER_NAME=${CAPSULE_USER:-mluser}
VOLUME_DIRS="/workspace /data /models /logs"

log()  { echo "capsule: $*" >&2; }
warn() { [ "${CAPSULE_QUIET:-0}" = 1 ] || echo "capsule: WARNING: $*" >&2; }
die()  { echo "capsule: error: $*" >&2; exit 2; }

# -- healthcheck --------------------------------------------------------------------------------
# Trusts nothing a user of the container can write: which services to probe comes from PID 1's
# argv (fixed by Docker when the container was created), the ports from the container's
# environment; ports must be plain numbers and are only connected to, never pasted into code.
port_ok() {  # NAME VALUE
  [[ $2 =~ ^[0-9]{1,5}$ ]] && (( 10#$2 >= 1 && 10#$2 <= 65535 )) && return 0
  echo "capsule: healthcheck: $1=$2 is not a port number" >&2; return 1
}
if [ "${1:-}" = healthcheck ]; then
  mode=""; take=0
  while IFS= read -r -d '' arg; do
    if [ "$take" = 1 ]; then mode=$arg; break; fi
    [ "${arg##*/}" = capsule-entrypoint ] && take=1
  done < /proc/1/cmdline
  [ "$take" = 1 ] && mode=${mode:-dev}
  case $mode in dev|jupyter|sshd) ;; *) exit 0 ;; esac
  if [ "$mode" != jupyter ] && command -v sshd >/dev/null; then
    port_ok SSH_PORT "${SSH_PORT:-2222}" || exit 1
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$((10#${SSH_PORT:-2222}))" || exit 1
  fi
  if [ "$mode" != sshd ] && command -v jupyter >/dev/null; then
    port_ok JUPYTER_PORT "${JUPYTER_PORT:-8888}" || exit 1
    python3 -c 'import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{int(sys.argv[1])}/api", timeout=5)
except OSError as e:
    sys.exit(f"capsule: healthcheck: Jupyter on port {sys.argv[1]}: {e}")' "$((10#${JUPYTER_PORT:-8888}))" || exit 1
  fi
  exit 0
fi

# -- started as root: become the user before anything else ---------------------------------------
# A uid/gid from the environment: decimal digits only, so "+0", "-0", "0x0", " 0" are not numbers
# and "00" is 0; 0 (root) is refused, never silently replaced.
parse_id() {  # NAME VALUE
  local eg="$1=\$(id -u)"; [ "$1" = HOST_GID ] && eg="$1=\$(id -g)"
  [[ $2 =~ ^[0-9]{1,10}$ ]] || die "$1=$2 is not a number; pass a numeric id, e.g. $eg"
  local n=$((10#$2))
  (( n != 0 )) || die "$1=$2 is root (0), which the container user may never be; pass a non-root id, e.g. $eg"
  (( n < 4294967295 )) || die "$1=$2 is out of range; pass a numeric id below 4294967295"
  echo "$n"
}
if [ "$(id -u)" = 0 ]; then
  uid=$(parse_id HOST_UID "${HOST_UID:-$(id -u "$USER_NAME")}")
  gid=$(parse_id HOST_GID "${HOST_GID:-${HOST_UID:-$(id -g "$USER_NAME")}}")
  # The image's own directories (root-owned parents, so the user cannot have swapped them for
  # links): hand them, not what is in them, to the user. Mounted ones keep their owner.
  for d in $VOLUME_DIRS /run/capsule "$(getent passwd "$USER_NAME" | cut -d: -f6)"; do
    if [ -d "$d" ] && [ ! -L "$d" ] && ! mountpoint -q "$d"; then
      chown -h "$uid:$gid" "$d" 2>/dev/null || warn "cannot give $d to $uid:$gid (no CAP_CHOWN); start with --user $uid:$gid instead"
    fi
  done
  export HOST_UID=$uid HOST_GID=$gid
  exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --no-new-privs -- "$0" "$@"
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

# -- the user: whoever Docker started us as (never root here) --------------------------------------
uid=$(id -u); gid=$(id -g)
if [ -n "${HOST_UID:-}" ] && [ "$HOST_UID" != "$uid" ]; then
  warn "HOST_UID=$HOST_UID is used only when the container starts as root; this one runs as uid $uid (use docker run --user UID:GID)"
fi
# Per-start state (token, services, generated passwd): /run/capsule, a fresh tmpfs under
# `capsule dev`; a private directory under /tmp when it is not ours.
RUN_DIR=/run/capsule
if ! { [ -d "$RUN_DIR" ] && [ -O "$RUN_DIR" ] && [ -w "$RUN_DIR" ]; }; then
  RUN_DIR=${TMPDIR:-/tmp}/capsule-$uid
  mkdir -p -m 0700 "$RUN_DIR" 2>/dev/null || true
  { [ -d "$RUN_DIR" ] && [ ! -L "$RUN_DIR" ] && [ -O "$RUN_DIR" ]; } \
    || die "no private writable directory for the container's state (/run/capsule or $RUN_DIR); with --read-only add --tmpfs /run/capsule:uid=$uid,gid=$gid,mode=0700"
fi
chmod 0700 "$RUN_DIR"
TOKEN_OUT=$RUN_DIR/jupyter_token
# HOME: the image user's home when it is ours and writable (capsule dev mounts one per dev box),
# else a private one in RUN_DIR.
HOME_DIR=$(getent passwd "$USER_NAME" | cut -d: -f6); HOME_DIR=${HOME_DIR:-/home/$USER_NAME}
if ! { [ -d "$HOME_DIR" ] && [ -O "$HOME_DIR" ] && [ -w "$HOME_DIR" ]; }; then
  HOME_DIR=$RUN_DIR/home
  mkdir -p -m 0700 "$HOME_DIR" 2>/dev/null || die "cannot create a home directory in $RUN_DIR"
fi
[ -e "$HOME_DIR/.bashrc" ] || cp -rn /etc/skel/. "$HOME_DIR"/ 2>/dev/null || true
export HOME=$HOME_DIR USER=$USER_NAME LOGNAME=$USER_NAME
# sshd (and `id`, `whoami`) need a passwd entry for this uid named $USER_NAME with this home. When
# the image's entry does not say so (another uid, another home), nss_wrapper supplies one from
# files in RUN_DIR to the processes started from here (sshd passes it on to its sessions).
NSS_ENV=""
if [ "$(getent passwd "$uid" | cut -d: -f1,3,4,6)" != "$USER_NAME:$uid:$gid:$HOME_DIR" ]; then
  if [ -n "$(ldconfig -p 2>/dev/null | grep -F libnss_wrapper.so)" ]; then
    awk -F: -v u="$USER_NAME" -v i="$uid" '$1 != u && $3 != i' /etc/passwd > "$RUN_DIR/passwd"
    echo "$USER_NAME:x:$uid:$gid:$USER_NAME:$HOME_DIR:/bin/bash" >> "$RUN_DIR/passwd"
    awk -F: -v u="$USER_NAME" -v i="$gid" '$1 != u && $3 != i' /etc/group > "$RUN_DIR/group"
    echo "$USER_NAME:x:$gid:" >> "$RUN_DIR/group"
    export LD_PRELOAD=libnss_wrapper.so NSS_WRAPPER_PASSWD=$RUN_DIR/passwd NSS_WRAPPER_GROUP=$RUN_DIR/group
    NSS_ENV="LD_PRELOAD=$LD_PRELOAD NSS_WRAPPER_PASSWD=$NSS_WRAPPER_PASSWD NSS_WRAPPER_GROUP=$NSS_WRAPPER_GROUP"
  fi
fi
for d in $VOLUME_DIRS; do
  if mountpoint -q "$d" && [ ! -w "$d" ]; then
    warn "$d is not writable by uid $uid; start with --user \$(id -u):\$(id -g) (capsule dev does) or fix the owner of the host directory"
  fi
done

# Write a file of ours afresh: whatever was there (a file, a link planted in a persisted home)
# is removed first, never followed.
write_private() {  # PATH (content on stdin)
  rm -f -- "$1"
  (umask 077; set -o noclobber; cat > "$1")
}

mode=${1:-dev}

start_sshd() {
  if ! command -v sshd >/dev/null; then log "sshd is not in this image (flavor ${CAPSULE_FLAVOR:-?})"; return 1; fi
  # Host keys: made at first start, so no two containers share them, and kept in the home, so a
  # dev box re-created by `capsule dev` (which mounts the same home) keeps its identity.
  local hk=$HOME/.ssh/host_keys
  mkdir -p -m 0700 "$HOME/.ssh" "$hk"
  chmod 0700 "$HOME/.ssh" "$hk"
  [ -s "$hk/ssh_host_ed25519_key" ] || { rm -f "$hk/ssh_host_ed25519_key"*; ssh-keygen -q -t ed25519 -N "" -C "" -f "$hk/ssh_host_ed25519_key"; }
  [ -s "$hk/ssh_host_rsa_key" ] || { rm -f "$hk/ssh_host_rsa_key"*; ssh-keygen -q -t rsa -b 3072 -N "" -C "" -f "$hk/ssh_host_rsa_key"; }
  local keys=""
  [ -n "${SSH_AUTHORIZED_KEYS:-}" ] && keys="$SSH_AUTHORIZED_KEYS"
  if [ -n "${SSH_AUTHORIZED_KEYS_FILE:-}" ]; then
    if [ -r "$SSH_AUTHORIZED_KEYS_FILE" ]; then keys="$keys"$'\n'"$(cat "$SSH_AUTHORIZED_KEYS_FILE")"
    else warn "SSH_AUTHORIZED_KEYS_FILE=$SSH_AUTHORIZED_KEYS_FILE cannot be read"; fi
  fi
  if [ -n "$keys" ]; then
    printf '%s\n' "$keys" | sed '/^\s*$/d' | write_private "$HOME/.ssh/authorized_keys"
  elif [ ! -s "$HOME/.ssh/authorized_keys" ]; then
    warn "no SSH key given (SSH_AUTHORIZED_KEYS or SSH_AUTHORIZED_KEYS_FILE): nobody can log in over SSH"
  fi
  port_ok SSH_PORT "${SSH_PORT:-2222}" || exit 2
  local -a opts=(-o "ListenAddress=${SSH_BIND:-0.0.0.0}" -o "AllowUsers=$USER_NAME")
  [ -n "$NSS_ENV" ] && opts+=(-o "SetEnv=$NSS_ENV")
  /usr/sbin/sshd -D -e -p "$((10#${SSH_PORT:-2222}))" -h "$hk/ssh_host_ed25519_key" -h "$hk/ssh_host_rsa_key" "${opts[@]}" &
  SSHD_PID=$!
  echo "sshd ${SSH_PORT:-2222}" >> "$RUN_DIR/services"
  log "sshd listening on ${SSH_BIND:-0.0.0.0}:${SSH_PORT:-2222} (user $USER_NAME, keys only)"
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
  printf '%s' "$token" | write_private "$TOKEN_OUT"
  unset JUPYTER_TOKEN token
  env -u JUPYTER_TOKEN CAPSULE_JUPYTER_TOKEN_FILE="$TOKEN_OUT" \
    jupyter lab --ip="${JUPYTER_IP:-0.0.0.0}" --port="${JUPYTER_PORT:-8888}" --no-browser \
    --ServerApp.root_dir=/workspace &
  JUPYTER_PID=$!
  echo "jupyter ${JUPYTER_PORT:-8888}" >> "$RUN_DIR/services"
}

case $mode in
  dev|jupyter|sshd)
    # For people reading the container (`docker exec CONTAINER cat /run/capsule/services`); the
    # healthcheck does not read it.
    : | write_private "$RUN_DIR/services"
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
    exec "$@"
    ;;
esac
