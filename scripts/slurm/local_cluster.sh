#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the `slurm` test tier (make test-slurm).
#
#   scripts/slurm/local_cluster.sh up      install if missing, configure, start, wait until the node is idle
#   scripts/slurm/local_cluster.sh down    stop every daemon started by `up` (by pid file), whatever happened
#   scripts/slurm/local_cluster.sh env     print `export SLURM_CONF=...` for clients (sbatch, srun, sinfo)
#
# Needs root (daemons, apt-get). Everything it writes lives under $VLT_SLURM_DIR (default .slurm/ in the
# repository): slurm.conf, state, spool, logs, pid files. No systemd: daemons are started directly.
# Partition `debug` is the default; jobs run as the submitting user.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${VLT_SLURM_DIR:-$ROOT/.slurm}"
CONF="$DIR/slurm.conf"
MUNGE_RUN=/run/munge

log() { echo "[local_cluster] $*" >&2; }

install_slurm() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return 0
  fi
  if ! command -v apt-get >/dev/null; then
    log "no apt-get: install slurmctld, slurmd, slurm-client and munge by hand"
    return 1
  fi
  log "installing slurmctld slurmd slurm-client munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  local host cpus mem
  host="$(hostname -s)"
  # slurmd -C reports what this node really has; the node must not claim more or it drains.
  cpus="$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)"
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)"
  mem=$((mem * 9 / 10))
  mkdir -p "$DIR"/{state,spool,log,run}
  cat >"$CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: one node, no accounting, state under $DIR.
ClusterName=vlt-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=30
InactiveLimit=0
MinJobAge=300
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  if [ -f "$MUNGE_RUN/munged.pid" ] && kill -0 "$(cat "$MUNGE_RUN/munged.pid")" 2>/dev/null; then
    return 0
  fi
  mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
  chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
  chmod 0755 "$MUNGE_RUN"
  [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged --force
  # Remember that this script started it, so `down` stops only what `up` started.
  cp "$MUNGE_RUN/munged.pid" "$DIR/run/munged.pid" 2>/dev/null || true
}

wait_idle() {
  local host
  host="$(hostname -s)"
  for _ in $(seq 1 60); do
    state="$(SLURM_CONF="$CONF" sinfo -h -n "$host" -o %t 2>/dev/null || true)"
    case "$state" in
      idle*|mix*|alloc*) log "node $host is $state"; return 0 ;;
      drain*|down*) SLURM_CONF="$CONF" scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  log "node $host never became idle (state: ${state:-none}); see $DIR/log"
  return 1
}

up() {
  install_slurm
  write_conf
  start_munge
  if ! { [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; }; then
    # -c: a fresh queue; jobs of an earlier, aborted session must not start again.
    slurmctld -f "$CONF" -c
  fi
  if ! { [ -f "$DIR/run/slurmd.pid" ] && kill -0 "$(cat "$DIR/run/slurmd.pid")" 2>/dev/null; }; then
    slurmd -f "$CONF"
  fi
  wait_idle
  echo "export SLURM_CONF=$CONF"
}

stop_pidfile() {
  local name="$1" pidfile="$2" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    log "stopped $name ($pid)"
  fi
  rm -f "$pidfile"
}

down() {
  # Jobs first, so no training process outlives its cluster.
  if [ -f "$CONF" ]; then SLURM_CONF="$CONF" scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null || true; fi
  stop_pidfile slurmd "$DIR/run/slurmd.pid"
  stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
  if [ -f "$DIR/run/munged.pid" ]; then
    stop_pidfile munged "$DIR/run/munged.pid"
    rm -f "$MUNGE_RUN/munged.pid"
  fi
  return 0
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
