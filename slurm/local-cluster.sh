#!/usr/bin/env bash
# A real SLURM cluster on this machine: munge, MariaDB + slurmdbd (accounting), slurmctld and two
# slurmd "nodes" (n1, n2) on 127.0.0.1. For the tests and for trying cluster=slurm on a workstation.
#
#   slurm/local-cluster.sh start    # install (apt) if missing, configure, start, wait until idle
#   slurm/local-cluster.sh status   # daemons and sinfo
#   slurm/local-cluster.sh stop     # stop only the daemons this script started (pid files)
#   slurm/local-cluster.sh env      # print the export line clients need
#
# Everything lives in $LOCAL_SLURM_DIR (default /tmp/vqvae2-slurm). Runs as root, without systemd
# or cgroups (Debian 12, slurm-wlm 22.05). Ports: LOCAL_SLURM_PORT_BASE (default 16800) + 17 for
# slurmctld, + 19 for slurmdbd, + 6 for MariaDB, + 1 / + 2 for the two slurmd.
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/vqvae2-slurm}
BASE=${LOCAL_SLURM_PORT_BASE:-16800}
CTLD_PORT=$((BASE + 17)); DBD_PORT=$((BASE + 19)); DB_PORT=$((BASE + 6))
HOST=$(hostname -s)
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF

log() { echo "[local-cluster] $*" >&2; }

install_packages() {
  local missing=0
  for bin in slurmctld slurmd slurmdbd munged mariadbd sbatch sacct; do
    command -v "$bin" >/dev/null 2>&1 || missing=1
  done
  if [ "$missing" = 1 ]; then
    log "installing slurm-wlm, slurmdbd, munge, mariadb-server (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
  fi
}

running() {  # running <pidfile>
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for <seconds> <description> <command...>
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "timed out waiting for $what"; return 1
}

write_configs() {
  mkdir -p "$DIR"/{etc,munge,mysql,state,spool,log,run}
  chmod 700 "$DIR/munge"
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk "/MemTotal/ {print \$2}" /proc/meminfo) / 1024 / 2 ))  # MB per emulated node
  cat > "$CONF" <<CONF
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$DIR/munge/munge.socket
JobCompType=jobcomp/none
JobRequeue=1
DependencyParameters=kill_invalid_depend
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
MinJobAge=600
MailProg=/bin/true
ReturnToService=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# one "GPU" a node whose device file is /dev/null (SLURM keeps no GPU without one): a job asking for
# a GPU is given it, and finds none torch can use, as on a node whose driver is broken
GresTypes=gpu
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$((BASE + 1))-$((BASE + 2))] CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=10
# a partition with a time limit, as clusters have: a job asking for more waits (PartitionTimeLimit)
PartitionName=short Nodes=n[1-2] MaxTime=5 State=UP PriorityTier=1
CONF
  cat > "$DIR/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$DIR/etc/slurmdbd.conf"
  echo "Name=gpu File=/dev/null" > "$DIR/etc/gres.conf"
}

start_munge() {
  running "$DIR/munge/munged.pid" && return 0
  if [ ! -f "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  wait_for 10 munge test -S "$DIR/munge/munge.socket"
}

start_mariadb() {
  running "$DIR/mysql/mariadb.pid" && return 0
  if [ ! -d "$DIR/mysql/data/mysql" ]; then
    mariadb-install-db --user=root --datadir="$DIR/mysql/data" --auth-root-authentication-method=socket \
      >"$DIR/log/mariadb-install.log" 2>&1
  fi
  (mariadbd --user=root --datadir="$DIR/mysql/data" --socket="$DIR/mysql/mysql.sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DIR/mysql/mariadb.pid" \
    --log-error="$DIR/log/mariadb.log" --skip-log-bin >/dev/null 2>&1 &)
  wait_for 30 mariadb mariadb --socket="$DIR/mysql/mysql.sock" -u root -e "select 1"
  mariadb --socket="$DIR/mysql/mysql.sock" -u root -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    FLUSH PRIVILEGES;"
}

start_slurm() {
  if ! running "$DIR/run/slurmdbd.pid"; then
    slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  sacctmgr -i -Q add cluster local >/dev/null 2>&1 || true
  if ! running "$DIR/run/slurmctld.pid"; then
    slurmctld -f "$CONF"
    wait_for 30 slurmctld scontrol ping
  fi
  for node in n1 n2; do
    running "$DIR/run/slurmd-$node.pid" || { mkdir -p "$DIR/spool/$node"; slurmd -f "$CONF" -N "$node"; }
  done
  wait_for 60 "both nodes idle" bash -c '[ "$(sinfo -h -N -p debug -o %t | sort -u)" = "idle" ]'
}

case "${1:-}" in
  start)
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurm
    log "up: $(sinfo -h -N -p debug -o '%N %t' | tr '\n' ' ')"
    echo "export SLURM_CONF=$CONF"
    ;;
  stop)
    # the jobs first: slurmstepd and its tasks outlive slurmd, and a task left running keeps its
    # port (derived from the job id, which a restarted cluster hands out again)
    if running "$DIR/run/slurmctld.pid" && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
      scancel --full $(squeue -h -o %i) 2>/dev/null || true
      for _ in $(seq 1 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
      log "cancelled the jobs still queued or running"
    fi
    for pidfile in "$DIR/run/slurmd-n2.pid" "$DIR/run/slurmd-n1.pid" "$DIR/run/slurmctld.pid" \
                   "$DIR/run/slurmdbd.pid" "$DIR/mysql/mariadb.pid" "$DIR/munge/munged.pid"; do
      if running "$pidfile"; then
        pid=$(cat "$pidfile"); kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        log "stopped $(basename "$pidfile" .pid) ($pid)"
      fi
    done
    ;;
  status)
    for pidfile in "$DIR/munge/munged.pid" "$DIR/mysql/mariadb.pid" "$DIR/run/slurmdbd.pid" \
                   "$DIR/run/slurmctld.pid" "$DIR/run/slurmd-n1.pid" "$DIR/run/slurmd-n2.pid"; do
      if running "$pidfile"; then echo "$(basename "$pidfile" .pid): running ($(cat "$pidfile"))";
      else echo "$(basename "$pidfile" .pid): stopped"; fi
    done
    [ -f "$CONF" ] && sinfo 2>/dev/null || true
    ;;
  env)
    echo "export SLURM_CONF=$CONF"
    ;;
  *)
    echo "usage: $0 start|stop|status|env   (state in \$LOCAL_SLURM_DIR, default $DIR)" >&2
    exit 2
    ;;
esac
