#!/usr/bin/env bash
# Enqueue throughput: 16 concurrent clients PUT 16 KiB payloads at one endpoint for
# DURATION seconds (default 15), with every acknowledged enqueue on disk (synchronous=FULL).
# Load comes from wrk (C, from Debian's packages), so the client costs little CPU next to
# the endpoint on this 2-core machine. Also prints the NORMAL setting for comparison.
#   usage: bench/enqueue.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-15}
command -v wrk > /dev/null || { echo "needs wrk: apt-get install wrk" >&2; exit 1; }
./setup.sh local > /dev/null

work=$(mktemp -d)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2> /dev/null; wait 2> /dev/null; rm -rf "$work"' EXIT
head -c 16384 /dev/urandom > "$work/payload"
cat > "$work/put.lua" <<LUA
wrk.method = "PUT"
local file = io.open("$work/payload", "rb"); wrk.body = file:read("*a"); file:close()
wrk.headers["Content-Type"] = "application/octet-stream"
LUA

port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
for sync in FULL NORMAL; do
    rm -f "$work"/db*
    DW_SECRET=bench-secret-0123456789 .venv/bin/python -m endpoint --port "$port" --db "$work/db.sqlite3" \
        --synchronous "$sync" --log-level WARNING &
    pid=$!
    until curl -fs "http://127.0.0.1:$port/stats" > /dev/null; do sleep 0.1; done
    echo "== synchronous=$sync: 16 clients, 16 KiB payloads, ${duration}s"
    wrk -t2 -c16 -d"${duration}s" --latency -s "$work/put.lua" "http://127.0.0.1:$port/enqueue?iterations=1000" \
        | grep -E "Requests/sec|Latency|50%|99%|Non-2xx|Socket errors"
    stored=$(curl -fs "http://127.0.0.1:$port/stats" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["pending"])')
    echo "   items stored: $stored"
    kill "$pid"; wait "$pid" 2> /dev/null || true; pid=""
done
