"""Installing and starting a worker on a host over SSH, with paramiko.

The worker is standard-library Python, so provisioning is: copy its files over SFTP, write
its settings and the worker key (mode 0600), start it as a service, and confirm that it
runs. Nothing is installed from the network, and the worker gets no AWS credentials.

Host keys are pinned per machine (instance id or host name), not per address: EC2 reuses
private addresses, and a new instance on an old address must not be mistaken for -- or
rejected as -- the old one. The first contact records the key; later contacts must match.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko

from cron.providers import ProviderError

REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_DIR_NAME = "dynamic-workload"
SERVICE_NAME = "dw-worker"


class ProvisionError(ProviderError):
    pass


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
                raise ProvisionError(
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


@dataclass(frozen=True)
class WorkerInstall:
    """What a provisioned worker runs with."""

    endpoints: tuple[str, ...]
    secret: str  # the worker key (endpoint/secret.py), never the cluster secret
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


def wait_for_ssh(address: str, port: int = 22, timeout: float = 300.0, what: str = "") -> float:
    """Seconds until the SSH port accepts connections; ProvisionError once `timeout` is over (to
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
                raise ProvisionError(f"SSH on {address}:{port} did not answer {what or f'within {timeout:.0f}s'}: "
                                     f"{exc}") from exc
            time.sleep(min(1.0, remaining))


@contextmanager
def ssh_session(target: SshTarget, pins: HostKeyPins, timeout: float = 15.0) -> Iterator[paramiko.SSHClient]:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_PinnedHostKeyPolicy(pins, target.machine_id))
    try:
        # The key loaded by its own type: given a file name, paramiko tries every key type on a refused key
        # and reports the last parse error ("encountered RSA key, expected OPENSSH key"), not the refusal.
        try:
            key = paramiko.PKey.from_path(target.key_path)
        except (OSError, ValueError, TypeError, paramiko.SSHException, paramiko.UnknownKeyType) as exc:
            # Missing, not a private key, a passphrase wanted, or a type paramiko does not know.
            raise ProvisionError(f"cannot load the SSH key {target.key_path}: {exc!r}") from exc
        client.connect(target.address, target.port, username=target.user, pkey=key,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       look_for_keys=False, allow_agent=False)
    except ProvisionError:
        client.close()
        raise
    except (OSError, paramiko.SSHException) as exc:
        client.close()
        raise ProvisionError(f"SSH to {target.user}@{target.address} ({target.machine_id}) failed: {exc}") from exc
    try:
        yield client
    except (OSError, EOFError, paramiko.SSHException) as exc:  # SFTP and channel errors, mid-session
        raise ProvisionError(f"SSH session with {target.address} ({target.machine_id}) failed: {exc}") from exc
    finally:
        client.close()


def run(client: paramiko.SSHClient, command: str, timeout: float = 120.0) -> str:
    """Run a shell command on the host; its stdout, or ProvisionError with its stderr. A command
    still running after `timeout` seconds is abandoned: a hung host must not hold up the scaler."""
    try:
        _, stdout, stderr = client.exec_command(command, timeout=timeout)
        channel = stdout.channel
        if not channel.status_event.wait(timeout):
            channel.close()
            raise ProvisionError(f"remote command still running after {timeout:.0f}s: abandoned")
        out, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
        status = channel.recv_exit_status()
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise ProvisionError(f"remote command failed to run: {exc}") from exc
    if status != 0:
        raise ProvisionError(f"remote command exited with {status}: {err.strip()[-2000:] or out.strip()[-2000:]}")
    return out


def upload_text(sftp: paramiko.SFTPClient, path: str, text: str, mode: int = 0o644) -> None:
    with sftp.open(path, "w") as file:
        file.chmod(mode)  # before any content: a secret is never readable by others, even briefly
        file.write(text)


def remote_base(sftp: paramiko.SFTPClient) -> str:
    """Where our files go on the host: a folder in the login's home (its SFTP start folder)."""
    return f"{sftp.normalize('.').rstrip('/')}/{REMOTE_DIR_NAME}"


def mkdirs(sftp: paramiko.SFTPClient, path: str) -> None:
    partial = ""
    for part in path.strip("/").split("/"):
        partial += "/" + part
        try:
            sftp.stat(partial)
        except FileNotFoundError:
            sftp.mkdir(partial)


def worker_settings(install: WorkerInstall, secret_path: str = "") -> str:
    settings = {
        "DW_ENDPOINTS": ",".join(install.endpoints),
        "DW_WORKER_ID": install.worker_id,
        "DW_IDLE_TIMEOUT": str(install.idle_timeout),
        "DW_EXIT_COMMAND": install.exit_command,
    }
    if secret_path:  # systemd hands the secret over as a credential instead
        settings["DW_SECRET_FILE"] = secret_path
    if install.processes:
        settings["DW_PROCESSES"] = str(install.processes)
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in settings.items())


def systemd_unit(install_dir: str, python: str, poweroff_on_idle: bool) -> str:
    poweroff = """# Only an idle exit (status 0) powers the machine off; on EC2 that terminates the instance
# (it is launched with InstanceInitiatedShutdownBehavior=terminate).
ExecStopPost=+/bin/sh -c 'if [ "$EXIT_STATUS" = 0 ]; then /bin/systemctl poweroff; fi'
""" if poweroff_on_idle else ""
    return f"""[Unit]
Description=dynamic-workload worker
After=network-online.target
Wants=network-online.target

[Service]
WorkingDirectory={install_dir}
EnvironmentFile={install_dir}/worker.env
# The secret reaches the service through systemd's credentials, readable by it alone.
LoadCredential=secret:{install_dir}/secret
Environment=DW_SECRET_FILE=%d/secret
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
{poweroff}
[Install]
WantedBy=multi-user.target
"""


def provision_worker(target: SshTarget, pins: HostKeyPins, install: WorkerInstall) -> float:
    """Install and start the worker; returns the seconds it took once SSH answered."""
    started = time.monotonic()
    with ssh_session(target, pins) as client:
        sftp = client.open_sftp()
        base = remote_base(sftp)
        mkdirs(sftp, f"{base}/worker")
        for source in sorted((REPO_ROOT / "worker").glob("*.py")):
            sftp.put(str(source), f"{base}/worker/{source.name}")
        upload_text(sftp, f"{base}/secret", install.secret + "\n", mode=0o600)
        if install.service == "systemd":
            install_dir = f"/opt/{REMOTE_DIR_NAME}"
            upload_text(sftp, f"{base}/worker.env", worker_settings(install))
            upload_text(sftp, f"{base}/{SERVICE_NAME}.service",
                        systemd_unit(install_dir, install.python, install.poweroff_on_idle))
            sftp.close()
            run(client, _systemd_start_script(base, install_dir))
        elif install.service == "process":
            upload_text(sftp, f"{base}/worker.env", worker_settings(install, f"{base}/secret"))
            sftp.close()
            run(client, _process_start_script(base, install.python))
        else:
            raise ProvisionError(f"unknown service manager {install.service!r}")
    return time.monotonic() - started


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
    return f"""set -e
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
    with ssh_session(target, pins, timeout=5) as client:
        if service == "systemd":
            command = f"systemctl is-active --quiet {SERVICE_NAME}.service"
        else:
            command = f"cd {shlex.quote(_base_of(client))} 2>/dev/null || exit 1\n{_IS_WORKER}\nis_worker"
        _, stdout, _ = client.exec_command(command, timeout=10)
        return stdout.channel.recv_exit_status() == 0


def stop_worker(target: SshTarget, pins: HostKeyPins, service: str) -> None:
    with ssh_session(target, pins, timeout=5) as client:
        if service == "systemd":
            run(client, f"sudo systemctl disable --now {SERVICE_NAME}.service")
        else:
            run(client, f"cd {shlex.quote(_base_of(client))} 2>/dev/null || exit 0\n{_IS_WORKER}\n"
                        'if is_worker; then kill "$(cat worker.pid)"; fi; rm -f worker.pid')


def _base_of(client: paramiko.SSHClient) -> str:
    sftp = client.open_sftp()
    try:
        return remote_base(sftp)
    finally:
        sftp.close()


# -- endpoints ---------------------------------------------------------------------------

ENDPOINT_SERVICE = "dw-endpoint"
CRON_MARK = "# dynamic-workload scaler"
# What an endpoint host needs of this checkout: the code, the data model, the pinned requirements.
ENDPOINT_CODE = ("endpoint", "worker", "cron", "schema.sql", "requirements.txt")
CODE_SUFFIXES = (".py", ".tpl")  # the modules, and the dashboard's template (endpoint/views/)


@dataclass(frozen=True)
class EndpointInstall:
    settings: dict[str, str]  # the environment of the endpoint and of its scaler (DW_*, AWS_REGION, ...)
    secret: str
    worker_key: Path  # the private key the scaler uses to provision workers
    aws_state: dict  # ./setup.sh aws's record, for the scaler's ec2 provider
    wheelhouse: Path  # wheels of requirements.txt for the host's Python: nothing is fetched there
    service: str = "systemd"  # or "process" for hosts without systemd
    cron: str = "crontab"  # or "file": write the entry to <base>/crontab, for hosts without cron
    python: str = "python3"


def ensure_remote_python(target: SshTarget, pins: HostKeyPins, python: str = "python3.11") -> tuple[str, str]:
    """Install `python` on the host if it lacks it (Amazon Linux 2023's own python3 is 3.9, too
    old for the endpoint's dependencies; the stdlib-only worker runs on it fine), and return
    (major.minor, machine): which wheels the host needs."""
    quoted = shlex.quote(python)
    with ssh_session(target, pins) as client:
        out = run(client, f"""command -v {quoted} > /dev/null \\
    || sudo dnf install -y -q {quoted} > /dev/null 2>&1 \\
    || (sudo apt-get install -y -qq {quoted} {quoted}-venv > /dev/null 2>&1)
{quoted} -c 'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.machine())'""", timeout=600)
    version, machine = out.split()[-2:]
    if tuple(int(part) for part in version.split(".")) < (3, 10):
        raise ProvisionError(f"{python} on {target.address} is Python {version}; the endpoint needs 3.10 or newer")
    return version, machine


def provision_endpoint(target: SshTarget, pins: HostKeyPins, install: EndpointInstall) -> str:
    """Install the endpoint and its scaler's crontab entry; returns the install folder."""
    with ssh_session(target, pins) as client:
        sftp = client.open_sftp()
        base = remote_base(sftp)
        for folder in ("", "/var/log", "/wheels"):
            mkdirs(sftp, base + folder)
        _upload_code(sftp, base)
        present = set(sftp.listdir(f"{base}/wheels"))
        for wheel in sorted(install.wheelhouse.glob("*.whl")):
            if wheel.name not in present:
                sftp.put(str(wheel), f"{base}/wheels/{wheel.name}")
        upload_text(sftp, f"{base}/secret", install.secret + "\n", mode=0o600)
        upload_text(sftp, f"{base}/worker-key.pem", install.worker_key.read_text(), mode=0o600)
        settings = {**install.settings, "DW_SECRET_FILE": f"{base}/secret", "DW_SSH_KEY": f"{base}/worker-key.pem",
                    "DW_AWS_STATE": f"{base}/aws-state.json", "DW_STATE_DIR": f"{base}/var"}
        aws_state = {**install.aws_state, "key_path": f"{base}/worker-key.pem"}
        upload_text(sftp, f"{base}/aws-state.json", json.dumps(aws_state, indent=1), mode=0o600)
        upload_text(sftp, f"{base}/dw.env",
                    "".join(f"{name}={shlex.quote(value)}\n" for name, value in sorted(settings.items())), mode=0o600)
        if install.service == "systemd":
            upload_text(sftp, f"{base}/{ENDPOINT_SERVICE}.service", _endpoint_unit(base, target.user))
        sftp.close()
        run(client, _endpoint_setup_script(base, install), timeout=600)
    return base


def _upload_code(sftp: paramiko.SFTPClient, base: str) -> None:
    for name in ENDPOINT_CODE:
        source = REPO_ROOT / name
        if source.is_file():
            sftp.put(str(source), f"{base}/{name}")
            continue
        for path in sorted(path for path in source.rglob("*") if path.suffix in CODE_SUFFIXES):
            relative = path.relative_to(REPO_ROOT).as_posix()
            mkdirs(sftp, f"{base}/{Path(relative).parent.as_posix()}")
            sftp.put(str(path), f"{base}/{relative}")


def _endpoint_unit(base: str, user: str) -> str:
    return f"""[Unit]
Description=dynamic-workload endpoint
After=network-online.target
Wants=network-online.target

[Service]
User={user}
WorkingDirectory={base}
EnvironmentFile={base}/dw.env
ExecStart={base}/.venv/bin/python -m endpoint
Restart=always
RestartSec=2
# The endpoint faces clients: it may write its data and nothing else -- not the code that
# the scaler's cron job runs, not the rest of the system.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={base}/var
PrivateTmp=yes
# Its data and logs are the users' payloads and results: owner-only.
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def _endpoint_setup_script(base: str, install: EndpointInstall) -> str:
    quoted = shlex.quote(base)
    cron_line = (f"* * * * * cd {quoted} && set -a && . ./dw.env && set +a && "
                 f".venv/bin/python -m cron.scale >> var/log/scaler.log 2>&1 {CRON_MARK}")
    if install.service == "systemd":
        start = f"""sudo install -m 0644 {ENDPOINT_SERVICE}.service /etc/systemd/system/{ENDPOINT_SERVICE}.service
sudo systemctl daemon-reload
sudo systemctl enable {ENDPOINT_SERVICE}.service
sudo systemctl restart {ENDPOINT_SERVICE}.service"""
    else:
        start = """if [ -f endpoint.pid ]; then kill -TERM -- "-$(cat endpoint.pid)" 2>/dev/null || true; sleep 2; fi
set -a; . ./dw.env; set +a
setsid nohup .venv/bin/python -m endpoint >> var/log/endpoint.log 2>&1 < /dev/null &
echo $! > endpoint.pid"""
    if install.cron == "crontab":
        schedule = f"""command -v crontab > /dev/null || sudo dnf install -y -q cronie \\
    || sudo apt-get install -y -qq cron
sudo systemctl enable --now crond 2> /dev/null || sudo systemctl enable --now cron
(crontab -l 2> /dev/null | grep -v {shlex.quote(CRON_MARK)}; echo {shlex.quote(cron_line)}) | crontab -"""
    else:
        schedule = f"echo {shlex.quote(cron_line)} > crontab"
    return f"""set -e
cd {quoted}
if [ ! -x .venv/bin/python ]; then {shlex.quote(install.python)} -m venv .venv; fi
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.installed 2> /dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-index --find-links wheels \
        -r requirements.txt
    echo "$wanted" > .venv/.installed
fi
{start}
{schedule}
"""
