# Sourced by start-services.sh and slurm-multinode.sh: what both Slurm clusters here share.
# shellcheck shell=bash

wait_for() {  # wait_for SECONDS CMD...: true as soon as CMD succeeds, false after SECONDS tries
  local t=$1; shift
  for _ in $(seq 1 "$t"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}

slurm_common_conf() {  # the slurm.conf lines both clusters use (munge, no cgroups, root daemons)
  cat <<'CONF'
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmUser=root
SlurmdUser=root
ReturnToService=2
CONF
}
