#!/usr/bin/env bash
# The test command. On a fresh machine it first installs what the tests need:
# system packages with apt-get (curl, OpenSSH server, iproute2, gcc, Prometheus and Chromium
# for the dashboard's tests) and the pinned
# Python dependencies into .venv. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v curl > /dev/null || missing+=(curl)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/lib/openssh/sftp-server ] || missing+=(openssh-sftp-server)
command -v ip > /dev/null || missing+=(iproute2)
command -v cc > /dev/null || missing+=(gcc libc6-dev)  # the native kernel (worker/build_kernel.sh)
command -v prometheus > /dev/null || missing+=(prometheus)  # scrapes the endpoints (tests/test_observability.py)
command -v chromium > /dev/null || missing+=(chromium)  # loads the dashboard, headless
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "tests/run.sh: these system packages are missing: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "tests/run.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

./setup.sh dev
.venv/bin/ruff check .

status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" = 5 ]; then
    echo "tests/run.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
