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

  --max-workers N   most workers at once, across both endpoints' scalers (default 2)
  --idle-timeout S  a worker exits after S seconds without work (default 30)
  --scale-after S   add workers once the oldest pending item has waited S seconds (default 2;
                    with no worker running, work launches one at once)
  --port-a P        endpoint A's port on 127.0.0.1 (default 5000)
  --port-b P        endpoint B's port on 127.0.0.1 (default 5001)
  --every S         seconds between scaling decisions (default 2; cron uses 60 on EC2)

Data, logs and the cluster secret go to $DW_STATE_DIR (default var/).
EOF
}

deploy_local() {
    local max_workers=2 idle_timeout=30 scale_after=2 port_a=5000 port_b=5001 every=2
    while [ $# -gt 0 ]; do
        case "$1" in
            --max-workers) max_workers=$2; shift 2 ;;
            --idle-timeout) idle_timeout=$2; shift 2 ;;
            --scale-after) scale_after=$2; shift 2 ;;
            --port-a) port_a=$2; shift 2 ;;
            --port-b) port_b=$2; shift 2 ;;
            --every) every=$2; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) echo "deploy.sh local: unknown option $1" >&2; usage >&2; exit 2 ;;
        esac
    done

    ./setup.sh local
    local state=${DW_STATE_DIR:-var}
    mkdir -p "$state/log"
    if [ ! -s "$state/secret" ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state/secret")
    fi

    local url_a="http://127.0.0.1:$port_a" url_b="http://127.0.0.1:$port_b"
    # Each service runs in a process group of its own (setsid), so that it is stopped as a
    # whole (a server and its worker processes) and only by us, not also by the terminal's Ctrl-C.
    local groups=()
    start() {
        setsid "$@" &
        groups+=($!)
    }
    alive() {
        local group
        for group in "${groups[@]}"; do kill -0 -- "-$group" 2> /dev/null && return 0; done
        return 1
    }
    cleanup() {
        trap - INT TERM EXIT
        echo
        echo "stopping..."
        local group
        for group in "${groups[@]}"; do kill -TERM -- "-$group" 2> /dev/null || true; done
        for _ in $(seq 100); do alive || break; sleep 0.1; done
        for group in "${groups[@]}"; do kill -KILL -- "-$group" 2> /dev/null || true; done
        # Workers run in sessions of their own (they outlive one-shot scaler runs): stop them through the provider.
        .venv/bin/python -m cron.scale --state-dir "$state" --terminate-all --log-level WARNING || true
        echo "stopped."
    }
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    export DW_SECRET_FILE=$state/secret
    for node in a b; do
        local port=$port_a peer=$url_b
        [ $node = b ] && port=$port_b peer=$url_a
        start .venv/bin/python -m endpoint --node-id $node --port "$port" --peer "$peer" --db "$state/$node.sqlite3" \
            >> "$state/log/endpoint-$node.log" 2>&1
    done
    for url in "$url_a" "$url_b"; do
        for _ in $(seq 100); do
            curl -fs "$url/stats" > /dev/null 2>&1 && break
            kill -0 "${groups[0]}" 2> /dev/null && kill -0 "${groups[1]}" 2> /dev/null || {
                echo "an endpoint failed to start; see $state/log/endpoint-*.log" >&2; exit 1; }
            sleep 0.1
        done
    done
    # One scaler per endpoint, as on EC2 (there: a cron entry on each endpoint host).
    local index=0
    for node in a b; do
        local own=$url_a peer=$url_b
        [ $node = b ] && own=$url_b peer=$url_a
        start .venv/bin/python -m cron.scale --every "$every" --node-id $node --endpoint-index $index \
            --url "$own" --peer "$peer" --endpoint "$url_a" --endpoint "$url_b" --provider local --state-dir "$state" \
            --max-workers "$max_workers" --idle-timeout "$idle_timeout" --scale-after "$scale_after" \
            >> "$state/log/scaler-$node.log" 2>&1
        index=$((index + 1))
    done

    cat <<EOF
dynamic-workload is running locally:
  endpoint A  $url_a   (data: $state/a.sqlite3, log: $state/log/endpoint-a.log)
  endpoint B  $url_b   (data: $state/b.sqlite3, log: $state/log/endpoint-b.log)
  scalers     up to $max_workers worker(s), launched as work arrives (more once it waits ${scale_after}s),
              each exiting after ${idle_timeout}s idle (logs: $state/log/scaler-*.log, worker-*.log)

Try it:
  curl -X PUT "$url_a/enqueue?iterations=10" -d "data=Hello"
  curl -X PUT "$url_b/enqueue?iterations=3" -F "data=@README.md"
  sleep $((scale_after + 3))
  curl -X POST "$url_a/pullCompleted?top=5"
  curl "$url_b/stats"

Ctrl-C stops everything.
EOF
    wait
}

case "${1:-}" in
    local) shift; deploy_local "$@" ;;
    aws)
        shift
        ./setup.sh local
        exec .venv/bin/python -m cron.aws_deploy "$@"
        ;;
    -h|--help|"") usage; [ -n "${1:-}" ] || exit 2 ;;
    *) echo "deploy.sh: unknown target ${1}" >&2; usage >&2; exit 2 ;;
esac
