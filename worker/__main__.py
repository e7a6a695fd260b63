"""Run a worker: `python -m worker --endpoint http://A:5000 --endpoint http://B:5001`.

Standard library only: provisioning a host means copying this folder and starting it.
Every flag falls back to an environment variable (shown in --help); the worker key (which
the scaler derives from the cluster secret, see endpoint/secret.py) comes from --secret-file
or DW_SECRET, never from the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from worker.native import CHOICES, LIBRARY_ENV
from worker.runner import WorkerOptions, run_worker


def read_secret(secret_file: str) -> str:
    secret = Path(secret_file).read_text().strip() if secret_file else os.environ.get("DW_SECRET", "").strip()
    if not secret:
        raise SystemExit("no worker key: pass --secret-file (or DW_SECRET_FILE) or set DW_SECRET")
    return secret


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--endpoint", action="append", dest="endpoints",
        help="endpoint base URL; give it once per endpoint [DW_ENDPOINTS, comma-separated]")
    add("--secret-file", default=env("DW_SECRET_FILE", ""), help="file holding the worker key [DW_SECRET_FILE]")
    add("--worker-id", default=env("DW_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
        help="name reported to the endpoints [DW_WORKER_ID] (default host-pid)")
    add("--processes", type=int, default=env("DW_PROCESSES", str(os.cpu_count() or 1)),
        help="jobs run in parallel [DW_PROCESSES] (default: one per CPU core)")
    add("--idle-timeout", type=float, default=env("DW_IDLE_TIMEOUT", "60"),
        help="exit after this many seconds without work from any endpoint [DW_IDLE_TIMEOUT]")
    add("--poll-interval", type=float, default=env("DW_POLL_INTERVAL", "0.5"),
        help="pause between claims when an endpoint cannot let a claim wait for work [DW_POLL_INTERVAL]")
    add("--claim-wait", type=float, default=env("DW_CLAIM_WAIT", "20"),
        help="seconds a claim waits at the endpoint for work (0-30; 0: poll) [DW_CLAIM_WAIT]")
    add("--kernel", default=env("DW_KERNEL", "auto"), choices=CHOICES,
        help="hashing kernel: auto picks the fastest this CPU runs; python is the hashlib loop [DW_KERNEL]")
    add("--submit-patience", type=float, default=env("DW_SUBMIT_PATIENCE", "3600"),
        help="seconds a result is offered to a failing endpoint before it is given up [DW_SUBMIT_PATIENCE]")
    add("--exit-command", default=env("DW_EXIT_COMMAND", ""),
        help="command run after an idle exit, e.g. 'systemctl poweroff' on EC2 [DW_EXIT_COMMAND]")
    add("--log-level", default=env("DW_LOG_LEVEL", "INFO"), help="[DW_LOG_LEVEL]")
    args = parser.parse_args(argv)
    if not args.endpoints:
        args.endpoints = [url.strip() for url in env("DW_ENDPOINTS", "").split(",") if url.strip()]
    if not args.endpoints:
        parser.error("give at least one --endpoint (or DW_ENDPOINTS)")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if not 0 <= args.claim_wait <= 30:
        parser.error("--claim-wait must be from 0 to 30 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s worker: %(message)s")
    options = WorkerOptions(
        endpoints=tuple(args.endpoints),
        secret=read_secret(args.secret_file),
        worker_id=args.worker_id,
        processes=args.processes,
        idle_timeout=args.idle_timeout,
        poll_interval=args.poll_interval,
        exit_command=args.exit_command,
        submit_patience=args.submit_patience,
        kernel=args.kernel,
        kernel_library=os.environ.get(LIBRARY_ENV, ""),
        claim_wait=args.claim_wait,
    )
    return run_worker(options)


if __name__ == "__main__":
    sys.exit(main())
