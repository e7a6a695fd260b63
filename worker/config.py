"""The worker's settings: one table of flags with DW_* environment fallbacks (cli/settings.py).

`python -m worker --idle-timeout 30` and `DW_IDLE_TIMEOUT=30 python -m worker` are the same.
Provisioning (cron/provision.py) writes a worker's settings as these variables, named by this
table. The worker key comes from --secret-file or DW_SECRET, never from the command line.
"""

from __future__ import annotations

import argparse
import os
import socket

from cli.settings import Setting, choice, parse_settings, seconds, text, whole
from worker.native import CHOICES

SECRET_ENV = "DW_SECRET"  # the worker key itself, where no --secret-file names a file with it
SETTINGS = {
    "endpoints": Setting("DW_ENDPOINTS", "", text, "endpoint base URL; give it once per endpoint", many=True),
    "secret_file": Setting("DW_SECRET_FILE", "", text, "file holding the worker key (or put the key in DW_SECRET)"),
    "worker_id": Setting("DW_WORKER_ID", "", text, "name reported to the endpoints (default <host>-<pid>)"),
    "processes": Setting("DW_PROCESSES", str(os.cpu_count() or 1), whole(1),
                         "jobs run in parallel (default: one per CPU core)"),
    "idle_timeout": Setting("DW_IDLE_TIMEOUT", "60", seconds(0, inclusive=True),
                            "exit after this many seconds without work from any endpoint"),
    "poll_interval": Setting("DW_POLL_INTERVAL", "0.5", seconds(0, inclusive=True),
                             "pause between claims when an endpoint cannot let a claim wait for work"),
    "claim_wait": Setting("DW_CLAIM_WAIT", "30", seconds(0, inclusive=True, maximum=30),
                          "seconds a claim waits at the endpoint for work (0: poll)"),
    "kernel": Setting("DW_KERNEL", "auto", choice(*CHOICES),
                      "hashing kernel: auto picks the fastest this CPU runs; python is the hashlib loop"),
    "submit_patience": Setting("DW_SUBMIT_PATIENCE", "3600", seconds(0, inclusive=True),
                               "seconds a result is offered to a failing endpoint before it is given up"),
    "exit_command": Setting("DW_EXIT_COMMAND", "", text,
                            "command run after an idle exit (and after an interruption), e.g. 'systemctl poweroff'"),
    "interruption_notices": Setting("DW_INTERRUPTION_NOTICES", "off", choice("off", "ec2-spot"),
                                    "ec2-spot: watch the instance metadata for a Spot interruption notice and give "
                                    "back what cannot be finished before it (the ec2 provider sets it for Spot)"),
    "tls_ca": Setting("DW_TLS_CA", "", text,
                      "CA certificate that https endpoints are checked against (default: the system's CAs)"),
    "metadata_url": Setting("DW_METADATA_URL", "http://169.254.169.254", text,
                            "the instance metadata service (IMDSv2) that interruption notices come from"),
    "notice_interval": Setting("DW_NOTICE_INTERVAL", "5", seconds(0),
                               "seconds between two looks for an interruption notice"),
    "log_level": Setting("DW_LOG_LEVEL", "INFO", choice("DEBUG", "INFO", "WARNING", "ERROR", fold=str.upper),
                         "DEBUG, INFO, WARNING or ERROR"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run a worker: `python -m worker "
                                     "--endpoint http://A:5000 --endpoint http://B:5001`.")
    args = parse_settings(parser, SETTINGS, argv)
    if not args.endpoints:
        parser.error("give at least one --endpoint (or DW_ENDPOINTS)")
    args.worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    return args
