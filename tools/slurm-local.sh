#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the live cluster test (tests/test_slurm_live.py) and for trying
# profiles/slurm before a real cluster (README "SLURM"). Debian/Ubuntu, run as root (apt-get, /etc/slurm, munge).
#
#   tools/slurm-local.sh [start]   install (apt-get, non-interactive) what is missing, write the configuration,
#                                  start munged, [mariadbd + slurmdbd,] slurmctld and slurmd; a second call sees
#                                  the cluster up and does nothing
#   tools/slurm-local.sh status    print the cluster's state and settings (exit 0 when it is up)
#   tools/slurm-local.sh status-command   sacct (accounting is on) or squeue: snakemake's --slurm-status-command
#   tools/slurm-local.sh stop      stop the daemons this script started (and cancel the jobs left on this cluster)
#
# One node (this machine: CPUs and memory as `slurmd -C` detects them), one partition (default: "local").
# Accounting (slurmdbd on a private MariaDB) when it comes up within SLURM_LOCAL_DBD_TIMEOUT seconds (default 60,
# installation included); otherwise none, and the Snakemake SLURM plugin must use `--slurm-status-command squeue`:
# MinJobAge keeps finished jobs listed by squeue for a day either way, so squeue always works; `status` prints
# which command to use (status_command=...).
#
# Environment: SLURM_LOCAL_DIR (state, spool and logs; default /var/tmp/continual-bench-slurm),
#   SLURM_LOCAL_PARTITION (default local), SLURM_LOCAL_ACCOUNTING (auto | yes | no; default auto),
#   SLURM_LOCAL_DBD_TIMEOUT (seconds; default 60).
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/var/tmp/continual-bench-slurm}
PARTITION=${SLURM_LOCAL_PARTITION:-local}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-auto}
DBD_TIMEOUT=${SLURM_LOCAL_DBD_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# written by continual-bench tools/slurm-local.sh"
LOG=$STATE/log
STARTED=$STATE/started          # "<name> <pidfile>" per daemon this script started, in start order
DB_PORT=16819                   # the private MariaDB (127.0.0.1 only); slurmdbd listens on 6819, slurmctld 6817
NODE=$(hostname -s)

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: ERROR: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in it runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

cluster_up() {  # slurmctld answers and our node accepts jobs
    command -v scontrol >/dev/null || return 1
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    local st
    st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)
    [[ $st =~ ^(idle|mixed|allocated|completing)$ ]]
}

accounting_on() {
    command -v sacct >/dev/null && sacct -n -X -S now-1minute >/dev/null 2>&1
}

print_status() {
    local status_command=squeue
    accounting_on && status_command=sacct
    say "cluster $(scontrol show config 2>/dev/null | awk '$1 == "ClusterName" {print $3}'), node $NODE ($(sinfo -h -n "$NODE" -o '%c CPUs, %m MB, %T' 2>/dev/null)), partition $PARTITION"
    say "accounting: $([[ $status_command == sacct ]] && echo "slurmdbd (sacct works)" || echo "none (sacct is disabled)")"
    say "status_command=$status_command    # snakemake ... --slurm-status-command $status_command"
    say "logs: $LOG/ (munged.log, slurmctld.log, slurmd.log$([[ $status_command == sacct ]] && echo ", slurmdbd.log, mariadb.log"))"
}

need_root() {
    [[ $(id -u) == 0 ]] || die "run as root (apt-get, /etc/slurm, munge): sudo $0 $*"
}

apt_install() {  # apt_install PKG...: install the missing ones, non-interactively; services are started by us
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} yourself (Debian/Ubuntu names)"
    say "installing ${missing[*]} (apt-get; log: $LOG/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    # the package scripts must not start the daemons (there may be no init system): a temporary policy-rc.d
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    local opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)
    if ! apt-get install "${opts[@]}" "${missing[@]}" >>"$LOG/apt.log" 2>&1; then
        apt-get update -q >>"$LOG/apt.log" 2>&1 || true
        apt-get install "${opts[@]}" "${missing[@]}" >>"$LOG/apt.log" 2>&1 \
            || { ((own_policy)) && rm -f "$policy"; die "apt-get install ${missing[*]} failed (see $LOG/apt.log)"; }
    fi
    ((own_policy)) && rm -f "$policy"
    return 0
}

check_conf_is_ours() {  # never overwrite a configuration this script did not write
    local f
    for f in "$@"; do
        if [[ -e $f ]] && ! head -1 "$f" | grep -qF "$MARK"; then
            die "$f exists and was not written by this script: this machine has its own SLURM configuration; not touching it"
        fi
    done
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already runs (not started by this script)"
        return
    fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    [[ -e $LOG/munged.log ]] || install -o munge -g munge -m 640 /dev/null "$LOG/munged.log"
    runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid --log-file="$LOG/munged.log"
    echo "munged /run/munge/munged.pid" >>"$STARTED"
    local i
    for i in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not come up (log: $LOG/munged.log)"
}

start_accounting() {  # MariaDB (private data directory, 127.0.0.1:$DB_PORT) + slurmdbd; returns 1 if not up in time
    local deadline=$((SECONDS + DBD_TIMEOUT))
    apt_install slurmdbd mariadb-server || return 1
    local db=$STATE/mariadb
    if [[ ! -d $db/mysql ]]; then
        mkdir -p "$db"
        mariadb-install-db --user=root --datadir="$db" --auth-root-authentication-method=normal \
            --skip-test-db >>"$LOG/mariadb.log" 2>&1 || return 1
    fi
    if ! alive "$STATE/mariadb.pid"; then
        (setsid mariadbd --user=root --datadir="$db" --port=$DB_PORT --bind-address=127.0.0.1 \
            --socket="$STATE/mariadb.sock" --pid-file="$STATE/mariadb.pid" --log-error="$LOG/mariadb.log" \
            --innodb-use-native-aio=0 --innodb-buffer-pool-size=64M --skip-name-resolve \
            </dev/null >/dev/null 2>&1 &)
        echo "mariadbd $STATE/mariadb.pid" >>"$STARTED"
    fi
    until mariadb --socket="$STATE/mariadb.sock" -uroot -e "SELECT 1" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
    mariadb --socket="$STATE/mariadb.sock" -uroot -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm-local';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || return 1
    cat >"$DBD_CONF" <<EOF
$MARK (a test cluster's accounting; see that script)
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm-local
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DBD_CONF"
    if ! alive "$STATE/slurmdbd.pid"; then
        slurmdbd
        echo "slurmdbd $STATE/slurmdbd.pid" >>"$STARTED"
    fi
    write_slurm_conf yes  # sacctmgr reads AccountingStorageType from it
    until sacctmgr -n list cluster >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
    sacctmgr -n -P list cluster format=cluster | grep -qx continual-bench-local \
        || sacctmgr -i add cluster continual-bench-local >>"$LOG/slurmdbd.log" 2>&1 || return 1
    return 0
}

write_slurm_conf() {  # write_slurm_conf ACCOUNTING(yes|no)
    # the machine as slurmd detects it (CPUs, sockets, cores, threads, memory), minus a little memory for the OS
    local hw mem
    hw=$(slurmd -C | head -1 | sed -e "s/^NodeName=[^ ]* //" -e "s/ *RealMemory=[0-9]*//")
    mem=$(slurmd -C | head -1 | sed -n "s/.*RealMemory=\([0-9]*\).*/\1/p")
    mem=$((mem * 95 / 100))
    local acct="AccountingStorageType=accounting_storage/none"
    [[ $1 == yes ]] && acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    cat >"$CONF" <<EOF
$MARK (a one-node test cluster; see that script)
ClusterName=continual-bench-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups (containers): processes tracked through /proc, no binding, no enforcement of memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
$acct
JobCompType=jobcomp/none
# a test cluster: schedule at once on submit and completion, short timers; finished jobs stay listed by squeue
# (and scontrol) for a day, so the Snakemake plugin's squeue status query sees them (MinJobAge)
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5
MinJobAge=86400
KillWait=5
CompleteWait=0
MessageTimeout=10
SlurmdTimeout=60
InactiveLimit=0
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    need_root start
    mkdir -p "$LOG" "$STATE/slurmctld" "$STATE/slurmd"
    if cluster_up; then
        say "already running: nothing to do"
        print_status
        return 0
    fi
    check_conf_is_ours "$CONF" "$DBD_CONF"
    local t0=$SECONDS
    apt_install munge slurmctld slurmd slurm-client
    start_munge
    local with_dbd=no
    if [[ $ACCOUNTING != no ]]; then
        if start_accounting; then
            with_dbd=yes
        elif [[ $ACCOUNTING == yes ]]; then
            die "accounting (slurmdbd) did not come up within ${DBD_TIMEOUT}s (logs: $LOG/slurmdbd.log, $LOG/mariadb.log, $LOG/apt.log)"
        else
            say "accounting (slurmdbd) did not come up within ${DBD_TIMEOUT}s: running without it (squeue status; logs: $LOG/slurmdbd.log, $LOG/mariadb.log)"
            stop_named slurmdbd mariadbd
        fi
    fi
    write_slurm_conf $with_dbd
    if ! alive "$STATE/slurmctld.pid"; then
        slurmctld -i
        echo "slurmctld $STATE/slurmctld.pid" >>"$STARTED"
    else
        scontrol reconfigure
    fi
    local i
    for i in $(seq 100); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.2; done
    if ! alive "$STATE/slurmd.pid"; then
        slurmd
        echo "slurmd $STATE/slurmd.pid" >>"$STARTED"
    fi
    for i in $(seq 150); do
        cluster_up && break
        # a node that was down before (an earlier stop) comes back on resume
        [[ $(sinfo -h -n "$NODE" -o %T 2>/dev/null) =~ down|drain ]] && scontrol update nodename="$NODE" state=resume 2>/dev/null
        sleep 0.2
    done
    cluster_up || die "the node did not become idle (logs: $LOG/slurmctld.log, $LOG/slurmd.log; sinfo: $(sinfo -h 2>&1))"
    say "up in $((SECONDS - t0)) s"
    print_status
}

stop_named() {  # stop_named NAME...: stop these daemons if this script started them (pid files in $STARTED)
    [[ -s $STARTED ]] || return 0
    local name pidfile want keep=()
    while read -r name pidfile; do
        want=0
        for n in "$@"; do [[ $n == "$name" ]] && want=1; done
        if ((want)); then
            if alive "$pidfile"; then
                local pid
                pid=$(cat "$pidfile")
                kill "$pid" 2>/dev/null || true
                for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
                kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
                say "stopped $name (pid $pid)"
            fi
        else
            keep+=("$name $pidfile")
        fi
    done < <(tac "$STARTED")
    if ((${#keep[@]})); then printf '%s\n' "${keep[@]}" | tac >"$STARTED"; else rm -f "$STARTED"; fi
}

stop() {
    need_root stop
    if [[ ! -s $STARTED ]]; then
        say "nothing started by this script is running"
        return 0
    fi
    if cluster_up; then
        local jobs
        jobs=$(squeue -h -t pending,running,completing -o %i 2>/dev/null | tr '\n' ' ')
        [[ -n ${jobs// } ]] && { say "cancelling jobs still on this cluster: $jobs"; scancel $jobs || true; }
    fi
    stop_named slurmd slurmctld slurmdbd mariadbd munged
    say "stopped (logs kept in $LOG/)"
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status)
        if cluster_up; then print_status; else say "not running"; exit 1; fi ;;
    status-command)  # what to pass to snakemake's --slurm-status-command on this cluster
        cluster_up || die "not running (tools/slurm-local.sh start)"
        if accounting_on; then echo sacct; else echo squeue; fi ;;
    *) die "usage: $0 [start|status|status-command|stop]" ;;
esac
