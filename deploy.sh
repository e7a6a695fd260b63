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
                         [--port-a P] [--port-b P] [--every S]
       ./deploy.sh aws [--destroy] [options: ./deploy.sh aws --help]

  --max-workers N   most workers at once, across both endpoints' scalers (default 2; at least 1)
  --idle-timeout S  a worker exits after S seconds without work (default 30; more than 0)
  --scale-after S   add workers once the oldest pending item has waited S seconds (default 2;
                    with no worker running, work launches one at once)
  --port-a P        endpoint A's port on 127.0.0.1 (default 5000)
  --port-b P        endpoint B's port on 127.0.0.1 (default 5001)
  --every S         seconds between scaling decisions (default 2; more than 0; cron uses 60 on EC2)

Data, logs and the cluster secret go to $DW_STATE_DIR (default var/).
That folder is made owner-only (0700), and so is all that the deployment writes. One
./deploy.sh local at a time per state directory: a second one on the same state refuses
to start. If a service exits, the deployment says so, stops all of it and exits with 1.
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
    local max_workers=2 idle_timeout=30 scale_after=2 port_a=5000 port_b=5001 every=2
    while [ $# -gt 0 ]; do
        case "$1" in
            --max-workers|--idle-timeout|--scale-after|--port-a|--port-b|--every)
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
    max_workers=$((10#$max_workers)) port_a=$((10#$port_a)) port_b=$((10#$port_b))
    [ "$port_a" != "$port_b" ] || bad_option "--port-a and --port-b must differ (both are $port_a)"

    # Payloads, results, logs and keys: nobody but this user reads what the deployment writes.
    umask 077
    # Globals, not locals: when `set -e` ends the script in here, the EXIT trap runs without our locals.
    state=${DW_STATE_DIR:-var}
    local url_a="http://127.0.0.1:$port_a" url_b="http://127.0.0.1:$port_b"
    mkdir -p "$state/log"
    chmod 700 "$state"
    # One deployment per state directory: its files have one writer each. The lock (fd 9, which
    # the services do not inherit) lasts as long as this script, its clean-up included.
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
    # A fresh id for this run's endpoints, which they report in /stats: whatever answers on
    # our ports with another id (or none) is not ours.
    local instance_id
    instance_id=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')

    # Each service runs in a process group of its own (setsid), so that it is stopped as a
    # whole (a server and its worker processes) and only by us, not also by the terminal's Ctrl-C.
    names=() groups=() pause=""
    start() {  # name, command...
        local name=$1
        shift
        setsid "$@" >> "$state/log/$name.log" 2>&1 9>&- &
        names+=("$name")
        groups+=($!)
    }
    alive() {  # true while a service whose name matches the pattern $1 has a process left
        local i
        for i in "${!groups[@]}"; do
            if [[ ${names[i]} == $1 ]] && kill -0 -- "-${groups[i]}" 2> /dev/null; then return 0; fi
        done
        return 1
    }
    stop() {  # stop the services whose names match the pattern $1: TERM, up to 10 s, then KILL
        local i signal
        for signal in TERM KILL; do
            for i in "${!groups[@]}"; do
                if [[ ${names[i]} == $1 ]]; then kill "-$signal" -- "-${groups[i]}" 2> /dev/null; fi
            done
            for _ in $(seq 100); do alive "$1" || return 0; sleep 0.1; done
        done
    }
    cleanup() {
        local status=$?
        set +e
        trap - INT TERM HUP EXIT
        trap '' PIPE  # output gone (a closed terminal or pipe): the clean-up still runs to its end
        [ -z "${pause:-}" ] || kill "$pause" 2> /dev/null
        echo
        echo "stopping..."
        # Scalers first (no more launches), then the workers while the endpoints still answer,
        # so that they give their jobs back; the endpoints last. Workers run in sessions of
        # their own (they outlive one-shot scaler runs): they are stopped through the provider,
        # with none of the caller's DW_* settings, which are the services' business.
        stop "scaler-*"
        env -i PATH="$PATH" .venv/bin/python -m cron.scale --provider local --state-dir "$state" \
            --terminate-all --log-level WARNING
        stop "*"
        echo "stopped."
        exit "$status"
    }
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    trap 'exit 141' PIPE

    # A service gone: say which, with the end of its log; the clean-up stops the rest.
    exited() {
        local i code
        for i in "${!groups[@]}"; do
            kill -0 "${groups[i]}" 2> /dev/null && continue
            code=0
            wait "${groups[i]}" 2> /dev/null || code=$?
            echo "deploy.sh local: ${names[i]} exited ($1, status $code); the end of $state/log/${names[i]}.log:" >&2
            tail -n 15 "$state/log/${names[i]}.log" | sed 's/^/    /' >&2
            return 0
        done
        return 1
    }
    # What endpoint $1's /stats says: "ours" (this run's instance id; "ours ran" once its
    # scaler has recorded a run since $2, seconds since the epoch), "foreign", or nothing.
    probe() {
        { curl -fs -m 2 "$1/stats" 2> /dev/null || true; } | .venv/bin/python -c '
import json, sys, time
try:
    stats = json.load(sys.stdin)
except ValueError:
    sys.exit()  # no answer yet
if not isinstance(stats, dict) or stats.get("instance_id") != sys.argv[1]:
    print("foreign")
    sys.exit()
ran = (stats.get("scaler") or {}).get("last_run_s_ago")
print("ours ran" if ran is not None and time.time() - ran >= float(sys.argv[2]) - 0.2 else "ours")
' "$instance_id" "$2"
    }
    # await_all WHAT SINCE: until both endpoints answer "ours" (WHAT=endpoints) or "ours ran"
    # (WHAT=scalers); stop at once if a service exits or someone else answers, after 60 s anyway.
    await_all() {
        local url answer deadline=$((SECONDS + 60))
        for url in "$url_a" "$url_b"; do
            while true; do
                exited "during start-up" && exit 1
                answer=$(probe "$url" "$2")
                case "$answer" in
                    "ours ran") break ;;
                    ours) [ "$1" = endpoints ] && break ;;
                    foreign) echo "deploy.sh local: something else answers on $url, not the endpoint" \
                                  "this run started" >&2; exit 1 ;;
                esac
                if [ $SECONDS -ge $deadline ]; then
                    echo "deploy.sh local: the $1 did not come up within 60 s at $url; see $state/log/" >&2
                    exit 1
                fi
                sleep 0.1
            done
        done
    }

    export DW_SECRET_FILE=$state/secret
    for node in a b; do
        local port=$port_a peer=$url_b
        [ $node = b ] && port=$port_b peer=$url_a
        start endpoint-$node .venv/bin/python -m endpoint --node-id $node --port "$port" --peer "$peer" \
            --db "$state/$node.sqlite3" --instance-id "$instance_id"
    done
    await_all endpoints 0
    # One scaler per endpoint, as on EC2 (there: a cron entry on each endpoint host). Ready once
    # each has recorded a decision in its endpoint's file (which /stats shows).
    local index=0 scalers_started
    scalers_started=$(date +%s.%N)
    for node in a b; do
        local own=$url_a peer=$url_b
        [ $node = b ] && own=$url_b peer=$url_a
        start scaler-$node .venv/bin/python -m cron.scale --every "$every" --node-id $node --endpoint-index $index \
            --url "$own" --peer "$peer" --endpoint "$url_a" --endpoint "$url_b" --provider local --state-dir "$state" \
            --max-workers "$max_workers" --idle-timeout "$idle_timeout" --scale-after "$scale_after"
        index=$((index + 1))
    done
    await_all scalers "$scalers_started"

    cat <<EOF
dynamic-workload is running locally:
  endpoint A  $url_a   (data: $state/a.sqlite3, log: $state/log/endpoint-a.log)
  endpoint B  $url_b   (data: $state/b.sqlite3, log: $state/log/endpoint-b.log)
  scalers     up to $max_workers worker(s), launched as work arrives (more once it waits ${scale_after}s),
              each exiting after ${idle_timeout}s idle (logs: $state/log/scaler-*.log, worker-*.log)

Try it:
  curl -X PUT "$url_a/enqueue?iterations=10" -d "data=Hello"
  curl -X PUT "$url_b/enqueue?iterations=3" -F "data=@README.md"
  sleep $(awk -v s="$scale_after" 'BEGIN { printf "%d", s + 3.999 }')
  curl -X POST "$url_a/pullCompleted?top=5"
  curl "$url_b/stats"

Ctrl-C stops everything.
EOF
    # Watch: a service that exits from now on is reported, and the deployment stops (exit 1).
    # (A sleep in the background: `wait` returns at once when a signal comes, and it does not
    # collect the services' exit statuses the way `wait -n` would.)
    while true; do
        exited "while running" && exit 1
        sleep 1 &
        pause=$!
        wait $pause || true
    done
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
