#!/usr/bin/env bash
# A real multi-node Slurm cluster on this one machine, separate from the single-node one in
# /etc/slurm: its own slurm.conf (/etc/slurm-mn, select it with SLURM_CONF=/etc/slurm-mn/slurm.conf),
# ports, spool, pid and state files, and its own slurmctld. Each slurmd "node" runs in its own
# network namespace (own address on a bridge, veth pairs) and UTS namespace (own hostname, in
# /etc/hosts), so torchrun's rendezvous and gloo really cross node addresses. munge is shared.
#
#   scripts/slurm-multinode.sh up     # idempotent: what already answers is left alone
#   scripts/slurm-multinode.sh down   # stops the daemons, removes namespaces, links, hosts lines
#
# Only addresses inside 10.231.0.0/24 are used. Needs root, iproute2, util-linux, slurm-wlm, munge.
set -euo pipefail
NODES=${CAPSULE_MN_NODES:-2}
CONF_DIR=/etc/slurm-mn
CONF=$CONF_DIR/slurm.conf
BR=capmn-br
NET=10.231.0
CTL_ADDR=$NET.1
CTL_PORT=6827
D_PORT=6828
RUN=/run/slurm-mn
SPOOL=/var/spool/slurm-mn
LOGDIR=${CAPSULE_SERVICE_LOGS:-/tmp/capsule-services}
HOSTS_MARK="# torchcapsule slurm-multinode"
export SLURM_CONF=$CONF

node_name() { echo "capsule-mn$1"; }
node_addr() { echo "$NET.$((10 + $1))"; }

# shellcheck source=slurm-common.sh
. "$(dirname "$0")/slurm-common.sh"

stop_pid() {  # stop_pid PIDFILE: TERM, then KILL if it does not end
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    wait_for 20 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  for i in $(seq 1 "$NODES"); do stop_pid "$RUN/slurmd-$(node_name "$i").pid"; done
  stop_pid "$RUN/slurmctld.pid"
  for i in $(seq 1 "$NODES"); do
    ip netns del "$(node_name "$i")" 2>/dev/null || true
    ip link del "capmn$i-h" 2>/dev/null || true
  done
  ip link del "$BR" 2>/dev/null || true
  if grep -q "$HOSTS_MARK" /etc/hosts; then
    grep -v "$HOSTS_MARK" /etc/hosts >/etc/hosts.capsule-mn && cat /etc/hosts.capsule-mn >/etc/hosts
    rm -f /etc/hosts.capsule-mn
  fi
  echo "slurm-multinode: down"
}

network() {
  if ! ip link show "$BR" >/dev/null 2>&1; then
    ip link add "$BR" type bridge
    ip addr add "$CTL_ADDR/24" dev "$BR"
  fi
  ip link set "$BR" up
  for i in $(seq 1 "$NODES"); do
    local ns host addr
    ns=$(node_name "$i"); host="capmn$i-h"; addr=$(node_addr "$i")
    ip netns list | grep -qw "$ns" || ip netns add "$ns"
    if ! ip link show "$host" >/dev/null 2>&1; then
      ip link add "$host" type veth peer name "capmn$i-n"
      ip link set "capmn$i-n" netns "$ns"
      ip -n "$ns" link set "capmn$i-n" name eth0
      ip -n "$ns" addr add "$addr/24" dev eth0
    fi
    ip link set "$host" master "$BR" up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route replace default via "$CTL_ADDR" dev eth0
    grep -q "^$addr $ns " /etc/hosts || echo "$addr $ns $HOSTS_MARK" >>/etc/hosts
  done
}

config() {
  local cpus mem nodes=""
  cpus=$(nproc)
  # Every "node" sees the whole machine; each declares half its memory so two fit.
  mem=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048) / 2 ))
  mkdir -p "$CONF_DIR" "$RUN" "$SPOOL/ctld" /var/log/slurm-mn
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$SPOOL/$(node_name "$i")"
    nodes+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
  done
  { slurm_common_conf; cat <<CONF
ClusterName=capsulemn
SlurmctldHost=$(hostname -s)($CTL_ADDR)
SlurmctldPort=$CTL_PORT
SlurmdPort=$D_PORT
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldLogFile=/var/log/slurm-mn/slurmctld.log
SlurmdLogFile=/var/log/slurm-mn/slurmd-%n.log
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
KillWait=10
MinJobAge=600
${nodes}PartitionName=debug Nodes=capsule-mn[1-$NODES] Default=YES MaxTime=INFINITE State=UP
CONF
  } >"$CONF.new"
  if cmp -s "$CONF.new" "$CONF"; then rm "$CONF.new"; return; fi
  mv "$CONF.new" "$CONF"
  # A changed configuration: restart this cluster's daemons (only ours) so they read it.
  for i in $(seq 1 "$NODES"); do stop_pid "$RUN/slurmd-$(node_name "$i").pid"; done
  stop_pid "$RUN/slurmctld.pid"
}

up() {
  command -v slurmctld >/dev/null || { echo "slurm-wlm is not installed (scripts/install-system.sh)"; exit 1; }
  munge -n >/dev/null || { echo "munged does not answer; scripts/start-services.sh starts it"; exit 1; }
  network
  config
  if ! { [ -f "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; }; then
    nohup slurmctld -D -f "$CONF" >"$LOGDIR/slurmctld-mn.log" 2>&1 &
    echo $! >"$RUN/slurmctld.pid"
  fi
  wait_for 60 sinfo || { echo "slurm-multinode: slurmctld did not answer"; tail -20 "$LOGDIR/slurmctld-mn.log"; exit 1; }
  for i in $(seq 1 "$NODES"); do
    local ns pidf
    ns=$(node_name "$i"); pidf=$RUN/slurmd-$ns.pid
    if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then continue; fi
    # Own network and hostname: job steps on this node see $ns as their host, as on a cluster.
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree slurmd needs.
    nohup nsenter --net="/run/netns/$ns" unshare --uts sh -c "hostname $ns && exec slurmd -D -N $ns -f $CONF" \
      >"$LOGDIR/slurmd-$ns.log" 2>&1 &
  done
  scontrol update NodeName="capsule-mn[1-$NODES]" State=RESUME >/dev/null 2>&1 || true
  wait_for 90 bash -c "[ \"\$(sinfo -h -N -o %T | grep -cE '^(idle|mixed|allocated)')\" = $NODES ]" || {
    echo "slurm-multinode: nodes not idle: $(sinfo -h -N -o '%N %T %E' | tr '\n' ';')"
    tail -n 5 "$LOGDIR"/slurmd-capsule-mn*.log; exit 1; }
  echo "slurm-multinode: $(sinfo -h -o '%P %D %T %N') (SLURM_CONF=$CONF)"
}

mkdir -p "$LOGDIR"
case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down"; exit 2 ;;
esac
