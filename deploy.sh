#!/usr/bin/env bash
# Run dynamic-workload.
#   ./deploy.sh local [options]   both endpoints, the scalers and their workers on this machine,
#                                 in the foreground; Ctrl-C or SIGTERM stops all of it.
#   ./deploy.sh aws [options]     two endpoint instances on EC2, provisioned over SSH from this
#                                 checkout, each with its scaler's crontab entry (after ./setup.sh aws).
#   ./deploy.sh aws --destroy     terminate every instance of the cluster, remove what setup created.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<'EOF'
usage: ./deploy.sh local [--max-workers N] [--idle-timeout S] [--scale-after S]
                         [--port-a P] [--port-b P] [--every S] [--max-restarts N] [--tls]
       ./deploy.sh aws [--destroy] [options: ./deploy.sh aws --help]

  --max-workers N   most workers at once, across both endpoints' scalers (default 2; at least 1)
  --idle-timeout S  a worker exits after S seconds without work (default 30; more than 0)
  --scale-after S   add workers once the oldest pending item has waited S seconds (default 2;
                    with no worker running, work launches one at once)
  --port-a P        endpoint A's port on 127.0.0.1 (default 5000)
  --port-b P        endpoint B's port on 127.0.0.1 (default 5001)
  --every S         seconds between scaling decisions (default 2; more than 0; cron uses 60 on EC2)
  --max-restarts N  restarts in a row of an endpoint or scaler that keeps exiting before the
                    deployment gives up (default 5; 0: no restarts)
  --tls             HTTPS on every hop: a private CA (made once, var/tls/ca.pem) signs the
                    endpoints' certificates; clients use curl --cacert var/tls/ca.pem

Data, logs and the cluster secret go to $DW_STATE_DIR (default var/).
That folder is made owner-only (0700), and so is all that the deployment writes. One
./deploy.sh local at a time per state directory: a second one on the same state refuses
to start. A service that exits during start-up stops the deployment (exit status 1).
Later, an endpoint or scaler that exits is restarted after 1 s, then 2, 4, 8, ... at most
30 s; a run of 60 s resets the delay. After N restarts in a row none of which ran 60 s, its
next exit stops the deployment (exit status 1). Each exit and restart is told on stderr
and in log/deploy.log. Ctrl-C, SIGTERM or SIGHUP stop it all, also during a restart's wait.
EOF
}

# What is wrong with an option, then the usage: exit status 2, before anything started.
bad_option() {
    echo "deploy.sh local: $*" >&2
    usage >&2
    exit 2
}

# check_count NAME VALUE MIN MAX: a whole number within the bounds.
check_count() {
    [[ $2 =~ ^[0-9]{1,6}$ ]] && (( 10#$2 >= $3 && 10#$2 <= $4 )) \
        || bad_option "--$1 must be a whole number from $3 to $4, not '$2'"
}

# check_seconds NAME VALUE [positive]: a number of seconds, 0 or more (with "positive": more than 0).
check_seconds() {
    local bound="0 or more"
    [ "${3:-}" != positive ] || bound="more than 0"
    [[ $2 =~ ^([0-9]{1,9}(\.[0-9]{0,6})?|\.[0-9]{1,6})$ ]] && { [ "$bound" = "0 or more" ] || [[ $2 =~ [1-9] ]]; } \
        || bad_option "--$1 must be a number of seconds, $bound, not '$2'"
}

deploy_local() {
    local max_workers=2 idle_timeout=30 scale_after=2 port_a=5000 port_b=5001 every=2 max_restarts=5
    local tls=() scheme=http
    while [ $# -gt 0 ]; do
        case "$1" in
            --tls) tls=(--tls) scheme=https; shift ;;
            --max-workers|--idle-timeout|--scale-after|--port-a|--port-b|--every|--max-restarts)
                [ $# -ge 2 ] || bad_option "$1 needs a value"
                local name=${1#--}
                printf -v "${name//-/_}" '%s' "$2"
                shift 2 ;;
            --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
            -h|--help) usage; exit 0 ;;
            *) bad_option "unknown option $1" ;;
        esac
    done
    check_count max-workers "$max_workers" 1 999999
    check_seconds idle-timeout "$idle_timeout" positive
    check_seconds scale-after "$scale_after"
    check_seconds every "$every" positive
    check_count port-a "$port_a" 1 65535
    check_count port-b "$port_b" 1 65535
    check_count max-restarts "$max_restarts" 0 999999
    max_workers=$((10#$max_workers)) port_a=$((10#$port_a)) port_b=$((10#$port_b)) max_restarts=$((10#$max_restarts))
    [ "$port_a" != "$port_b" ] || bad_option "--port-a and --port-b must differ (both are $port_a)"

    # Payloads, results, logs and keys: nobody but this user reads what the deployment writes.
    umask 077
    local state=${DW_STATE_DIR:-var}
    local url_a="$scheme://127.0.0.1:$port_a" url_b="$scheme://127.0.0.1:$port_b"
    mkdir -p "$state/log"
    chmod 700 "$state"
    # One deployment per state directory: its files have one writer each. The lock (fd 9, which
    # the services do not inherit) lasts as long as this process, its clean-up included.
    exec 9>> "$state/deploy.lock"
    if ! flock -n 9; then
        local holder pid
        holder=$(cat "$state/deploy.lock" 2> /dev/null) || true
        pid=${holder#pid }
        pid=${pid%%,*}
        [[ $pid =~ ^[0-9]+$ ]] || pid="<its pid>"
        cat >&2 <<EOF
deploy.sh local: another ./deploy.sh local runs on $state (${holder:-details unknown}).
Stop it first (Ctrl-C in its terminal, or kill -TERM $pid), or run this one on another
state directory and other ports, e.g. DW_STATE_DIR=var2 ./deploy.sh local --port-a 5002 --port-b 5003
EOF
        exit 1
    fi
    echo "pid $$, endpoints $url_a and $url_b, since $(date '+%F %T')" > "$state/deploy.lock"
    local port
    for port in "$port_a" "$port_b"; do
        if timeout 3 bash -c "exec 3<> /dev/tcp/127.0.0.1/$port" 2> /dev/null; then
            echo "deploy.sh local: 127.0.0.1:$port is in use already; choose others with --port-a/--port-b" >&2
            exit 1
        fi
    done

    ./setup.sh local
    if [ ! -s "$state/secret" ]; then
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state/secret"
    fi
    # Starting, confirming, supervising and stopping the services: deploy/local.py, in this
    # process's place (exec), so it keeps the PID and the lock on fd 9, which it does not pass on.
    exec .venv/bin/python -m deploy.local --state-dir="$state" --port-a "$port_a" --port-b "$port_b" \
        --max-workers "$max_workers" --idle-timeout "$idle_timeout" --scale-after "$scale_after" \
        --every "$every" --max-restarts "$max_restarts" "${tls[@]}"
}

case "${1:-}" in
    local) shift; deploy_local "$@" ;;
    aws)
        shift
        ./setup.sh local
        exec .venv/bin/python -m deploy.aws "$@"
        ;;
    -h|--help|"") usage; [ -n "${1:-}" ] || exit 2 ;;
    *) echo "deploy.sh: unknown target ${1}" >&2; usage >&2; exit 2 ;;
esac
