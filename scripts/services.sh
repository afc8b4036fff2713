#!/usr/bin/env bash
# Real, throw-away Redis / etcd / ZooKeeper / Consul servers on loopback for
# dcron's tests, on a bare Debian 12 machine (root, no systemd, no Docker).
#
# stdout carries only results meant for programs (PIDs, a URL, a port, the env
# file path); progress and errors go to stderr. Run `services.sh help`.
set -euo pipefail
shopt -s inherit_errexit

SCRIPT_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)
DCRON_TEST_DIR=${DCRON_TEST_DIR:-$REPO_ROOT/.dcron-test}
mkdir -p "$DCRON_TEST_DIR"
DCRON_TEST_DIR=$(cd "$DCRON_TEST_DIR" && pwd)
RUN_DIR=$DCRON_TEST_DIR/run               # state of the shared servers of `up`
ENV_FILE=$DCRON_TEST_DIR/env              # written by `up`, for `source`
SPAWNED=$DCRON_TEST_DIR/spawned           # servers the building blocks started: NAME PID START SESSION
SESSION=${DCRON_TEST_SESSION:--}          # scripts/test.sh sets one per run
CONSUL_DIR=$DCRON_TEST_DIR/tools/consul   # the unpacked consul .deb
CONSUL_BIN=${DCRON_CONSUL_BIN:-$CONSUL_DIR/usr/bin/consul}
START_TIMEOUT=${DCRON_START_TIMEOUT:-30}  # seconds until a server must be ready
STOP_TIMEOUT=${DCRON_STOP_TIMEOUT:-3}     # seconds between SIGTERM and SIGKILL (throw-away state:
                                          # an etcd leader would spend 5 s on a futile leadership transfer)

APT_PACKAGES=(redis-server redis-tools etcd-server etcd-client zookeeper
              protobuf-compiler libprotobuf-dev curl procps
              libssl-dev pkg-config)
ZK_CLASSPATH=/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar

# Ports of the shared servers started by `up`.
UP_REDIS_PORT=16379
UP_ETCD_CLIENT_PORT=12379
UP_ETCD_PEER_PORT=12380
UP_ZK_PORT=12181
UP_CONSUL_HTTP_PORT=18500
UP_CONSUL_SERVER_PORT=18300   # serf LAN / WAN use the next two ports

usage() {
    cat <<EOF
usage: services.sh COMMAND [ARGS]

Setup:
  install                  install missing Debian packages and the consul binary
  up                       start the shared test servers, write \$DCRON_TEST_DIR/env
  down                     stop the servers of \`up\` and those the building blocks
                           started (only the ones of this DCRON_TEST_SESSION if set)

Building blocks (start one throw-away server on 127.0.0.1, print its PID):
  redis PORT DIR
  etcd NAME CLIENT_PORT PEER_PORT DIR [INITIAL_CLUSTER [new|existing]]
                           INITIAL_CLUSTER like e1=http://127.0.0.1:P1,e2=...;
                           a lone member waits until /health is true, a member
                           of a larger cluster only until its peer port listens
  etcd-cluster BASE_PORT DIR
                           3 members: client ports BASE..BASE+2, peer ports
                           BASE+10..BASE+12; prints "pid1 pid2 pid3"
  etcd-wait ENDPOINTS      wait until every endpoint (comma-separated URLs) is healthy
  zk ID CLIENT_PORT DIR [SERVERS]
                           SERVERS like 1=127.0.0.1:Q1:E1,2=127.0.0.1:Q2:E2,...;
                           standalone waits for a "Mode:" in srvr, an ensemble
                           member only until its client port listens
  zk-ensemble BASE_PORT DIR
                           3 servers (ids 1..3): client ports BASE..BASE+2,
                           quorum BASE+10..12, election BASE+20..22; prints "pid1 pid2 pid3"
  zk-wait PORT...          wait until every server answers srvr with a "Mode:" line
  consul HTTP_PORT SERVER_PORT DIR
                           dev agent; serf LAN/WAN on SERVER_PORT+1/+2
  leader-etcd ENDPOINTS    print the client URL of the current etcd leader
  leader-zk BASE_PORT      print the client port (BASE..BASE+2) of the ZooKeeper leader
  kill [-9] PID...         SIGTERM (or SIGKILL at once with -9), SIGKILL after
                           ${STOP_TIMEOUT}s, and wait until each has exited

Environment: DCRON_TEST_DIR (default <repo>/.dcron-test), DCRON_CONSUL_BIN,
DCRON_START_TIMEOUT (${START_TIMEOUT}s), DCRON_STOP_TIMEOUT (${STOP_TIMEOUT}s).
Server state stays in DIR, so starting again with the same DIR resumes it.
EOF
}

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- processes

# `kill -0` succeeds on zombies (nothing reaps re-parented children here), so
# a process counts as running only if ps shows it in a state other than Z.
is_running() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $stat && $stat != Z* ]]
}

# Start time (field 22 of /proc/PID/stat): with the PID it identifies a
# process even after the PID is reused by another one.
start_time() {
    local line f
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    line=${line##*) }      # drop "pid (comm) ", comm may contain spaces
    read -r -a f <<<"$line"
    echo "${f[19]}"
}

# stop_pids SIGNAL PID...: send SIGNAL to all, then wait for each to exit,
# escalating to SIGKILL after STOP_TIMEOUT (etcd / ZooKeeper take 1-2 s).
stop_pids() {
    local sig=$1 pid deadline; shift
    for pid; do
        [[ $pid =~ ^[0-9]+$ ]] || die "not a PID: $pid"
        if is_running "$pid"; then kill -s "$sig" "$pid" 2>/dev/null || true; fi
    done
    for pid; do
        deadline=$((SECONDS + STOP_TIMEOUT))
        while is_running "$pid" && ((SECONDS < deadline)); do sleep 0.05; done
        if is_running "$pid"; then
            log "pid $pid still running ${STOP_TIMEOUT}s after SIG$sig: sending SIGKILL"
            kill -s KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 10))
            while is_running "$pid" && ((SECONDS < deadline)); do sleep 0.05; done
            is_running "$pid" && die "pid $pid survived SIGKILL"
        fi
        wait "$pid" 2>/dev/null || true   # reap it if it is our own child
    done
}

# spawn DIR LOG CMD...: start CMD in the background with DIR as working
# directory; sets SPAWNED_PID. Its stdin/stdout/stderr and every other
# inherited descriptor are detached: callers such as Rust's
# Command::output() wait for EOF on their pipes, and an inherited lock
# descriptor would stay held as long as the server lives.
spawn() {
    local dir=$1 logfile=$2; shift 2
    (
        cd "$dir"
        for fd in "/proc/$BASHPID/fd/"*; do
            fd=${fd##*/}
            if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec "$@"
    ) </dev/null >>"$logfile" 2>&1 &
    SPAWNED_PID=$!
}

# record NAME PID: remember a started server so that `down` can stop it even
# if the test that started it died before killing it. The session keeps one
# test run's `down` off the servers of another run in the same tree.
record() {
    local st
    st=$(start_time "$2") || return 0
    echo "$1 $2 $st $SESSION" >>"$SPAWNED"
}

# start_failed PID LOG MESSAGE: stop the half-started server, show its log, exit.
start_failed() {
    log "error: $3"
    stop_pids KILL "$1" 2>/dev/null || true
    log "---- last lines of $2 ----"
    tail -n 40 "$2" >&2 || true
    log "----"
    exit 1
}

# wait_ready PID LOG WHAT CHECK...: poll CHECK until it succeeds; fail fast if
# the server exits, fail after START_TIMEOUT seconds.
wait_ready() {
    local pid=$1 logfile=$2 what=$3 deadline=$((SECONDS + START_TIMEOUT)); shift 3
    until "$@" >/dev/null 2>&1; do
        is_running "$pid" || start_failed "$pid" "$logfile" "$what exited before becoming ready"
        ((SECONDS < deadline)) || start_failed "$pid" "$logfile" "$what not ready after ${START_TIMEOUT}s"
        sleep 0.05
    done
}

# ---------------------------------------------------------------- ports and probes

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starting on a busy port would make the readiness probe talk to the old
# server, so refuse up front.
require_free_ports() {
    local what=$1 port; shift
    for port; do
        if [[ ! $port =~ ^[0-9]+$ ]] || ((port == 0 || port > 65535)); then die "$what: bad port '$port'"; fi
        if port_in_use "$port"; then
            log "error: $what: port $port on 127.0.0.1 is already in use"
            if command -v ss >/dev/null; then ss -ltnpH "sport = :$port" >&2 || true; fi
            exit 1
        fi
    done
}

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

redis_ready() { [[ $(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]]; }

etcd_healthy() { curl -fsS --max-time 2 "$1/health" 2>/dev/null | grep -q '"health":"true"'; }

etcd_all_healthy() {
    local ep
    for ep in ${1//,/ }; do etcd_healthy "$ep" || return 1; done
}

# zk_4lw PORT WORD: send a ZooKeeper four-letter command, print the answer.
zk_4lw() {
    # shellcheck disable=SC2016  # $1 and $2 belong to the inner shell
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf %s "$2" >&3 && cat <&3' _ "$1" "$2" 2>/dev/null
}
zk_mode() { zk_4lw "$1" srvr | sed -n 's/^Mode: //p'; }
zk_serving() { [[ -n $(zk_mode "$1") ]]; }
zk_all_serving() {
    local p
    for p; do zk_serving "$p" || return 1; done
}

consul_ready() {
    [[ $(curl -fsS --max-time 2 "http://127.0.0.1:$1/v1/status/leader" 2>/dev/null) =~ ^\"[^\"]+\"$ ]]
}

need() {   # need CMD...: fail with a hint when a tool is missing
    local c
    for c; do
        [[ $c == /* && -x $c ]] || command -v "$c" >/dev/null 2>&1 \
            || die "$c not found: run 'bash $SCRIPT_PATH install' first"
    done
}

# ---------------------------------------------------------------- building blocks

cmd_redis() {
    (($# == 2)) || die "usage: redis PORT DIR"
    local port=$1 dir
    need redis-server redis-cli
    require_free_ports redis "$port"
    dir=$(abs_dir "$2")
    # Redis writes its own log (--logfile); early errors still go to stdout.
    spawn "$dir" "$dir/redis.log" redis-server --bind 127.0.0.1 --port "$port" \
        --save '' --appendonly no --dir "$dir" --logfile "$dir/redis.log"
    local pid=$SPAWNED_PID
    wait_ready "$pid" "$dir/redis.log" "redis on port $port" redis_ready "$port"
    record redis "$pid"
    echo "$pid"
}

cmd_etcd() {
    (($# >= 4 && $# <= 6)) || die "usage: etcd NAME CLIENT_PORT PEER_PORT DIR [INITIAL_CLUSTER [new|existing]]"
    local name=$1 cport=$2 pport=$3 dir
    local initial=${5:-$1=http://127.0.0.1:$3} state=${6:-new}
    need etcd curl
    require_free_ports "etcd $name" "$cport" "$pport"
    dir=$(abs_dir "$4")
    spawn "$dir" "$dir/etcd.log" etcd --name "$name" --data-dir "$dir/data" \
        --logger zap --log-outputs stderr \
        --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
        --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
        --initial-cluster "$initial" --initial-cluster-state "$state"
    local pid=$SPAWNED_PID
    if [[ $initial == *,* ]]; then
        # /health is only true once a quorum exists, which needs the other
        # members: wait for the peer listener; etcd-cluster/etcd-wait do the rest.
        wait_ready "$pid" "$dir/etcd.log" "etcd $name (peer port $pport)" port_in_use "$pport"
    else
        wait_ready "$pid" "$dir/etcd.log" "etcd $name on port $cport" etcd_healthy "http://127.0.0.1:$cport"
    fi
    record etcd "$pid"
    echo "$pid"
}

cmd_etcd_cluster() {
    (($# == 2)) || die "usage: etcd-cluster BASE_PORT DIR"
    local base=$1 dir i endpoints=() initial=""
    dir=$(abs_dir "$2")
    require_free_ports etcd-cluster $((base)) $((base + 1)) $((base + 2)) \
        $((base + 10)) $((base + 11)) $((base + 12))
    group_cleanup_on_failure
    for i in 1 2 3; do
        initial+="${initial:+,}e$i=http://127.0.0.1:$((base + 9 + i))"
        endpoints+=("http://127.0.0.1:$((base + i - 1))")
        rm -rf "$dir/e$i/data"   # a new cluster: never resume an old member's data
    done
    for i in 1 2 3; do
        GROUP_PIDS+=("$(cmd_etcd "e$i" $((base + i - 1)) $((base + 9 + i)) "$dir/e$i" "$initial" new)")
    done
    wait_group "etcd cluster" "$dir"/e?/etcd.log -- etcd_all_healthy "$(IFS=,; echo "${endpoints[*]}")"
    trap - EXIT
    echo "${GROUP_PIDS[*]}"
}

# A cluster command that fails half-way stops the members it did start.
GROUP_PIDS=()
group_cleanup_on_failure() {
    trap 'if (($? != 0 && ${#GROUP_PIDS[@]})); then stop_pids KILL "${GROUP_PIDS[@]}" 2>/dev/null || true; fi' EXIT
}

# wait_group WHAT LOG... -- CHECK...: like wait_ready for all of GROUP_PIDS;
# on failure show every log and exit (the EXIT trap stops the members).
wait_group() {
    local what=$1 logs=() deadline=$((SECONDS + START_TIMEOUT)) pid l reason; shift
    while [[ $1 != -- ]]; do logs+=("$1"); shift; done
    shift
    until "$@" >/dev/null 2>&1; do
        reason=""
        for pid in "${GROUP_PIDS[@]}"; do is_running "$pid" || reason="pid $pid exited"; done
        ((SECONDS < deadline)) || reason="not ready after ${START_TIMEOUT}s"
        if [[ -n $reason ]]; then
            log "error: $what: $reason"
            for l in "${logs[@]}"; do log "---- last lines of $l ----"; tail -n 20 "$l" >&2 || true; done
            exit 1
        fi
        sleep 0.1
    done
}

cmd_etcd_wait() {
    (($# == 1)) || die "usage: etcd-wait ENDPOINTS"
    local deadline=$((SECONDS + START_TIMEOUT))
    until etcd_all_healthy "$1"; do
        ((SECONDS < deadline)) || die "etcd endpoints $1 not all healthy after ${START_TIMEOUT}s"
        sleep 0.1
    done
}

cmd_zk() {
    (($# == 3 || $# == 4)) || die "usage: zk ID CLIENT_PORT DIR [SERVERS]"
    local id=$1 cport=$2 servers=${4:-} dir own_ports=() s
    need java
    [[ -r /usr/share/java/zookeeper.jar && -r /usr/share/java/slf4j-simple.jar ]] \
        || die "ZooKeeper jars missing: run 'bash $SCRIPT_PATH install' first"
    if [[ ! $id =~ ^[0-9]+$ ]] || ((id == 0)); then die "zk: ID must be a positive integer"; fi
    for s in ${servers//,/ }; do   # our own quorum / election ports must be free too
        [[ $s =~ ^([0-9]+)=([^:]+):([0-9]+):([0-9]+)$ ]] || die "zk: bad server '$s' (want ID=HOST:QUORUM_PORT:ELECTION_PORT)"
        if ((BASH_REMATCH[1] == id)); then own_ports=("${BASH_REMATCH[3]}" "${BASH_REMATCH[4]}"); fi
    done
    [[ -z $servers || ${#own_ports[@]} -eq 2 ]] || die "zk: server $id is not in SERVERS '$servers'"
    require_free_ports "zk $id" "$cport" "${own_ports[@]}"
    dir=$(abs_dir "$3")
    mkdir -p "$dir/data"
    echo "$id" >"$dir/data/myid"
    # Short ticks for fast elections and session expiry; the admin server
    # would bind 8080; forceSync=no because the state is thrown away anyway.
    {
        echo "tickTime=500"
        echo "initLimit=20"
        echo "syncLimit=10"
        echo "minSessionTimeout=1000"
        echo "maxSessionTimeout=60000"
        echo "dataDir=$dir/data"
        echo "clientPort=$cport"
        echo "clientPortAddress=127.0.0.1"
        echo "maxClientCnxns=0"
        echo "admin.enableServer=false"
        echo "4lw.commands.whitelist=ruok,srvr,stat,mntr"
        echo "forceSync=no"
        for s in ${servers//,/ }; do echo "server.${s%%=*}=${s#*=}"; done
    } >"$dir/zoo.cfg"
    spawn "$dir" "$dir/zk.log" java -Xmx256m -XX:+UseSerialGC -cp "$ZK_CLASSPATH" \
        org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/zoo.cfg"
    local pid=$SPAWNED_PID
    if [[ -n $servers ]]; then
        # An ensemble member serves only once a quorum exists: wait for the
        # client listener; zk-ensemble/zk-wait wait for "Mode:".
        wait_ready "$pid" "$dir/zk.log" "zk $id (client port $cport)" port_in_use "$cport"
    else
        # `ruok` answers before the server serves; srvr's "Mode:" does not.
        wait_ready "$pid" "$dir/zk.log" "zk $id on port $cport" zk_serving "$cport"
    fi
    record zookeeper "$pid"
    echo "$pid"
}

cmd_zk_ensemble() {
    (($# == 2)) || die "usage: zk-ensemble BASE_PORT DIR"
    local base=$1 dir i ports=() servers=""
    dir=$(abs_dir "$2")
    for i in 1 2 3; do
        servers+="${servers:+,}$i=127.0.0.1:$((base + 9 + i)):$((base + 19 + i))"
        ports+=($((base + i - 1)))
        rm -rf "$dir/zk$i/data"   # a new ensemble: never resume old data
    done
    require_free_ports zk-ensemble "${ports[@]}" $((base + 10)) $((base + 11)) $((base + 12)) \
        $((base + 20)) $((base + 21)) $((base + 22))
    group_cleanup_on_failure
    for i in 1 2 3; do
        GROUP_PIDS+=("$(cmd_zk "$i" $((base + i - 1)) "$dir/zk$i" "$servers")")
    done
    wait_group "zk ensemble" "$dir"/zk?/zk.log -- zk_all_serving "${ports[@]}"
    trap - EXIT
    echo "${GROUP_PIDS[*]}"
}

cmd_zk_wait() {
    (($# >= 1)) || die "usage: zk-wait PORT..."
    local deadline=$((SECONDS + START_TIMEOUT))
    until zk_all_serving "$@"; do
        ((SECONDS < deadline)) || die "ZooKeeper on ports $* not all serving after ${START_TIMEOUT}s"
        sleep 0.1
    done
}

cmd_consul() {
    (($# == 3)) || die "usage: consul HTTP_PORT SERVER_PORT DIR"
    local http=$1 srv=$2 dir
    need "$CONSUL_BIN" curl
    require_free_ports consul "$http" "$srv" $((srv + 1)) $((srv + 2))
    dir=$(abs_dir "$3")
    # -dev keeps its state in memory. The update check would call out to the
    # internet: both switches turn it off.
    spawn "$dir" "$dir/consul.log" env CHECKPOINT_DISABLE=1 "$CONSUL_BIN" agent -dev \
        -node="dcron-test-$http" -bind=127.0.0.1 -client=127.0.0.1 \
        -http-port="$http" -server-port="$srv" -serf-lan-port=$((srv + 1)) \
        -serf-wan-port=$((srv + 2)) -dns-port=-1 -grpc-port=-1 \
        -hcl 'disable_update_check = true'
    local pid=$SPAWNED_PID
    wait_ready "$pid" "$dir/consul.log" "consul on port $http" consul_ready "$http"
    record consul "$pid"
    echo "$pid"
}

# The leader is the member whose own status says IS LEADER = true; a dead
# member does not answer, so right after the leader is killed we keep asking
# until a new one has been elected.
cmd_leader_etcd() {
    (($# == 1)) || die "usage: leader-etcd ENDPOINTS"
    need etcdctl
    local deadline=$((SECONDS + START_TIMEOUT)) leader
    while :; do
        leader=$(ETCDCTL_API=3 etcdctl --endpoints="$1" --dial-timeout=1s --command-timeout=1s \
                endpoint status -w table 2>/dev/null | awk -F'|' '
            { for (i = 2; i < NF; i++) { v = $i; gsub(/^ +| +$/, "", v); c[i] = v } }
            c[2] == "ENDPOINT" { for (i = 2; i < NF; i++) col[c[i]] = i; next }
            ("IS LEADER" in col) && c[col["IS LEADER"]] == "true" { print c[col["ENDPOINT"]]; exit }') || true
        if [[ -n $leader ]]; then echo "$leader"; return; fi
        ((SECONDS < deadline)) || die "no etcd leader among $1 after ${START_TIMEOUT}s"
        sleep 0.1
    done
}

cmd_leader_zk() {
    (($# == 1)) || die "usage: leader-zk BASE_PORT"
    local base=$1 deadline=$((SECONDS + START_TIMEOUT)) p
    while :; do
        for p in $((base)) $((base + 1)) $((base + 2)); do
            if [[ $(zk_mode "$p") == leader ]]; then echo "$p"; return; fi
        done
        ((SECONDS < deadline)) || die "no ZooKeeper leader on ports $base..$((base + 2)) after ${START_TIMEOUT}s"
        sleep 0.1
    done
}

cmd_kill() {
    local sig=TERM
    if [[ ${1:-} == -9 || ${1:-} == -KILL ]]; then sig=KILL; shift; fi
    (($# >= 1)) || die "usage: kill [-9] PID..."
    stop_pids "$sig" "$@"
}

# ---------------------------------------------------------------- up / down

cmd_down() {
    local f name pid st sess live=() seen=" " keep=()
    for f in "$RUN_DIR/pids" "$SPAWNED"; do
        [[ -f $f ]] || continue
        while read -r name pid st sess; do
            [[ -n ${pid:-} && $seen != *" $pid "* ]] || continue
            seen+="$pid "
            # Only the very process we started: its PID may have been reused.
            if ! { [[ $(start_time "$pid" 2>/dev/null) == "$st" ]] && is_running "$pid"; }; then continue; fi
            if [[ $f == "$SPAWNED" && $SESSION != - && ${sess:--} != "$SESSION" ]]; then
                keep+=("$name $pid $st $sess")   # another run's server
                continue
            fi
            log "stopping $name (pid $pid)"
            live+=("$pid")
        done <"$f"
    done
    ((${#live[@]} == 0)) || stop_pids TERM "${live[@]}"
    if ((${#keep[@]})); then printf '%s\n' "${keep[@]}" >"$SPAWNED"; else rm -f "$SPAWNED"; fi
    rm -f "$ENV_FILE"
    # The marker guards against removing a directory this script did not make.
    if [[ -f $RUN_DIR/.dcron-run ]]; then rm -rf "$RUN_DIR"; fi
}

cmd_up() {
    local t0=$EPOCHREALTIME pid
    cmd_down
    need redis-server redis-cli etcd curl java "$CONSUL_BIN"
    local busy=()
    for pid in "redis:$UP_REDIS_PORT" "etcd:$UP_ETCD_CLIENT_PORT" "etcd-peer:$UP_ETCD_PEER_PORT" \
        "zookeeper:$UP_ZK_PORT" "consul-http:$UP_CONSUL_HTTP_PORT" \
        "consul-server:$UP_CONSUL_SERVER_PORT" "consul-serf-lan:$((UP_CONSUL_SERVER_PORT + 1))" \
        "consul-serf-wan:$((UP_CONSUL_SERVER_PORT + 2))"; do
        if port_in_use "${pid#*:}"; then busy+=("$pid"); fi
    done
    if ((${#busy[@]})); then
        if command -v ss >/dev/null; then
            for pid in "${busy[@]}"; do ss -ltnpH "sport = :${pid#*:}" >&2 || true; done
        fi
        die "port(s) already in use by a process that services.sh did not start: ${busy[*]} (name:port). Stop that process and retry."
    fi
    mkdir -p "$RUN_DIR"
    touch "$RUN_DIR/.dcron-run"
    : >"$RUN_DIR/pids"
    # On any failure below, stop whatever did start.
    trap 'if (($? != 0)); then log "up failed: stopping what was started"; cmd_down; fi' EXIT
    pid=$(cmd_redis "$UP_REDIS_PORT" "$RUN_DIR/redis")
    echo "redis $pid $(start_time "$pid")" >>"$RUN_DIR/pids"
    pid=$(cmd_etcd dcron "$UP_ETCD_CLIENT_PORT" "$UP_ETCD_PEER_PORT" "$RUN_DIR/etcd")
    echo "etcd $pid $(start_time "$pid")" >>"$RUN_DIR/pids"
    pid=$(cmd_zk 1 "$UP_ZK_PORT" "$RUN_DIR/zookeeper")
    echo "zookeeper $pid $(start_time "$pid")" >>"$RUN_DIR/pids"
    pid=$(cmd_consul "$UP_CONSUL_HTTP_PORT" "$UP_CONSUL_SERVER_PORT" "$RUN_DIR/consul")
    echo "consul $pid $(start_time "$pid")" >>"$RUN_DIR/pids"
    {
        printf 'export DCRON_REDIS_URL=%q\n' "redis://127.0.0.1:$UP_REDIS_PORT"
        printf 'export DCRON_ETCD_ENDPOINTS=%q\n' "http://127.0.0.1:$UP_ETCD_CLIENT_PORT"
        printf 'export DCRON_ZK_CONNECT=%q\n' "127.0.0.1:$UP_ZK_PORT"
        printf 'export DCRON_CONSUL_ADDR=%q\n' "http://127.0.0.1:$UP_CONSUL_HTTP_PORT"
        printf 'export DCRON_SERVICES=%q\n' "$SCRIPT_PATH"
        printf 'export DCRON_CONSUL_BIN=%q\n' "$CONSUL_BIN"
        printf 'export DCRON_TEST_DIR=%q\n' "$DCRON_TEST_DIR"
    } >"$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
    trap - EXIT
    log "up: redis :$UP_REDIS_PORT, etcd :$UP_ETCD_CLIENT_PORT, zookeeper :$UP_ZK_PORT, consul :$UP_CONSUL_HTTP_PORT ready in $(elapsed "$t0")"
    echo "$ENV_FILE"
}

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'; }

# ---------------------------------------------------------------- install

pkg_installed() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }

# The mirror this machine already uses (never hard-code a host name).
mirror_uri() {
    local uri=""
    if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
        uri=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $uri && -r /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" && !/security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
    fi
    [[ -n $uri ]] || die "cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
    echo "$uri"
}

# Consul is not in Debian 12, but Debian 11 ships a real 1.8.7 server. Fetch
# that .deb with a private apt configuration (the system's sources stay
# untouched) and unpack it instead of installing it.
fetch_consul() {
    local work=$DCRON_TEST_DIR/tools/apt uri keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    uri=$(mirror_uri)
    rm -rf "$work" "$CONSUL_DIR.tmp"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
    if [[ -r $keyring ]]; then
        echo "deb [signed-by=$keyring] $uri bullseye main" >"$work/sources.list"
    else
        echo "deb $uri bullseye main" >"$work/sources.list"
    fi
    local opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o Dir::Etc::sourceparts=-
                -o "Dir::State::lists=$work/lists" -o "Dir::Cache=$work/cache"
                -o APT::Sandbox::User=root -o Acquire::Languages=none
                -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false -q)
    log "install: fetching consul from Debian 11 (bullseye)"
    apt-get "${opts[@]}" update >&2
    (cd "$work/deb" && apt-get "${opts[@]}" download consul >&2)
    dpkg-deb -x "$work"/deb/consul_*.deb "$CONSUL_DIR.tmp"
    rm -rf "$CONSUL_DIR"
    mv "$CONSUL_DIR.tmp" "$CONSUL_DIR"   # only a complete unpack counts as installed
    rm -rf "$work"
}

cmd_install() {
    local t0=$EPOCHREALTIME missing=() p
    for p in "${APT_PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    if ((${#missing[@]})); then
        ((EUID == 0)) || die "missing packages ${missing[*]}: run as root"
        log "install: apt packages ${missing[*]}"
        # Without systemd, post-install scripts would start the distro's
        # services on the default ports: a policy-rc.d that exits 101 forbids it.
        # (An existing policy-rc.d is left alone.)
        local policy=/usr/sbin/policy-rc.d created_policy=0
        if [[ ! -e $policy ]]; then
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
            printf '#!/bin/sh\nexit 101\n' >"$policy"
            chmod 755 "$policy"
            created_policy=1
        fi
        export DEBIAN_FRONTEND=noninteractive
        local apt_opts=(-q -o DPkg::Lock::Timeout=600)
        apt-get "${apt_opts[@]}" update >&2
        apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}" >&2
        if ((created_policy)); then rm -f "$policy"; trap - EXIT; fi
    else
        log "install: apt packages already present"
    fi
    if [[ -x $CONSUL_BIN ]]; then
        log "install: consul already at $CONSUL_BIN"
    else
        [[ $CONSUL_BIN == "$CONSUL_DIR/usr/bin/consul" ]] \
            || die "DCRON_CONSUL_BIN=$CONSUL_BIN is not executable"
        fetch_consul
    fi
    need redis-server redis-cli etcd etcdctl java protoc curl "$CONSUL_BIN"
    [[ -r /usr/share/java/zookeeper.jar && -r /usr/share/java/slf4j-simple.jar ]] \
        || die "ZooKeeper jars missing under /usr/share/java"
    log "install: done in $(elapsed "$t0") ($("$CONSUL_BIN" version | sed -n 1p), redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p'), etcd $(etcd --version | awk '/etcd Version/ {print $3}'), $(protoc --version))"
}

# ---------------------------------------------------------------- main

cmd=${1:-help}
(($#)) && shift
case $cmd in
    install) cmd_install "$@" ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    redis) cmd_redis "$@" ;;
    etcd) cmd_etcd "$@" ;;
    etcd-cluster) cmd_etcd_cluster "$@" ;;
    etcd-wait) cmd_etcd_wait "$@" ;;
    zk) cmd_zk "$@" ;;
    zk-ensemble) cmd_zk_ensemble "$@" ;;
    zk-wait) cmd_zk_wait "$@" ;;
    consul) cmd_consul "$@" ;;
    leader-etcd) cmd_leader_etcd "$@" ;;
    leader-zk) cmd_leader_zk "$@" ;;
    kill) cmd_kill "$@" ;;
    help | -h | --help) usage ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
esac
