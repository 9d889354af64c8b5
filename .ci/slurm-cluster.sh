#!/usr/bin/env bash
# A two-node Slurm cluster on this one host, for the tests marked `slurm` (Debian 12, slurm-wlm 22.05).
#
#   .ci/slurm-cluster.sh start    install (if missing), configure, start munged, slurmctld, slurmd n1 + n2,
#                                 wait until `sinfo` shows both nodes idle (exit 1 with the daemons' logs if not)
#   .ci/slurm-cluster.sh stop     stop the daemons it started, by the process ids in their pid files
#   .ci/slurm-cluster.sh status   the daemons' pids and `sinfo`; exit 0 only when both nodes are idle
#
# No systemd: the daemons are started directly. Both "nodes" are slurmd processes on this host
# (NodeHostname = this host, NodeAddr 127.0.0.1, one port each); n1 and n2 resolve through /etc/hosts.
# Memory: a job's --mem is enforced per node without cgroups, by Slurm's accounting poll (see write_conf).
# Start needs root (apt, /etc/hosts, /etc/slurm). State, logs and pid files live in $BENCH_SLURM_DIR.
set -euo pipefail

DIR=${BENCH_SLURM_DIR:-/tmp/bench-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by bench .ci/slurm-cluster.sh"
NODES=(n1 n2)
WAIT_S=${BENCH_SLURM_WAIT_S:-60}

say() { echo "slurm-cluster: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

alive() {  # alive PIDFILE: the pid in it names a running process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return
    say "installing slurm-wlm munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$DIR/apt.log" 2>&1 &&
        apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$DIR/apt.log" 2>&1 ||
        { tail -n 30 "$DIR/apt.log" >&2; die "apt-get install slurm-wlm munge failed (log: $DIR/apt.log)"; }
}

add_hosts() {  # the node names must resolve; both are this host
    local name
    for name in "${NODES[@]}"; do
        getent hosts "$name" >/dev/null || echo "127.0.0.1 $name  $MARK" >>/etc/hosts
    done
}

write_conf() {
    local host
    host=$(hostname -s)
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away to use the test cluster"
    fi
    mkdir -p /etc/slurm
    # config_overrides: two nodes of CPUs=2 on a 2-core host would otherwise be drained as "low cpu count".
    # KillWait=2: a cancelled or timed-out job is SIGKILLed 2 s after SIGTERM (default 30 s).
    # Memory is enforced without cgroups (none here, task/none): memory is a consumable resource
    # (CR_CPU_Memory; a job without --mem gets DefMemPerNode), and the jobacct_gather/linux poll kills a
    # step whose processes' RSS on a node passes the job's limit (OverMemoryKill; the job then ends
    # FAILED, not OUT_OF_MEMORY, which needs task/cgroup). The poll runs every 30 s (Slurm's default),
    # so it costs the other jobs nothing; a job that tests the limit asks `--acctg-freq=task=1`.
    # RealMemory is not this host's (config_overrides): both nodes share it, and only a job's own
    # limit is meant to be reached.
    cat >"$CONF" <<EOF
$MARK
ClusterName=bench
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=30
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerNode=8000
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=2
InactiveLimit=0
MinJobAge=300
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd.%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.%n.log
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=2 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    alive "$DIR/munged.pid" && return
    # A munged already serving (a package's service on a systemd host) is used as it is, and left running.
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "using the munged already running"; return
    fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --force 2>/dev/null ||
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    # munged refuses to run as root; it writes its pid file itself (copied to $DIR for `stop`).
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid ||
        die "munged did not start (log: /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$DIR/munged.pid"
}

dump_logs() {
    local log
    for log in /var/log/munge/munged.log "$DIR"/slurmctld.log "$DIR"/slurmd.*.log; do
        [[ -f $log ]] && { echo "----- $log (last 25 lines)"; tail -n 25 "$log"; } >&2
    done
    sinfo -N -o '%N %T %E' >&2 2>&1 || true
}

both_idle() {
    [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle" {print $1}' | sort -u | tr '\n' ' ') == "n1 n2 " ]]
}

start() {
    ((EUID == 0)) || die "start needs root (apt-get, /etc/hosts, /etc/slurm)"
    mkdir -p "$DIR"
    if alive "$DIR/slurmctld.pid" && both_idle; then
        say "already up"; return
    fi
    stop_daemons quiet
    install_packages
    add_hosts
    rm -rf "$DIR/ctld" "$DIR"/slurmd.* "$DIR"/slurmctld.*
    mkdir -p "$DIR/ctld"
    write_conf
    start_munge
    slurmctld -c || { dump_logs; die "slurmctld did not start"; }  # -c: no saved jobs from an earlier run
    local name
    for name in "${NODES[@]}"; do
        mkdir -p "$DIR/slurmd.$name"
        slurmd -N "$name" || { dump_logs; die "slurmd -N $name did not start"; }
    done
    local t0=$SECONDS
    until both_idle; do
        if ((SECONDS - t0 >= WAIT_S)); then
            dump_logs
            die "nodes n1 n2 not idle after ${WAIT_S}s (state dir $DIR)"
        fi
        sleep 0.5
    done
    say "up in $((SECONDS - t0))s: $(sinfo -h -o '%P %D nodes %t %N')"
}

stop_daemons() {  # stop_daemons [quiet]: TERM by pid file, then KILL whatever is left after 10 s
    local files=("$DIR"/slurmd.n1.pid "$DIR"/slurmd.n2.pid "$DIR"/slurmctld.pid "$DIR"/munged.pid) f pid
    for f in "${files[@]}"; do
        if alive "$f"; then
            pid=$(cat "$f")
            [[ ${1:-} == quiet ]] || say "stopping $(basename "$f" .pid) (pid $pid)"
            kill "$pid"
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$f"
    done
}

status() {
    local f
    for f in "$DIR"/munged.pid "$DIR"/slurmctld.pid "$DIR"/slurmd.n1.pid "$DIR"/slurmd.n2.pid; do
        local name
        name=$(basename "$f" .pid)
        if alive "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: not running"; fi
    done
    if command -v sinfo >/dev/null; then sinfo -N -o '%N %P %T %C' 2>&1 || true; else echo "sinfo: not installed"; fi
    both_idle
}

case ${1:-} in
    start) start ;;
    stop) stop_daemons ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
