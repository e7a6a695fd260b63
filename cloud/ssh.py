"""Reaching a host over SSH with paramiko: sessions, remote commands, uploads, pinned host keys.

What provisions a worker (cron/provision.py) and what installs an endpoint (deploy/install.py)
both go through here. Host keys are pinned per machine (instance id or host name), not per
address: EC2 reuses private addresses, and a new instance on an old address must not be
mistaken for -- or rejected as -- the old one. The first contact records the key; later
contacts must match.

Our files on a host live in one folder in the login's home (REMOTE_DIR_NAME, its SFTP start
folder).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko

REMOTE_DIR_NAME = "dynamic-workload"


class SshError(Exception):
    """A host could not be reached, logged into or worked on over SSH; the message says which."""


class HostKeyPins:
    """Host keys by machine id, in a JSON file: recorded on first contact, checked afterwards."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # A thread lock for this process's threads, a file lock for other scalers sharing the file.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_suffix(".lock"), "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def check(self, machine_id: str, address: str, key: paramiko.PKey) -> None:
        offered = f"{key.get_name()} {key.get_base64()}"
        with self._locked():
            pins = self._load()
            pinned = pins.get(machine_id)
            if pinned is None:
                pins[machine_id] = offered
                self._save(pins)
            elif pinned != offered:
                raise SshError(
                    f"host key of {machine_id} at {address} differs from the one recorded on first contact "
                    f"({self.path}): refusing to connect (a different machine, or a man in the middle)")

    def forget(self, machine_ids: list[str]) -> None:
        with self._locked():
            pins = self._load()
            if any(pins.pop(machine_id, None) for machine_id in machine_ids):
                self._save(pins)

    def _save(self, pins: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False) as file:
            json.dump(pins, file, indent=1, sort_keys=True)
        os.replace(file.name, self.path)


class _PinnedHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    # No host keys are loaded into the client, so paramiko asks this policy on every connect.
    def __init__(self, pins: HostKeyPins, machine_id: str) -> None:
        self._pins = pins
        self._machine_id = machine_id

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self._pins.check(self._machine_id, hostname, key)


@dataclass(frozen=True)
class SshTarget:
    machine_id: str  # what the host key is pinned to
    address: str
    user: str
    key_path: Path
    port: int = 22


def wait_for_ssh(address: str, port: int = 22, timeout: float = 300.0, what: str = "") -> float:
    """Seconds until the SSH port accepts connections; SshError once `timeout` is over (to
    the second: no attempt runs past it). `what` says what the timeout is ("within 5s of ...")."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(3.0, remaining))):
                return time.monotonic() - started
        except OSError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SshError(f"SSH on {address}:{port} did not answer {what or f'within {timeout:.0f}s'}: "
                                     f"{exc}") from exc
            time.sleep(min(1.0, remaining))


def load_key(path: Path) -> paramiko.PKey:
    """The private key in `path`, loaded once per version of the file: loading an RSA key checks it,
    about 0.2 s of CPU each time, which a scaler provisioning a hundred workers would spend per session."""
    try:
        stat = os.stat(path)
        return _load_key(str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError, TypeError, paramiko.SSHException, paramiko.UnknownKeyType) as exc:
        # Missing, not a private key, a passphrase wanted, or a type paramiko does not know.
        raise SshError(f"cannot load the SSH key {path}: {exc!r}") from exc


@functools.lru_cache(maxsize=8)
def _load_key(path: str, _inode: int, _mtime_ns: int, _size: int) -> paramiko.PKey:
    return paramiko.PKey.from_path(path)  # a failure is not cached: it is raised


@contextmanager
def ssh_session(target: SshTarget, pins: HostKeyPins, timeout: float = 15.0) -> Iterator[paramiko.SSHClient]:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_PinnedHostKeyPolicy(pins, target.machine_id))
    try:
        # The key loaded by its own type: given a file name, paramiko tries every key type on a refused key
        # and reports the last parse error ("encountered RSA key, expected OPENSSH key"), not the refusal.
        key = load_key(target.key_path)
        client.connect(target.address, target.port, username=target.user, pkey=key,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       look_for_keys=False, allow_agent=False)
    except SshError:
        client.close()
        raise
    except (OSError, paramiko.SSHException) as exc:
        client.close()
        raise SshError(f"SSH to {target.user}@{target.address} ({target.machine_id}) failed: {exc}") from exc
    try:
        yield client
    except (OSError, EOFError, paramiko.SSHException) as exc:  # SFTP and channel errors, mid-session
        raise SshError(f"SSH session with {target.address} ({target.machine_id}) failed: {exc}") from exc
    finally:
        client.close()


def run(client: paramiko.SSHClient, command: str, timeout: float = 120.0) -> str:
    """Run a shell command on the host; its stdout, or SshError with its stderr. A command
    still running after `timeout` seconds is abandoned: a hung host must not hold up the scaler."""
    try:
        _, stdout, stderr = client.exec_command(command, timeout=timeout)
        channel = stdout.channel
        if not channel.status_event.wait(timeout):
            channel.close()
            raise SshError(f"remote command still running after {timeout:.0f}s: abandoned")
        out, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
        status = channel.recv_exit_status()
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise SshError(f"remote command failed to run: {exc}") from exc
    if status != 0:
        raise SshError(f"remote command exited with {status}: {err.strip()[-2000:] or out.strip()[-2000:]}")
    return out


def upload_text(sftp: paramiko.SFTPClient, path: str, text: str, mode: int = 0o644) -> None:
    with sftp.open(path, "w") as file:
        file.chmod(mode)  # before any content: a secret is never readable by others, even briefly
        file.write(text)


def remote_base(sftp: paramiko.SFTPClient) -> str:
    """Where our files go on the host: a folder in the login's home (its SFTP start folder)."""
    return f"{sftp.normalize('.').rstrip('/')}/{REMOTE_DIR_NAME}"


def mkdirs(sftp: paramiko.SFTPClient, path: str, mode: int | None = None) -> None:
    """`path` and the folders above it that are missing. With `mode`, `path` itself gets it, also
    if it was there before: made with it (so never more open, whatever the server's umask), then set."""
    parts = path.strip("/").split("/")
    for index in range(len(parts)):
        partial = "/" + "/".join(parts[:index + 1])
        try:
            sftp.stat(partial)
        except FileNotFoundError:
            last = index == len(parts) - 1
            sftp.mkdir(partial, mode if last and mode is not None else 0o777)
    if mode is not None:
        sftp.chmod("/" + "/".join(parts), mode)


def base_of(client: paramiko.SSHClient) -> str:
    """remote_base, for a session that has no SFTP channel open."""
    sftp = client.open_sftp()
    try:
        return remote_base(sftp)
    finally:
        sftp.close()


def unit_file(description: str, service: str) -> str:
    """A systemd unit started at boot once the network is up, running `service` (its [Service] lines)."""
    return f"""[Unit]
Description={description}
After=network-online.target
Wants=network-online.target

[Service]
{service.strip()}

[Install]
WantedBy=multi-user.target
"""
