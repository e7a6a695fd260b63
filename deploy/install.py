"""Installing an endpoint host over SSH (cloud/ssh.py): the endpoint service and its scaler's
crontab entry, from this checkout.

The host gets the code (endpoint/, worker/, cron/, cli/, cloud/, schema.sql: no git clone), a
venv installed offline from wheels downloaded here for the host's Python (`wheelhouse_for`),
the cluster secret, setup's record and the private key its scaler provisions workers with
(0600 each), its settings in dw.env (0600), then the endpoint as a systemd unit or a detached
process, and the crontab entry that runs the scaler every minute. Its data and logs live in
var/ (0700); the shell that opens the endpoint's and the scaler's logs runs with umask 077.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko

from cli.settings import environment
from cloud.ssh import HostKeyPins, SshTarget, mkdirs, remote_base, run, ssh_session, unit_file, upload_text
from cron.config import SETTINGS as SCALER_SETTINGS
from deploy.cluster import announce
from deploy.cluster_ca import Pem
from endpoint.config import OPTIONS as ENDPOINT_SETTINGS

REPO_ROOT = Path(__file__).resolve().parents[1]
ENDPOINT_SERVICE = "dw-endpoint"
CRON_MARK = "# dynamic-workload scaler"
# What an endpoint host needs of this checkout: the code, the data model, the pinned requirements.
ENDPOINT_CODE = ("endpoint", "worker", "cron", "cli", "cloud", "schema.sql", "requirements.txt")
# What the endpoint host builds the workers' hashing kernel from (worker/build_kernel.sh).
KERNEL_SOURCES = ("build_kernel.sh", "sha512_lanes.c", "sha512_lanes_undef.h")
CODE_SUFFIXES = (".py", ".tpl")  # the modules, and the dashboard's template (endpoint/views/)


class InstallError(Exception):
    """The host cannot run the endpoint, or the wheels it needs cannot be had."""


@dataclass(frozen=True)
class EndpointInstall:
    settings: dict[str, str]  # the environment of the endpoint and of its scaler (DW_*, AWS_REGION, ...)
    cluster_secret: str
    ssh_key: Path  # the private key the host's scaler provisions workers with (setup's key pair)
    aws_state: dict  # ./setup.sh aws's record, for the scaler's ec2 provider
    wheelhouse: Path  # wheels of requirements.txt for the host's Python: nothing is fetched there
    service: str = "systemd"  # or "process" for hosts without systemd
    cron: str = "crontab"  # or "file": write the entry to <base>/crontab, for hosts without cron
    python: str = "python3"
    # HTTPS: this endpoint's certificate and key (made for this host alone) and the cluster CA's certificate.
    tls: Pem | None = None
    ca_certificate: str = ""


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
        raise InstallError(f"{python} on {target.address} is Python {version}; the endpoint needs 3.10 or newer")
    return version, machine


def install_endpoint(target: SshTarget, pins: HostKeyPins, install: EndpointInstall) -> str:
    """Install the endpoint and its scaler's crontab entry; returns the install folder."""
    with ssh_session(target, pins) as client:
        sftp = client.open_sftp()
        base = remote_base(sftp)
        mkdirs(sftp, f"{base}/wheels")
        for folder in ("var", "var/log"):  # the users' payloads and results, the logs: owner-only
            mkdirs(sftp, f"{base}/{folder}", mode=0o700)
        _upload_code(sftp, base)
        present = set(sftp.listdir(f"{base}/wheels"))
        for wheel in sorted(install.wheelhouse.glob("*.whl")):
            if wheel.name not in present:
                sftp.put(str(wheel), f"{base}/wheels/{wheel.name}")
        upload_text(sftp, f"{base}/secret", install.cluster_secret + "\n", mode=0o600)
        upload_text(sftp, f"{base}/worker-key.pem", install.ssh_key.read_text(), mode=0o600)
        # The endpoint reads DW_SECRET_FILE too: the two tables name it alike.
        settings = {**install.settings, **environment(SCALER_SETTINGS, {
            "secret_file": f"{base}/secret", "ssh_key": f"{base}/worker-key.pem",
            "aws_state": f"{base}/aws-state.json", "state_dir": f"{base}/var"}), **_upload_tls(sftp, base, install)}
        aws_state = {**install.aws_state, "key_path": f"{base}/worker-key.pem"}
        upload_text(sftp, f"{base}/aws-state.json", json.dumps(aws_state, indent=1), mode=0o600)
        upload_text(sftp, f"{base}/dw.env",
                    "".join(f"{name}={shlex.quote(value)}\n" for name, value in sorted(settings.items())), mode=0o600)
        if install.service == "systemd":
            upload_text(sftp, f"{base}/{ENDPOINT_SERVICE}.service", _endpoint_unit(base, target.user))
        sftp.close()
        run(client, _endpoint_setup_script(base, install), timeout=600)
    return base


def _upload_tls(sftp: paramiko.SFTPClient, base: str, install: EndpointInstall) -> dict[str, str]:
    """The endpoint's certificate and key (0600) and the CA's certificate, in tls/; the settings that name them
    (DW_TLS_CA: the endpoint checks its peer with it, the scaler its endpoints, and hands it to the workers)."""
    if install.tls is None:
        return {}
    mkdirs(sftp, f"{base}/tls", mode=0o700)
    upload_text(sftp, f"{base}/tls/endpoint-key.pem", install.tls.key.decode(), mode=0o600)
    upload_text(sftp, f"{base}/tls/endpoint.pem", install.tls.certificate.decode(), mode=0o600)
    upload_text(sftp, f"{base}/tls/ca.pem", install.ca_certificate)
    return environment(ENDPOINT_SETTINGS, {"tls_cert": f"{base}/tls/endpoint.pem",
                                           "tls_key": f"{base}/tls/endpoint-key.pem", "tls_ca": f"{base}/tls/ca.pem"})


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
    for name in KERNEL_SOURCES:
        sftp.put(str(REPO_ROOT / "worker" / name), f"{base}/worker/{name}")


def _endpoint_unit(base: str, user: str) -> str:
    return unit_file("dynamic-workload endpoint", f"""
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
UMask=0077""")


def _endpoint_setup_script(base: str, install: EndpointInstall) -> str:
    quoted = shlex.quote(base)
    # umask 077 before the shell opens a log: the scaler's and the endpoint's logs are owner-only
    # from their first byte (each program sets its umask itself too, but only once it runs).
    cron_line = (f"* * * * * umask 077; cd {quoted} && set -a && . ./dw.env && set +a && "
                 f".venv/bin/python -m cron.scale >> var/log/scaler.log 2>&1 {CRON_MARK}")
    if install.service == "systemd":
        start = f"""sudo install -m 0644 {ENDPOINT_SERVICE}.service /etc/systemd/system/{ENDPOINT_SERVICE}.service
sudo systemctl daemon-reload
sudo systemctl enable {ENDPOINT_SERVICE}.service
sudo systemctl restart {ENDPOINT_SERVICE}.service"""
    else:
        start = """if [ -f endpoint.pid ]; then kill -TERM -- "-$(cat endpoint.pid)" 2>/dev/null || true; sleep 2; fi
set -a; . ./dw.env; set +a
umask 077
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
# The workers' hashing kernel, built here for the workers (they have no compiler, and worker
# provisioning copies it); without it they hash with their Python loop, so a failed build does
# not stop the deploy.
command -v cc > /dev/null || sudo dnf install -y -q gcc > /dev/null 2>&1 \
    || sudo apt-get install -y -qq gcc > /dev/null 2>&1 || true
sh worker/build_kernel.sh || echo "the workers will hash with their Python loop" >&2
{start}
{schedule}
"""


_wheels_lock = threading.Lock()  # both endpoints' provisioning may want the same folder at once


def wheelhouse_for(aws_dir: Path, version: str, machine: str) -> Path:
    """Wheels of requirements.txt for the hosts' Python, downloaded here once: the hosts
    install offline, so they need no access to the package index."""
    folder = aws_dir / "wheels" / f"cp{version.replace('.', '')}-{machine}"
    stamp = folder / ".requirements"
    wanted = (REPO_ROOT / "requirements.txt").read_text()
    with _wheels_lock:
        if stamp.exists() and stamp.read_text() == wanted:
            return folder
        announce(f"downloading wheels for Python {version} on {machine} into {folder}")
        platforms = [f"manylinux{tag}_{machine}" for tag in ("2014", "_2_17", "_2_28", "_2_34")]
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                   "--only-binary=:all:", "--implementation", "cp", "--python-version", version,
                   "-r", str(REPO_ROOT / "requirements.txt"), "-d", str(folder)]
        for platform in platforms:
            command += ["--platform", platform]
        if subprocess.run(command).returncode != 0:
            raise InstallError(f"downloading wheels for Python {version}/{machine} (is the package index reachable "
                              f"from here?)")
        stamp.write_text(wanted)
    return folder
