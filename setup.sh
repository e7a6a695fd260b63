#!/usr/bin/env bash
# One-time preparation, safe to re-run.
#   ./setup.sh          local: .venv with the pinned dependencies (what ./deploy.sh local needs)
#   ./setup.sh dev      the same plus the test tools (what ./tests/run.sh needs)
#   ./setup.sh aws      the local venv, then the one-time AWS preparation: key pair, security
#                       group, IAM role and instance profile for the endpoints (see
#                       `./setup.sh aws --help`); re-running it changes only what is missing
#   ./setup.sh aws --destroy   remove what it created; refused while the cluster has instances
#                       (`./deploy.sh aws --destroy` terminates them first)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}

ensure_venv() {
    local requirements=$1
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "setup: $PYTHON is older than Python 3.10" >&2
        exit 1
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "setup: creating .venv"
        "$PYTHON" -m venv .venv
    fi
    # Reinstall only when the requirements changed since the last successful install.
    local stamp=.venv/.installed-$(basename "$requirements")
    local digest
    digest=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
        echo "setup: installing $requirements into .venv"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
        echo "$digest" > "$stamp"
    fi
}

# The worker's native hashing kernel; without it (no compiler, a failed build) workers hash
# with their Python loop, so neither stops the setup.
build_kernel() {
    worker/build_kernel.sh || echo "setup: no native kernel built (see above); workers will hash with Python" >&2
}

case "${1:-local}" in
    local) ensure_venv requirements.txt; build_kernel ;;
    dev) ensure_venv requirements-dev.txt; build_kernel ;;
    aws)
        shift
        ensure_venv requirements.txt
        exec .venv/bin/python -m deploy.aws_setup "$@"
        ;;
    *)
        echo "usage: ./setup.sh [local|dev|aws [options]]" >&2
        exit 2
        ;;
esac
