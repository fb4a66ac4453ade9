#!/usr/bin/env bash
# A one-node Slurm cluster for the cluster tests: munge + slurmctld + slurmd on this
# machine, everything of ours under $STATE (config, spool, logs, pid files).
#
#   setup_slurm.sh start   installs slurm-wlm, munge, libpmix when missing, starts the daemons
#                          (unless ours already answer) and prints SLURM_CONF's value
#   setup_slurm.sh stop    stops the daemons that `start` started
#
# Needs root. The config lives outside /etc/slurm and is selected with SLURM_CONF, so
# a machine's own Slurm config is never touched. Idempotent: `start` twice is one start.
set -euo pipefail
source "$(dirname "$0")/packages.sh"

STATE=${MEGATRAIN_SLURM_DIR:-/run/megatrain-slurm}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF

log() { echo "setup_slurm: $*" >&2; }

# libpmix-dev: Debian's mpi/pmix plugin dlopens the unversioned libpmix.so it ships.
PACKAGES=(slurm-wlm munge libpmix-dev)

write_config() {
    local node
    node=$(hostname -s)
    mkdir -p "$STATE"/{ctld,spool,log}
    # Root runs everything (SlurmUser=root); linuxproc + task/none need no cgroups, which
    # containers often lack. CPUs=4 on a 2-core machine (config_overrides: trust this
    # file, not the hardware) so that 2-4 tasks fit; every address is the loopback.
    cat >"$CONF" <<EOF
ClusterName=megatrain-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
# A requeued job waits cred_expire (default 120 s) before it may start again, and then for
# the main scheduler's next pass over the pending jobs (every 60 s by default).
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
# sbatch --wait polls every 2 s while that stays under MinJobAge/2 (then every 8, 32 s...).
MinJobAge=5
NodeName=$node NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    # The PMIx inside pip's Open MPI has no munge security module; with the server's
    # default "munge,native" every rank prints a help-file warning before using native.
    echo "PMIxEnv=PMIX_SECURITY_MODE=native" >"$STATE/mpi.conf"
}

start_munge() {
    # Reuse a munged that already answers (ours from an earlier start, or the machine's).
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    runuser -u munge -- munged
    cp /run/munge/munged.pid "$STATE/munged.pid"  # so that `stop` stops only a munged we started
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_idle() {
    local state
    for _ in $(seq 100); do
        state=$(sinfo -h -o %T 2>/dev/null || true)
        [[ $state == idle* || $state == mixed* || $state == allocated* ]] && return
        sleep 0.2
    done
    log "the node did not come up (state: ${state:-none}); logs in $STATE/log"
    tail -n 20 "$STATE"/log/*.log >&2 || true
    exit 1
}

start() {
    [[ $EUID -eq 0 ]] || { log "needs root"; exit 1; }
    install_packages "${PACKAGES[@]}"
    if ! (running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid" && scontrol ping >/dev/null 2>&1); then
        stop
        write_config
        start_munge
        slurmctld -c  # -c: a clean slate, no jobs from an earlier session
        slurmd
    fi
    wait_idle
    echo "$CONF"
}

stop() {
    local pidfile
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile")"
            for _ in $(seq 50); do running "$pidfile" || break; sleep 0.1; done
            if running "$pidfile"; then kill -9 "$(cat "$pidfile")"; fi  # e.g. a slurmd stuck on a dead step
        fi
        rm -f "$pidfile"
    done
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
