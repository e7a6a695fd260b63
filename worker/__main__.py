"""Run a worker: `python -m worker --endpoint http://A:5000 --endpoint http://B:5001`.

Standard library only: provisioning a host means copying this folder (and cli/, whose
settings table it reads; see worker/config.py) and starting it. The worker key (which the
scaler derives from the cluster secret, see endpoint/secret.py) comes from --secret-file or
DW_SECRET, never from the command line.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from worker.config import SECRET_ENV, parse_args
from worker.native import LIBRARY_ENV
from worker.runner import WorkerOptions, run_worker


def read_worker_key(secret_file: str) -> str:
    key = Path(secret_file).read_text().strip() if secret_file else os.environ.get(SECRET_ENV, "").strip()
    if not key:
        raise SystemExit("no worker key: pass --secret-file (or DW_SECRET_FILE) or set DW_SECRET")
    return key


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s worker: %(message)s")
    same = ("worker_id", "processes", "idle_timeout", "poll_interval", "exit_command", "submit_patience", "kernel",
            "claim_wait", "tls_ca", "interruption_notices", "metadata_url", "notice_interval")
    options = WorkerOptions(endpoints=tuple(args.endpoints), worker_key=read_worker_key(args.secret_file),
                            kernel_library=os.environ.get(LIBRARY_ENV, ""),
                            **{name: getattr(args, name) for name in same})
    return run_worker(options)


if __name__ == "__main__":
    sys.exit(main())
