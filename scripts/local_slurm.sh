#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for the tests of nnUNetv2_acnorm_benchmark --executor slurm.
#
#   bash scripts/local_slurm.sh [start]   install slurm-wlm and munge if missing (apt-get; root), write
#                                         slurm.conf, start munged, slurmctld and slurmd, wait until sinfo
#                                         shows the node idle; prints `export SLURM_CONF=...` on its last line
#   bash scripts/local_slurm.sh stop      stop the daemons this script started
#   bash scripts/local_slurm.sh status    sinfo of the local cluster
#
# Idempotent: a second start with the daemons up only waits for the node. Runs without cgroups
# (proctrack/pgid, task/none: containers and CI machines rarely allow them), as root (SlurmUser and
# SlurmdUser root), with the node's real CPUs and memory (slurmd -C) and every file under
# $LOCAL_SLURM_DIR (default /tmp/nnunet_acnorm_slurm). Clients find the cluster through SLURM_CONF; where
# /etc/slurm/slurm.conf does not exist, it becomes a link to this configuration, so that plain sinfo/sbatch
# work too. Ports: LOCAL_SLURM_CTLD_PORT (6817), LOCAL_SLURM_D_PORT (6818).
set -euo pipefail

dir="${LOCAL_SLURM_DIR:-/tmp/nnunet_acnorm_slurm}"
conf="$dir/slurm.conf"
ctld_port="${LOCAL_SLURM_CTLD_PORT:-6817}"
d_port="${LOCAL_SLURM_D_PORT:-6818}"
node="$(hostname -s)"
export SLURM_CONF="$conf"

log() { echo "local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
            && command -v sbatch >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and installing them needs root (apt-get)"
    log "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    local hw cpus mem
    hw="$(slurmd -C | head -1)"
    cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
    [ -n "$cpus" ] && [ -n "$mem" ] || die "cannot read CPUs/RealMemory from 'slurmd -C': $hw"
    cat > "$conf.tmp" <<EOF
# written by scripts/local_slurm.sh: a single-node cluster on localhost, no cgroups, no accounting
ClusterName=nnunetacnorm
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=300
SlurmctldTimeout=60
SlurmdTimeout=60
Waittime=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$conf.tmp" "$conf"
    if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf || true)" = "$conf" ]; then
        mkdir -p /etc/slurm && ln -sfn "$conf" /etc/slurm/slurm.conf
    fi
}

running() {  # pid file -> is its process alive
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --force >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munge does not answer (see /var/log/munge/munged.log)"
}

start_daemons() {
    if ! running "$dir/slurmctld.pid"; then
        slurmctld -f "$conf" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
    fi
    if ! running "$dir/slurmd.pid"; then
        slurmd -f "$conf" -N "$node" || die "slurmd did not start (see $dir/log/slurmd.log)"
    fi
}

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state="$(sinfo -h -n "$node" -o %t 2>/dev/null | head -1 || true)"
        case "$state" in
            idle|mix|alloc) log "node $node is $state (SLURM_CONF=$conf)"; return ;;
            down*|drain*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "slurmctld log (tail):"; tail -n 20 "$dir/log/slurmctld.log" >&2 || true
    log "slurmd log (tail):"; tail -n 20 "$dir/log/slurmd.log" >&2 || true
    die "the node did not become idle within 60 s (last state: '${state:-no answer}')"
}

stop() {
    for daemon in slurmd slurmctld; do
        if running "$dir/$daemon.pid"; then
            local pid; pid="$(cat "$dir/$daemon.pid")"
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            log "stopped $daemon ($pid)"
        fi
    done
    if [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        kill "$(cat /run/munge/munged.pid)" && log "stopped munged"
    fi
}

case "${1:-start}" in
    start)
        [ "$(id -u)" = 0 ] || die "run as root (the local cluster's daemons run as root)"
        install_if_missing
        write_conf
        start_munge
        start_daemons
        wait_idle
        echo "export SLURM_CONF=$conf"
        ;;
    stop) stop ;;
    status) sinfo ;;
    *) die "unknown subcommand '$1' (start, stop, status)" ;;
esac
