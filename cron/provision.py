"""Installing and starting a worker on a host over SSH (cloud/ssh.py: paramiko, pinned host keys).

The worker is standard-library Python, so provisioning is: copy its files (worker/ and the
settings code it reads, cli/) over SFTP, write its settings (named by the worker's table,
worker/config.py) and the worker key (mode 0600), start it as a service, and confirm that it
runs. Nothing is installed from the network, and the worker gets no AWS credentials. The ssh
and ec2 providers call this; a failure is a ProvisionError, which the scaler counts.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko

from cli.settings import environment
from cloud.ssh import (
    REMOTE_DIR_NAME,
    HostKeyPins,
    SshError,
    SshTarget,
    base_of,
    mkdirs,
    remote_base,
    run,
    ssh_session,
    unit_file,
    upload_text,
)
from cron.providers import ProviderError
from worker.config import SETTINGS as WORKER_SETTINGS

REPO_ROOT = Path(__file__).resolve().parents[1]
# What a worker host needs of this checkout: the worker and the settings code it reads its table with.
WORKER_CODE = ("worker", "cli")
SERVICE_NAME = "dw-worker"
CA_FILE = "ca.pem"  # the cluster CA's certificate, beside the worker's settings
KERNEL_LIBRARY = "sha512_lanes.so"  # worker/native.py's LIBRARY_PATH, built on the endpoint hosts at deploy
log = logging.getLogger(__name__)


class ProvisionError(ProviderError):
    """Provisioning a worker failed: its host could not be reached, set up, or its worker did not start."""


@dataclass(frozen=True)
class WorkerInstall:
    """What a provisioned worker runs with."""

    endpoints: tuple[str, ...]
    worker_key: str  # endpoint/secret.py: it opens the worker routes only; never the cluster secret
    worker_id: str
    idle_timeout: float
    processes: int = 0  # 0: one per core
    # "systemd": a hardened unit whose idle exit powers the machine off (EC2: terminates it).
    # "process": a detached process, for hosts without systemd; its idle exit runs exit_command.
    service: str = "systemd"
    exit_command: str = ""
    python: str = "python3"
    # Only for machines that are ours to end (EC2 workers): with systemd, an idle exit powers off.
    poweroff_on_idle: bool = False
    kernel: str = "auto"  # the worker's hashing kernel (worker/native.py)
    # The cluster CA's certificate (PEM), which the worker checks https endpoints against; public.
    ca_certificate: str = ""
    spot: bool = False  # an EC2 Spot instance: the worker watches for its interruption notice
    metadata_url: str = ""  # where that worker asks for it ("": the worker's default, EC2's own)


@contextmanager
def _session(target: SshTarget, pins: HostKeyPins, timeout: float = 15.0) -> Iterator[paramiko.SSHClient]:
    """An SSH session whose failures are provisioning failures (the providers' error)."""
    try:
        with ssh_session(target, pins, timeout) as client:
            yield client
    except SshError as exc:
        raise ProvisionError(str(exc)) from exc


def worker_settings(install: WorkerInstall, install_dir: str, secret_path: str = "") -> str:
    """The worker's environment file, named by the worker's own table (worker/config.py)."""
    values = {"endpoints": install.endpoints, "worker_id": install.worker_id,
              "idle_timeout": install.idle_timeout, "exit_command": install.exit_command}
    if install.ca_certificate:
        values["tls_ca"] = f"{install_dir}/{CA_FILE}"
    if secret_path:  # systemd hands the key over as a credential instead
        values["secret_file"] = secret_path
    if install.processes:
        values["processes"] = install.processes
    if install.kernel != "auto":
        values["kernel"] = install.kernel
    if install.spot:
        values["interruption_notices"] = "ec2-spot"
    if install.metadata_url:
        values["metadata_url"] = install.metadata_url
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in environment(WORKER_SETTINGS, values).items())


def systemd_unit(install_dir: str, python: str, poweroff_on_idle: bool) -> str:
    poweroff = """# Only an idle exit (status 0) powers the machine off; on EC2 that terminates the instance
# (it is launched with InstanceInitiatedShutdownBehavior=terminate).
ExecStopPost=+/bin/sh -c 'if [ "$EXIT_STATUS" = 0 ]; then /bin/systemctl poweroff; fi'
""" if poweroff_on_idle else ""
    return unit_file("dynamic-workload worker", f"""
WorkingDirectory={install_dir}
EnvironmentFile={install_dir}/worker.env
# The secret reaches the service through systemd's credentials, readable by it alone.
LoadCredential=secret:{install_dir}/secret
Environment={WORKER_SETTINGS["secret_file"].env}=%d/secret
ExecStart=/usr/bin/env {python} -m worker
DynamicUser=yes
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
Restart=on-failure
RestartSec=2
# 143 is a stop by SIGTERM: a clean stop, not a failure to restart from.
SuccessExitStatus=143
{poweroff}""")


def provision_worker(target: SshTarget, pins: HostKeyPins, install: WorkerInstall) -> float:
    """Install and start the worker; returns the seconds it took once SSH answered."""
    started = time.monotonic()
    with _session(target, pins) as client:
        sftp = client.open_sftp()
        base = remote_base(sftp)
        for folder in WORKER_CODE:
            mkdirs(sftp, f"{base}/{folder}")
            for source in sorted((REPO_ROOT / folder).glob("*.py")):
                sftp.put(str(source), f"{base}/{folder}/{source.name}")
        upload_kernel(sftp, f"{base}/worker")
        upload_text(sftp, f"{base}/secret", install.worker_key + "\n", mode=0o600)
        if install.ca_certificate:
            upload_text(sftp, f"{base}/{CA_FILE}", install.ca_certificate, mode=0o644)
        if install.service == "systemd":
            install_dir = f"/opt/{REMOTE_DIR_NAME}"
            upload_text(sftp, f"{base}/worker.env", worker_settings(install, install_dir))
            upload_text(sftp, f"{base}/{SERVICE_NAME}.service",
                        systemd_unit(install_dir, install.python, install.poweroff_on_idle))
            sftp.close()
            run(client, _systemd_start_script(base, install_dir))
        elif install.service == "process":
            upload_text(sftp, f"{base}/worker.env", worker_settings(install, base, f"{base}/secret"))
            sftp.close()
            run(client, _process_start_script(base, install.python))
        else:
            raise ProvisionError(f"unknown service manager {install.service!r}")
    return time.monotonic() - started


def upload_kernel(sftp: paramiko.SFTPClient, folder: str) -> None:
    """The worker's native hashing kernel as built here (on an endpoint host: at deploy), if it was:
    workers have no compiler. Put beside its place and renamed over it, so that a worker running
    on the old copy is not changed under it. A worker whose CPU cannot run it falls back (logged)."""
    library = REPO_ROOT / "worker" / KERNEL_LIBRARY
    if not library.is_file():
        log.warning("%s is not built: workers will hash with their Python loop", library)
        return
    sftp.put(str(library), f"{folder}/.{KERNEL_LIBRARY}.new")
    sftp.posix_rename(f"{folder}/.{KERNEL_LIBRARY}.new", f"{folder}/{KERNEL_LIBRARY}")


def _systemd_start_script(base: str, install_dir: str) -> str:
    return f"""set -e
sudo rm -rf {install_dir}.new
sudo cp -r {shlex.quote(base)} {install_dir}.new
sudo chown -R root:root {install_dir}.new
sudo rm -rf {install_dir} && sudo mv {install_dir}.new {install_dir}
sudo install -m 0644 {install_dir}/{SERVICE_NAME}.service /etc/systemd/system/{SERVICE_NAME}.service
sudo systemctl daemon-reload
sudo systemctl enable --now {SERVICE_NAME}.service
sudo systemctl restart {SERVICE_NAME}.service
sleep 0.5
systemctl is-active {SERVICE_NAME}.service
"""


# Process mode keeps the worker's pid in worker.pid; before trusting it, check that the pid
# still is that worker and not a process that got the number after the worker exited.
_IS_WORKER = """is_worker() {
    [ -f worker.pid ] && tr '\\0' ' ' < "/proc/$(cat worker.pid)/cmdline" 2>/dev/null | grep -q -- "-m worker"
}"""


def _process_start_script(base: str, python: str) -> str:
    quoted = shlex.quote(base)
    # umask: the log and the pid file are made by the shell, before the worker runs: owner-only.
    return f"""set -e
umask 077
cd {quoted}
{_IS_WORKER}
if is_worker; then kill "$(cat worker.pid)"; sleep 1; fi
if [ -f worker.log ]; then mv -f worker.log worker.log.1; fi
set -a; . ./worker.env; set +a
setsid nohup {shlex.quote(python)} -m worker >> worker.log 2>&1 < /dev/null &
echo $! > worker.pid
for _ in 1 2 3 4 5 6 7 8 9 10; do
    grep -q "slots on" worker.log 2>/dev/null && break
    sleep 0.1
done
kill -0 "$(cat worker.pid)"
grep -q "slots on" worker.log
"""


def worker_running(target: SshTarget, pins: HostKeyPins, service: str) -> bool:
    """Whether the host's worker service runs now (for hosts the scaler does not launch itself)."""
    with _session(target, pins, timeout=5) as client:
        if service == "systemd":
            command = f"systemctl is-active --quiet {SERVICE_NAME}.service"
        else:
            command = f"cd {shlex.quote(base_of(client))} 2>/dev/null || exit 1\n{_IS_WORKER}\nis_worker"
        _, stdout, _ = client.exec_command(command, timeout=10)
        return stdout.channel.recv_exit_status() == 0


def stop_worker(target: SshTarget, pins: HostKeyPins, service: str) -> None:
    with _session(target, pins, timeout=5) as client:
        if service == "systemd":
            run(client, f"sudo systemctl disable --now {SERVICE_NAME}.service")
        else:
            run(client, f"cd {shlex.quote(base_of(client))} 2>/dev/null || exit 0\n{_IS_WORKER}\n"
                        'if is_worker; then kill "$(cat worker.pid)"; fi; rm -f worker.pid')
