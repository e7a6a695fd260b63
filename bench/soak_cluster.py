"""The soak's cluster: a real `./deploy.sh local` on a state directory and ports of its own, with a
link proxy between the endpoints and (as root) each endpoint's data file on a small tmpfs.

Everything here is found through what this run started: the deployment's process group, processes
whose command line or environment names its state directory, and the local provider's worker
records under <state>/workers. Nothing else on the machine is looked at or signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench._endpoint import stop_group

REPO = Path(__file__).resolve().parent.parent
NODES = ("a", "b")
BANNER_END = "Ctrl-C stops everything"
FILLER_NAME = "filler-of-the-soak"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def cpu_ticks(pid: int) -> int | None:
    fields = proc_stat(pid)
    return None if fields is None else int(fields[11]) + int(fields[12])  # utime + stime


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def names(pid: int, needle: bytes) -> bool:
    """Whether the process's command line or environment holds `needle`."""
    try:
        return needle in command_line(pid) or needle in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def all_pids() -> list[int]:
    return [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# --- the link between the endpoints ---------------------------------------------------------------------


class LinkProxy:
    """A TCP proxy on loopback in front of one endpoint, which the other endpoint and its scaler use as
    their peer URL. `cut("blackhole")` makes the link drop everything (connections open but nothing
    passes, as when packets are lost), `cut("refuse")` resets every connection; `restore()` forwards again
    and resets what was held."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "forward"
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()  # every socket of ours still open, held ones included
        self.links: list[tuple[socket.socket, socket.socket]] = []
        self.closing = False
        self.thread = threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                mode = self.mode
                self.open.add(client)
            if mode == "refuse":
                self._reset(client)
            elif mode == "forward":
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()
            # blackhole: held open, never read, until restore()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            self._reset(client)
            return
        with self.lock:
            self.open.add(upstream)
            self.links.append((client, upstream))
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with self.lock:
            held = self.mode == "blackhole"
        if not held:  # one side is done: so is the link (HTTP needs no half-closed connections)
            for sock in (source, target):
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self.lock:
            if sock not in self.open:
                return
            self.open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _reset(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with a RST
        self._close(sock)

    def cut(self, mode: str) -> None:
        assert mode in ("blackhole", "refuse")
        with self.lock:
            self.mode = mode
            links, self.links = self.links, []
        for client, upstream in links:
            self._close(upstream)  # the far end hears nothing more from this connection
            if mode == "refuse":
                self._reset(client)

    def restore(self) -> None:
        with self.lock:
            self.mode = "forward"
            held = [sock for sock in self.open if all(sock not in link for link in self.links)]
        for sock in held:
            self._reset(sock)

    def close(self) -> None:
        self.closing = True
        self.listener.close()
        self.cut("refuse")
        self.restore()


# --- a small disk for each endpoint's data ----------------------------------------------------------------


class SmallDisk:
    """A size-limited tmpfs (needs root) that holds one endpoint's data file; `fill()` takes its last byte."""

    def __init__(self, mount_point: Path, size_bytes: int) -> None:
        self.mount_point = mount_point
        mount_point.mkdir(mode=0o700, parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs",
                               str(mount_point)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise OSError(f"cannot mount a tmpfs at {mount_point}: {done.stderr.strip()}")
        self.filler = mount_point / FILLER_NAME

    def fill(self) -> int:
        """Write a file of ours until the filesystem has no byte left; returns its size."""
        chunk = b"\0" * 65536
        with open(self.filler, "ab", buffering=0) as out:
            for size in (65536, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        out.write(chunk[:size])
        return self.filler.stat().st_size

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> str:
        """Unmounted (lazily if something still holds a file there: then says so)."""
        deadline = time.monotonic() + 10
        while True:
            done = subprocess.run(["umount", str(self.mount_point)], capture_output=True, text=True, check=False)
            if done.returncode == 0:
                return ""
            if time.monotonic() > deadline:
                subprocess.run(["umount", "-l", str(self.mount_point)], check=False)
                return f"{self.mount_point} was still busy ({done.stderr.strip()}); detached lazily"
            time.sleep(0.2)


def small_disks_unavailable() -> str:
    """Why the disk-full fault cannot run here, or '' if it can."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    return ""


# --- the deployment ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    worker_id: str
    pid: int  # its supervisor, leader of its process group


class Cluster:
    """`./deploy.sh local` on `root`/state with free ports, its peers through LinkProxy, its data on small disks."""

    def __init__(self, root: Path, *, lease_s: float, max_attempts: int, max_workers: int, disk_bytes: int,
                 every_s: float, say: Callable[[str], None]) -> None:
        self.root = root
        self.state = root / "state"
        self.say = say
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.max_workers = max_workers
        self.every_s = every_s
        self.ports = {node: free_port() for node in NODES}
        self.urls = {node: f"http://127.0.0.1:{port}" for node, port in self.ports.items()}
        self.proxies: dict[str, LinkProxy] = {}  # node -> the proxy in front of it (its peer's way to it)
        self.disks: dict[str, SmallDisk] = {}
        self.disk_bytes = disk_bytes
        self.no_disks_reason = small_disks_unavailable()
        self.deploy: subprocess.Popen[bytes] | None = None
        self.deploy_log = root / "deploy.log"
        self.needle = str(self.state).encode()

    def start(self) -> None:
        self.state.mkdir(mode=0o700, parents=True)
        for node in NODES:
            self.proxies[node] = LinkProxy(self.ports[node])
        if not self.no_disks_reason:
            try:
                for node in NODES:
                    disk = self.disks[node] = SmallDisk(self.state / f"disk-{node}", self.disk_bytes)
                    # SQLite follows the link: the data file, its WAL and shared memory live on the small disk.
                    (self.state / f"{node}.sqlite3").symlink_to(disk.mount_point / f"{node}.sqlite3")
            except OSError as exc:
                self.no_disks_reason = str(exc)
        env = {**os.environ, "DW_STATE_DIR": str(self.state), "DW_LEASE_SECONDS": f"{self.lease_s:g}",
               "DW_MAX_ATTEMPTS": str(self.max_attempts),
               "DW_TEST_PEER_URLS": f"{self.proxies['b'].url},{self.proxies['a'].url}"}
        env.pop("DW_SECRET", None)
        with open(self.deploy_log, "wb") as log:
            self.deploy = subprocess.Popen(
                ["./deploy.sh", "local", "--port-a", str(self.ports["a"]), "--port-b", str(self.ports["b"]),
                 "--max-workers", str(self.max_workers), "--idle-timeout", "30", "--scale-after", "2",
                 "--every", f"{self.every_s:g}"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 180
        while BANNER_END not in self.deploy_log.read_text(errors="replace"):
            if self.deploy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"./deploy.sh local did not start:\n{self.deploy_log.read_text(errors='replace')}")
            time.sleep(0.2)

    def deploy_running(self) -> bool:
        return self.deploy is not None and self.deploy.poll() is None

    # --- finding what this run started -------------------------------------------------------------------

    def processes(self) -> list[int]:
        """Processes that name this run's state directory: its endpoints, scalers and workers."""
        return [pid for pid in all_pids() if pid != os.getpid() and proc_stat(pid) and names(pid, self.needle)]

    def service_group(self, module: str, node: str) -> int | None:
        """The process group of this run's endpoint (module "endpoint") or scaler ("cron.scale") of a node."""
        wanted = (f"\0-m\0{module}\0".encode(), f"\0--node-id\0{node}\0".encode())
        for pid in self.processes():
            command = command_line(pid)
            if all(part in command for part in wanted) and b"--terminate-all" not in command:
                with contextlib.suppress(OSError):
                    pgid = os.getpgid(pid)
                    if pgid != os.getpgid(0) and self.ours(pgid):
                        return pgid
        return None

    def ours(self, pid: int) -> bool:
        return proc_stat(pid) is not None and names(pid, self.needle)

    def workers(self) -> list[Worker]:
        """Live workers from the local provider's records (start time checked: no recycled PID)."""
        found = []
        for record_path in sorted((self.state / "workers").glob("*.json")):
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                continue
            fields = proc_stat(record["pid"])
            if fields is not None and int(fields[19]) == record["start_ticks"] and self.ours(record["pid"]):
                found.append(Worker(record["id"], record["pid"]))
        return found

    def slots_of(self, worker: Worker) -> list[int]:
        """A worker's slot processes: its children that multiprocessing spawned (not its resource tracker)."""
        slots = []
        for pid in all_pids():
            fields = proc_stat(pid)
            command = command_line(pid)
            spawned = b"spawn_main" in command and b"resource_tracker" not in command
            if fields and int(fields[1]) == worker.pid and spawned:
                slots.append(pid)
        return slots

    def stats(self, node: str, timeout: float = 3) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.urls[node]}/stats", timeout=timeout) as answer:
                return json.load(answer)
        except (OSError, ValueError):
            return None

    # --- the end -----------------------------------------------------------------------------------------

    def stop(self) -> tuple[int | None, list[str]]:
        """Ctrl-C to the deployment (its process group, as a terminal sends it); then whatever is left of this
        run is named and killed. Returns deploy's exit status and the processes that were left."""
        status = None
        if self.deploy is not None:
            running = self.deploy.poll() is None
            status = stop_group(self.deploy, signal.SIGINT, 120) if running else self.deploy.returncode
        time.sleep(0.5)
        left = []
        for pid in self.processes():
            command = command_line(pid).replace(b"\0", b" ").decode(errors="replace")
            left.append(f"{pid} {command[:160]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return status, left

    def close(self) -> list[str]:
        """Proxies closed and disks unmounted (after stop). Returns what could not be cleaned up."""
        problems = []
        for proxy in self.proxies.values():
            proxy.close()
        for disk in self.disks.values():
            disk.free()
            problem = disk.unmount()
            if problem:
                problems.append(problem)
        return problems
