#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing jobs/*.sbatch (tests/test_slurm.py).
#   tools/slurm-local.sh up       install slurm-wlm + munge (apt) if missing, start munged, slurmctld,
#                                 slurmd; wait until the node is idle (idempotent: a running cluster is kept)
#   tools/slurm-local.sh status   sinfo and squeue
#   tools/slurm-local.sh down     stop slurmctld and slurmd (munged keeps running: harmless)
# Needs root. Partition "debug" (default) holds this one node; submit with --nodes=1 and, for more
# tasks than cores, --overcommit. Logs: /var/spool/slurm-local/{slurmctld,slurmd}.log.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurm-local
HOST=$(hostname -s)
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

die() { echo "slurm-local: $*" >&2; exit 1; }

node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get to install them"
  echo "slurm-local: installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then  # the package usually creates it; make one if not
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  fi
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return  # already running
  runuser -u munge -- /usr/sbin/munged  # daemonizes itself
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # below the real memory
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
  cat > "$CONF" <<EOF
# Written by tools/slurm-local.sh: a one-node test cluster (rewritten by every "up").
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# no slurmdbd: finished jobs stay visible to "scontrol show job" for MinJobAge seconds and are
# appended to the job completion log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
}

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  install_packages
  start_munge
  if running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid" && [[ $(node_state) =~ ^(idle|mix|alloc)$ ]]; then
    echo "slurm-local: already up"; return
  fi
  write_conf
  if running "$STATE/slurmctld.pid"; then scontrol reconfigure || true; else slurmctld; fi  # daemonizes
  running "$STATE/slurmd.pid" || slurmd  # daemonizes too; both pid files are under $STATE
  local start=$SECONDS state  # sinfo marks a node whose slurmd does not answer with a trailing *
  while (( SECONDS - start < WAIT_S )); do
    state=$(node_state)
    case $state in
      idle|mix|alloc) echo "slurm-local: up after $((SECONDS - start)) s: node $HOST $state"; return ;;
      down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;  # a stale saved state
    esac
    sleep 1
  done
  die "node $HOST not idle after $WAIT_S s (state '${state:-none}'); see $STATE/slurmctld.log and $STATE/slurmd.log"
}

down() {
  local pidfile pid
  for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    running "$pidfile" || continue
    pid=$(cat "$pidfile"); kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  done
  echo "slurm-local: down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) sinfo; squeue ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
