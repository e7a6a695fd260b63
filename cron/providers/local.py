"""Workers as processes on this machine: what `./deploy.sh local` uses."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from cli.settings import environment
from cron.providers import Machine, ProviderError
from worker.config import SECRET_ENV
from worker.config import SETTINGS as WORKER_SETTINGS

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if it is gone or a zombie.

    Recorded at launch and compared later, so that a recycled PID is never taken for
    (or killed as) one of our workers.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _private(path: Path, mode: int) -> BinaryIO:
    """A file for writing, created owner-only whatever the umask: a worker's log holds its jobs' ids and
    errors, a record its process id."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600), "wb")


class LocalProvider:
    def __init__(self, state_dir: Path, endpoints: Sequence[str], worker_key: Callable[[], str], *,
                 processes_per_worker: int = 1, idle_timeout: float = 60.0, log_dir: Path | None = None,
                 kernel: str = "auto", tls_ca: str = "") -> None:
        """`worker_key` is asked for at the first launch only: listing and terminating need no secret."""
        self.state_dir = state_dir
        self.endpoints = list(endpoints)
        self.processes_per_worker = processes_per_worker
        self.idle_timeout = idle_timeout
        self.kernel = kernel
        self.tls_ca = tls_ca  # the CA https endpoints are checked against
        self.log_dir = log_dir or state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.key_file = state_dir / "worker-key"
        self._worker_key = worker_key
        self._key_written = False

    def _write_key(self) -> None:
        """The worker key, in a file of its own: workers get neither the cluster secret nor the key on a
        command line or in their environment. (Local workers run as the same user as the endpoints, so
        this keeps the roles apart, not the user: that takes the ssh or ec2 provider.)"""
        if self._key_written:
            return
        descriptor, temporary = tempfile.mkstemp(dir=self.state_dir, prefix=".worker-key.")  # 0600, a new file
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(self._worker_key() + "\n")
            os.replace(temporary, self.key_file)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)  # only left if writing or renaming failed
        self._key_written = True

    def list(self) -> list[Machine]:
        machines = []
        for record_path in sorted(self.state_dir.glob("*.json")):
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to judge
            if self._alive(record):
                machines.append(Machine(record["id"], record["owner"], record["launched_at"], ready=True))
            else:
                record_path.unlink(missing_ok=True)  # it exited (idle) or was killed
        return machines

    def launch(self, count: int, owner: str, intent: str) -> list[Machine]:
        self._write_key()
        machines = []
        for _ in range(count):
            worker_id = f"local-{owner}-{secrets.token_hex(4)}"
            command = [sys.executable, "-m", "worker", "--worker-id", worker_id,
                       "--processes", str(self.processes_per_worker), "--idle-timeout", str(self.idle_timeout),
                       "--kernel", self.kernel]
            for endpoint in self.endpoints:
                command += ["--endpoint", endpoint]
            env = {**os.environ, **environment(WORKER_SETTINGS, {"secret_file": self.key_file,
                                                                  "tls_ca": os.path.abspath(self.tls_ca)
                                                                  if self.tls_ca else ""})}
            env.pop(SECRET_ENV, None)
            self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with _private(self.log_dir / f"worker-{worker_id}.log", os.O_APPEND) as log_file:
                try:
                    # Its own session: a worker outlives a one-shot scaler run, and is
                    # stopped as a whole process group.
                    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                               stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
                except OSError as exc:
                    raise ProviderError(f"could not start a local worker: {exc}") from exc
            record = {"id": worker_id, "owner": owner, "pid": process.pid,
                      "start_ticks": _start_ticks(process.pid), "launched_at": time.time(), "intent": intent}
            # Written aside and renamed into place: the other scaler may list this folder meanwhile.
            temporary = self.state_dir / f".{worker_id}.tmp"
            with _private(temporary, os.O_TRUNC) as record_file:
                record_file.write(json.dumps(record).encode())
            os.replace(temporary, self.state_dir / f"{worker_id}.json")
            log.info("started local worker %s (pid %d)", worker_id, process.pid)
            machines.append(Machine(worker_id, owner, record["launched_at"], ready=True))
        return machines

    def provision(self, machine: Machine) -> Machine:
        return machine  # a local worker starts fully configured

    def terminate(self, machines: Sequence[Machine], reason: str) -> None:
        records = []
        for machine in machines:
            record_path = self.state_dir / f"{machine.machine_id}.json"
            if record_path.exists():
                records.append((record_path, json.loads(record_path.read_text())))
        for _, record in records:
            if self._alive(record):
                log.info("stopping local worker %s (%s)", record["id"], reason)
                os.killpg(record["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 15
        for record_path, record in records:
            while self._alive(record) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive(record):
                os.killpg(record["pid"], signal.SIGKILL)
            record_path.unlink(missing_ok=True)

    @staticmethod
    def _alive(record: dict) -> bool:
        pid = record["pid"]
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited
        return _start_ticks(pid) is not None and _start_ticks(pid) == record["start_ticks"]
