#!/usr/bin/env bash
# Starts the real parts the integration tests use: a Docker engine, a single-node Slurm
# cluster (with munge), a local container registry and a multi-node Slurm cluster in network
# namespaces (scripts/start-registry.sh, scripts/slurm-multinode.sh). Idempotent: what already answers is left alone. Needs root.
set -euo pipefail
LOGDIR=${CAPSULE_SERVICE_LOGS:-/tmp/capsule-services}
mkdir -p "$LOGDIR"

# shellcheck source=slurm-common.sh
. "$(dirname "$0")/slurm-common.sh"

# -- Docker engine: no bridge, host networking only (see ../shared/ENVIRONMENT.md) ----------
if ! docker info >/dev/null 2>&1; then
  nohup dockerd --bridge=none --iptables=false >"$LOGDIR/dockerd.log" 2>&1 &
  wait_for 60 docker info || { echo "dockerd did not start; see $LOGDIR/dockerd.log"; tail -20 "$LOGDIR/dockerd.log"; exit 1; }
fi
echo "docker: $(docker info --format '{{.ServerVersion}}')"

# -- munge + Slurm (single node, 2 CPUs) -----------------------------------------------------
if [ ! -f /etc/munge/munge.key ]; then mungekey -c; fi
mkdir -p /run/munge /var/log/munge
chown -R munge:munge /run/munge /var/log/munge /etc/munge
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then su -s /bin/sh munge -c /usr/sbin/munged; fi
wait_for 20 munge -n

CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
{ printf 'ClusterName=capsule\nSlurmctldHost=localhost\n'; slurm_common_conf; cat <<CONF
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
KillWait=10
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
} >/etc/slurm/slurm.conf
if ! pgrep -x slurmctld >/dev/null; then nohup slurmctld -D >"$LOGDIR/slurmctld.log" 2>&1 & fi
if ! pgrep -x slurmd >/dev/null; then nohup slurmd -D -N localhost >"$LOGDIR/slurmd.log" 2>&1 & fi
wait_for 60 sinfo || { echo "slurmctld did not answer"; tail -20 "$LOGDIR/slurmctld.log"; exit 1; }
# A node left DOWN by an earlier run comes back here.
scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
wait_for 60 bash -c '[ "$(sinfo -h -o %T | head -1)" = idle ] || [ "$(sinfo -h -o %T | head -1)" = mixed ]' \
  || { echo "slurm node not idle: $(sinfo -h -o '%T %E')"; tail -20 "$LOGDIR/slurmd.log"; exit 1; }
echo "slurm: $(sinfo -h -o '%P %D %T')"

# -- a local container registry for `capsule image push` (127.0.0.1:5070, :5071 with auth) -----
bash "$(dirname "$0")/start-registry.sh"

# -- a second, multi-node Slurm cluster (SLURM_CONF=/etc/slurm-mn/slurm.conf): two slurmd
#    "nodes" in their own network namespaces; the single-node one above stays as it is --------
bash "$(dirname "$0")/slurm-multinode.sh" up
