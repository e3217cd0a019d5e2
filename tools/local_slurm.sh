#!/usr/bin/env bash
# A single-node SLURM cluster on localhost (loopback only), for the `slurm` tests and for
# trying `tools/compare.py --launcher submitit --cluster slurm` on one machine.
#
#   bash tools/local_slurm.sh start    # installs its Debian packages when root and missing,
#                                      # starts munged, slurmctld, slurmd; prints SLURM_CONF
#   bash tools/local_slurm.sh status   # exit 0 when all three daemons run, 1 otherwise
#   bash tools/local_slurm.sh env      # prints `export SLURM_CONF=...` (for eval)
#   bash tools/local_slurm.sh stop     # cancels this cluster's jobs, ends its daemons
#
# Everything lives under one folder of its own, $D2BN_SLURM_DIR (default: <repo>/.slurm):
# slurm.conf, munge key and socket, state, spool, logs and the daemons' pid files. Nothing
# is written to /etc and no service manager is used: the daemons are started directly and
# stopped by their pid files, never by name. Clients (sbatch, squeue, submitit) find this
# cluster through SLURM_CONF=$D2BN_SLURM_DIR/slurm.conf.
#
# The cluster: node `localhost` (127.0.0.1, this machine's CPUs and memory), partition
# `debug` (default, no time limit) without GRES, no accounting (sacct has nothing: job
# state comes from squeue/scontrol, which keep finished jobs for MinJobAge = 30 min), a
# requeued job may start again after 10 s (cred_expire), KillWait 5 s. Ports:
# $D2BN_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd). Idempotent: `start`
# on a running cluster and `stop` on a stopped one only say so.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${D2BN_SLURM_DIR:-$repo_root/.slurm}
port=${D2BN_SLURM_PORT:-6817}
conf=$dir/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)
DAEMONS=(slurmd slurmctld munged)  # the order `stop` ends them in

log() { echo "[local_slurm] $*" >&2; }
die() { echo "[local_slurm] error: $*" >&2; exit 1; }
pidfile() {  # munged writes its own as user munge, into its folder
  if [ "$1" = munged ]; then echo "$dir/munge/munged.pid"; else echo "$dir/run/$1.pid"; fi
}

# pid of daemon $1 if its pid file names a live process of that program, else nothing
live_pid() {
  local f pid
  f=$(pidfile "$1")
  [ -f "$f" ] || return 1
  pid=$(tr -dc 0-9 < "$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] || return 1
  echo "$pid"
}

running() { live_pid munged >/dev/null && live_pid slurmctld >/dev/null && live_pid slurmd >/dev/null; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "SLURM is not installed (missing: ${missing[*]}); as root on Debian/Ubuntu this script installs it: apt-get install ${PACKAGES[*]}"
  fi
  log "installing ${PACKAGES[*]} (apt-get, --no-install-recommends)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null; }
}

write_config() {
  # this machine's hardware as slurmd sees it, under the node name localhost
  local hw
  hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')
  cat > "$conf" <<EOF
# written by tools/local_slurm.sh: a single-node cluster on 127.0.0.1
ClusterName=d2bn-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge=1800
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
  local key=$dir/munge/munge.key
  install -d -m 0755 -o munge -g munge "$dir/munge"  # clients need x on the socket's folder
  if [ ! -f "$key" ]; then
    head -c 1024 /dev/urandom > "$key"
    chown munge:munge "$key"
    chmod 0400 "$key"
  fi
  runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$key" \
    --pid-file="$(pidfile munged)" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND until it succeeds
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq $((seconds * 4))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  die "$what did not happen within $seconds s (logs: $dir/log, $dir/munge/munged.log)"
}

node_ready() { [ -n "$(sinfo -h -n localhost -t idle,mixed,alloc -o %N)" ]; }

cmd_start() {
  if running; then
    log "already running (SLURM_CONF=$conf)"
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  install_packages
  local p
  for p in "$port" $((port + 1)); do  # another cluster (another checkout's) on these ports
    if ! live_pid slurmctld >/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      die "port $p is in use (another SLURM? stop it, or choose other ports with D2BN_SLURM_PORT)"
    fi
  done
  mkdir -p "$dir"/{state,spool,log,run}
  chmod 0755 "$dir"
  live_pid munged >/dev/null || start_munged
  wait_for 10 "munged's socket" test -S "$dir/munge/munge.socket"
  write_config
  export SLURM_CONF=$conf
  live_pid slurmctld >/dev/null || slurmctld -f "$conf"
  wait_for 20 "slurmctld answering" scontrol -Q ping
  live_pid slurmd >/dev/null || slurmd -f "$conf" -N localhost
  wait_for 5 "slurmd's pid file" live_pid slurmd
  # a node left DOWN/DRAIN by an earlier run of this cluster comes back
  scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
  wait_for 30 "node localhost becoming idle" node_ready
  log "running: partition debug, node localhost ($(sinfo -h -n localhost -o '%c CPUs, %m MB'))"
  echo "export SLURM_CONF=$conf"
}

# job ids of this cluster (all of them were submitted to this cluster's slurmctld)
job_ids() { SLURM_CONF=$conf squeue -h -o %A 2>/dev/null || true; }

job_processes() {
  # pids of this cluster's jobs: their environment names its SLURM_CONF and a job, or they
  # hold its slurmd.log open (slurmstepd, which slurmd forks for every job step)
  local e p
  for e in /proc/[0-9]*/environ; do
    p=${e#/proc/}; p=${p%/environ}
    if { tr '\0' '\n' < "$e"; } 2>/dev/null | grep -qx "SLURM_CONF=$conf" \
      && { tr '\0' '\n' < "$e"; } 2>/dev/null | grep -q "^SLURM_JOB_ID="; then
      echo "$p"
    elif [ "$(readlink "/proc/$p/fd/3" 2>/dev/null)" = "$dir/log/slurmd.log" ]; then
      echo "$p"
    fi
  done
}

stop_pid() {  # stop_pid NAME: TERM, up to 10 s, then KILL; by pid file only
  local pid
  pid=$(live_pid "$1") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 40); do [ -d "/proc/$pid" ] || break; sleep 0.25; done
  if [ -d "/proc/$pid" ]; then log "$1 ($pid) ignored TERM; KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$(pidfile "$1")"
}

cmd_stop() {
  if live_pid slurmctld >/dev/null; then
    local ids
    ids=$(job_ids | tr '\n' ' ')
    if [ -n "${ids// /}" ]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      SLURM_CONF=$conf scancel $ids 2>/dev/null || true
      # jobs outlive slurmd: wait for their processes to end before stopping the daemons
      for _ in $(seq 120); do
        [ -z "$(SLURM_CONF=$conf squeue -h -t PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED -o %A 2>/dev/null)" ] && break
        sleep 0.25
      done
    fi
  fi
  local stopped=0 d
  for d in "${DAEMONS[@]}"; do
    if live_pid "$d" >/dev/null; then stop_pid "$d"; stopped=1; fi
  done
  # a job whose slurmd died before it could end it: its processes carry this cluster's
  # SLURM_CONF and a SLURM_JOB_ID in their environment
  local pid
  for pid in $(job_processes); do
    log "ending process $pid of a job of this cluster"
    kill -KILL "$pid" 2>/dev/null || true
  done
  [ $stopped = 1 ] && log "stopped" || log "not running"
}

cmd_status() {
  local d pid ok=0
  for d in munged slurmctld slurmd; do
    if pid=$(live_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; ok=1; fi
  done
  if [ $ok = 0 ]; then
    echo "SLURM_CONF=$conf"
    SLURM_CONF=$conf sinfo -h -o "partition %P: %D node(s) %t" 2>/dev/null || true
    SLURM_CONF=$conf squeue -h -t all -o "job %i %T %j" 2>/dev/null || true
  fi
  return $ok
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
