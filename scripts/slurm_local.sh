#!/usr/bin/env bash
# A one-node SLURM on this machine, for the tests marked `slurm` (CI runs them against it).
#
#   bash scripts/slurm_local.sh start   # install slurm-wlm and munge (apt, once), configure, start, wait until idle
#   bash scripts/slurm_local.sh stop    # stop the daemons this script started
#   bash scripts/slurm_local.sh cpus    # the CPUs the node is declared with
#
# Runs as root on Debian. No accounting database (sacct is unavailable), no cgroups:
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none work inside containers.
set -euo pipefail

STATE=/var/lib/untrainable-slurm
CONF=/etc/slurm/slurm.conf

install() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

cpus() {
    # Every core of the machine, as slurmd counts them: plain nproc honours OMP_NUM_THREADS and OMP_THREAD_LIMIT,
    # common in cluster environments, and a node declared with one CPU never starts a two-task job (PartitionConfig).
    nproc --all
}

configure() {
    local host cpus memory
    host=$(hostname -s)
    cpus=$(cpus)
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm /run/munge /var/lib/munge /var/log/munge
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: one node, this host.
ClusterName=untrainable
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerParameters=defer_no
# Short waits: a test's cancelled or timed-out job leaves quickly.
KillWait=10
MinJobAge=120
InactiveLimit=0
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
}

alive() {
    # Whether the PID in file $1 is a live process (not a zombie left by an earlier stop).
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1  # a daemon removes its file as it exits: gone is not alive
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] && ! awk '{exit $3 == "Z" ? 0 : 1}' "/proc/$pid/stat" 2>/dev/null
}

start() {
    install
    configure
    alive /run/munge/munged.pid || munged --force 2>/dev/null
    alive "$STATE/slurmctld.pid" || slurmctld
    alive "$STATE/slurmd.pid" || slurmd
    for _ in $(seq 1 60); do
        if timeout 5 sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
            echo "slurm_local: node $(hostname -s) idle ($(cpus) CPUs)"
            return
        fi
        sleep 0.5
    done
    echo "slurm_local: the node did not become idle within 30 s; see /var/log/slurm/" >&2
    sinfo >&2 || true
    exit 1
}

stop() {
    # The daemons started above, by the PIDs their own files hold.
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
        if alive "$pidfile"; then
            kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
            for _ in $(seq 1 50); do alive "$pidfile" || break; sleep 0.1; done
        fi
    done
    echo "slurm_local: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    cpus) cpus ;;
    *)
        echo "usage: $0 start|stop|cpus" >&2
        exit 2
        ;;
esac
