"""Fake hosts for the tests: network namespaces with real OpenSSH sshd, and client keys.

A fake host or instance (FakeHost) is a network namespace of its own with one address on a Linux bridge
that HostNetwork creates in the root namespace (10.231.N.0/24, the bridge itself is 10.231.N.1),
running a real OpenSSH sshd with its own host key, log and SFTP start folder (`root_dir`, the
host's "home"; logins also get HOME and the working folder set to it). Hosts reach each other
and the root namespace's bridge address; nothing is routed or NATed anywhere else. The fake
EC2 API that launches "instances" such hosts stand in for is tests/fakeaws.py.

Like conftest.py, every process is started in a process group of its own and stopped at
teardown; HostNetwork.close() also kills whatever else still runs inside its namespaces and
deletes the namespaces, veths and the bridge. Creating namespaces needs root: the fixtures
skip the test when not root.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import kill_group, wait_for

PYTHON = sys.executable
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
SUBNET_PREFIX = "10.231"
FIRST_HOST = 10  # hosts get 10.231.N.10, .11, ...
# The lock's name is older than this module's: runs of older checkouts at the same time take the same one.
LOCK_FILE = Path(tempfile.gettempdir()) / "dw-cloudhosts-subnet.lock"

# Runs every login command in the host's own folder: sshd itself always starts in the real
# user's home (/root, shared by all fake hosts), so ForceCommand goes through this first.
LOGIN_WRAPPER = """#!/bin/sh
cd "$HOME" || exit 1
if [ -z "$SSH_ORIGINAL_COMMAND" ]; then exec "${SHELL:-/bin/sh}" -l; fi
exec "${SHELL:-/bin/sh}" -c "$SSH_ORIGINAL_COMMAND"
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def tcp_open(address: str, port: int, timeout: float = 0.5) -> bool:
    """Whether address:port accepts a TCP connection (from the root namespace)."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def netns_list() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def link_names() -> list[str]:
    """Interface names in the root namespace (without the @peer suffix)."""
    return [line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link").stdout.splitlines()]


# --- client keys -------------------------------------------------------------------------------

def ssh_keypair(directory: str | Path, name: str = "id_ed25519", key_type: str = "ed25519") -> tuple[Path, str]:
    """A new passphrase-less client key: (private key path, public key line "ssh-ed25519 AAAA... comment")."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", f"dw-test-{name}", "-f", str(private)],
                   check=True, capture_output=True, timeout=30)
    return private, (directory / f"{name}.pub").read_text().strip()


def public_key_from_private(path: str | Path) -> str:
    """The public half ("ssh-rsa AAAA...") of a private key file, e.g. CreateKeyPair's KeyMaterial.

    ssh-keygen refuses private keys others can read, so the file is made 0600 first.
    """
    os.chmod(path, 0o600)
    result = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ssh-keygen -y -f {path} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def write_private_key(path: str | Path, material: str) -> Path:
    """Saves key material (e.g. CreateKeyPair's KeyMaterial) as a 0600 file usable by ssh and paramiko."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(material if material.endswith("\n") else material + "\n")
    os.chmod(path, 0o600)
    return path


# --- fake hosts --------------------------------------------------------------------------------

class FakeHost:
    """One fake instance: a network namespace with one address, optionally running sshd."""

    def __init__(self, network: HostNetwork, name: str, netns: str, veth: str, address: str,
                 state_dir: Path) -> None:
        self.network = network
        self.name = name
        self.netns = netns
        self.veth = veth  # the pair's root-namespace end, attached to the bridge
        self.hostname = re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-")[:63] or "host"  # what `hostname` says there
        self.address = address
        self.state_dir = state_dir  # sshd config, host key, pid file and log live here
        self.root_dir = (state_dir / "home").resolve()  # the host's own "disk": SFTP start folder and HOME
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.sshd_log = state_dir / "sshd.log"
        self.host_key = state_dir / "ssh_host_ed25519_key"
        self.sshd: subprocess.Popen[bytes] | None = None
        self.processes: list[subprocess.Popen[Any]] = []
        self.closed = False

    def __repr__(self) -> str:
        return f"FakeHost({self.name!r}, {self.address}, netns={self.netns})"

    # running things inside the namespace

    def command(self, cmd: list[str]) -> list[str]:
        """`cmd` wrapped to run inside this host's namespace, in a UTS namespace of its own whose hostname
        is `self.hostname` (the name, made a valid host name). exec all the way down: the pid of the
        wrapped command is the pid of `cmd`."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--", "/bin/sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *cmd]

    def run(self, cmd: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Starts `cmd` inside the namespace as the leader of a new process group (killed at close())."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs["start_new_session"] = True
        process = subprocess.Popen(self.command(cmd), **popen_kwargs)
        self.processes.append(process)
        return process

    def execute(self, cmd: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs `cmd` inside the namespace to completion and returns its output (text)."""
        process = self.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process.pid)
            process.communicate()
            raise
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, cmd, stdout, stderr)
        return result

    def pids(self) -> list[int]:
        """Every process currently inside this host's network namespace."""
        result = _ip("netns", "pids", self.netns, check=False)
        return [int(pid) for pid in result.stdout.split() if pid.isdigit()]

    # sshd

    def start_sshd(self, authorized_keys: str | Path, timeout: float = 15.0) -> None:
        """Starts sshd on address:22 accepting (as any user, root included) the keys in `authorized_keys`
        (a file, or the key lines themselves), and waits until the port accepts connections."""
        if self.sshd is not None and self.sshd.poll() is None:
            raise RuntimeError(f"sshd already runs on {self}")
        keys_file = self.state_dir / "authorized_keys"
        if isinstance(authorized_keys, Path) or (authorized_keys and not _looks_like_keys(authorized_keys)):
            text = Path(authorized_keys).read_text()
        else:
            text = authorized_keys
        keys_file.write_text(text if text.endswith("\n") else text + "\n")
        if not self.host_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.name}-host-key",
                            "-f", str(self.host_key)], check=True, capture_output=True, timeout=30)
        wrapper = self.state_dir / "login-wrapper.sh"
        wrapper.write_text(LOGIN_WRAPPER)
        wrapper.chmod(0o755)
        config = self.state_dir / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {self.address}",
            "Port 22",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {keys_file}",
            f"PidFile {self.state_dir / 'sshd.pid'}",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UseDNS no",
            "LogLevel VERBOSE",
            f"SetEnv HOME={self.root_dir}",
            f"ForceCommand {wrapper}",
            f"Subsystem sftp {SFTP_SERVER} -d {self.root_dir}",
            "",
        ]))
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation folder
        with open(self.state_dir / "sshd.out", "ab") as out:
            self.sshd = self.run([SSHD, "-D", "-e", "-E", str(self.sshd_log), "-f", str(config)],
                                 stdout=out, stderr=subprocess.STDOUT)

        def listening() -> bool:
            if self.sshd is not None and self.sshd.poll() is not None:
                raise AssertionError(f"sshd on {self} exited with {self.sshd.returncode}:\n{self.log()}")
            return tcp_open(self.address, 22, timeout=0.5)

        wait_for(listening, timeout, f"sshd on {self} to listen")

    def stop_sshd(self) -> None:
        """Stops the listening sshd and every SSH session it started (they run in sessions of their own)."""
        if self.sshd is None:
            return
        pid = self.sshd.pid
        session_pids = [p for p in self.pids() if p != pid and _parent_chain_contains(p, pid)]
        kill_group(pid)
        for child in session_pids:
            kill_group(child)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.sshd.wait(10)
        self.sshd = None

    def sshd_running(self) -> bool:
        return self.sshd is not None and self.sshd.poll() is None

    def host_public_key(self) -> str:
        """The host key as "ssh-ed25519 AAAA..." (without comment), as a known_hosts line carries it."""
        key_type, blob = (self.host_key.parent / (self.host_key.name + ".pub")).read_text().split()[:2]
        return f"{key_type} {blob}"

    def host_key_fingerprint(self) -> str:
        """The host key's fingerprint as "SHA256:..." (what ssh-keygen -l and ssh print)."""
        result = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{self.host_key}.pub"],
                                capture_output=True, text=True, check=True, timeout=30)
        return result.stdout.split()[1]

    def known_hosts_line(self) -> str:
        return f"{self.address} {self.host_public_key()}"

    def log(self) -> str:
        parts = []
        for path in (self.sshd_log, self.state_dir / "sshd.out"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    # teardown

    def kill_all(self) -> None:
        """SIGKILL to every process group we started here and to every process still in the namespace."""
        for process in self.processes:
            kill_group(process.pid)
        for _ in range(50):
            remaining = self.pids()
            if not remaining:
                break
            for pid in remaining:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        self.sshd = None

    def close(self) -> None:
        """Kills everything in the namespace and deletes it (its veth pair goes with it)."""
        if self.closed:
            return
        self.kill_all()
        # The veth first: a deleted namespace is torn down asynchronously, its links with it.
        _ip("link", "delete", self.veth, check=False)
        _ip("netns", "delete", self.netns, check=False)
        self.closed = True


def _looks_like_keys(text: str) -> bool:
    return "\n" in text.strip() or re.match(r"\s*(ssh-|ecdsa-|sk-)", text) is not None


def _parent_chain_contains(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if ppid == ancestor:
            return True
        if ppid <= 1:
            return False
        pid = ppid
    return False


class HostNetwork:
    """A bridge in the root namespace at 10.231.N.1/24 and fake hosts attached to it.

    N is a /24 no interface uses yet, picked under a file lock so runs at once do not collide.
    Use as a context manager or call close(); an atexit hook closes what a crash left open.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tag = secrets.token_hex(3)
        self.bridge = f"dwbr{self.tag}"
        self.hosts: list[FakeHost] = []
        self.closed = False
        self.subnet = 0
        atexit.register(self.close)
        try:
            self._create_bridge()
        except BaseException:
            self.close()
            raise

    def _create_bridge(self) -> None:
        with open(LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = {int(m) for m in re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", _ip("-o", "addr").stdout)}
            free = [n for n in range(1, 251) if n not in used]
            if not free:
                raise RuntimeError(f"no free {SUBNET_PREFIX}.N.0/24 left")
            self.subnet = free[secrets.randbelow(min(len(free), 25))]
            _ip("link", "add", self.bridge, "type", "bridge")
            _disable_ipv6(self.bridge)
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge: root services the hosts must reach listen here."""
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, name: str) -> FakeHost:
        if self.closed:
            raise RuntimeError("the network is closed")
        index = len(self.hosts)
        if FIRST_HOST + index > 254:
            raise RuntimeError("no addresses left on this network")
        netns = f"dw{self.tag}-{index}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"[:60]
        veth = f"dwv{self.tag}h{index}"  # root end, at most 15 characters
        address = f"{SUBNET_PREFIX}.{self.subnet}.{FIRST_HOST + index}"
        state_dir = self.directory / f"{index}-{name}"
        state_dir.mkdir(parents=True, exist_ok=True)
        host = FakeHost(self, name, netns, veth, address, state_dir)
        self.hosts.append(host)  # before creating anything, so close() removes what got made
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _disable_ipv6(veth)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        inside = ("-n", netns)
        subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], capture_output=True, timeout=30)
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip(*inside, "link", "set", "eth0", "up")
        _ip(*inside, "route", "add", "default", "via", self.gateway)
        return host

    def close(self) -> None:
        """Kills every process in the namespaces, deletes namespaces, veths and the bridge."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for host in reversed(self.hosts):
            with contextlib.suppress(Exception):
                host.close()
        _ip("link", "delete", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist (empty after close())."""
        names = [ns for ns in netns_list() if ns.startswith(f"dw{self.tag}-")]
        return names + [link for link in link_names() if self.tag in link]


def _disable_ipv6(interface: str) -> None:
    """No router solicitations and such on our links: IPv4 on the bridge is all the tests need."""
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6").write_text("1")


# --- fixtures -----------------------------------------------------------------------------------

def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("fake hosts need root (network namespaces, a bridge, sshd)")
    for tool in ("ip", "unshare", "ssh-keygen", SSHD, SFTP_SERVER):
        if shutil.which(tool) is None:
            pytest.skip(f"fake hosts need {tool}")


# The fixture is registered under its name= and also bound to that name. A test module imports
# `host_network_fixture` (marked noqa F401; no import shadowed by the test's argument, which
# ruff's F811 would flag) or `host_network`; either way pytest sees the fixture.

@pytest.fixture(name="host_network")
def host_network_fixture(tmp_path: Path) -> Iterator[HostNetwork]:
    """Function-scoped: a fresh bridge and subnet per test, everything in it removed at teardown."""
    require_root()
    network = HostNetwork(tmp_path / "hosts")
    try:
        yield network
    finally:
        network.close()


host_network = host_network_fixture
