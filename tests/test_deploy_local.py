"""`./deploy.sh local` runs the whole system, checks what it is given, watches what it started, keeps one
deployment per state directory, and leaves nothing behind when stopped."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from conftest import REPO, free_port, group_members, pid_alive, reference, wait_for
from deploy.supervise import Failed, RestartPolicy, Service, Supervisor
from endpoint.secret import operator_key

BANNER_END = "Ctrl-C stops everything"


def processes_of(state: Path) -> list[int]:
    """Processes whose command line or environment names the state directory: the deployment's endpoints,
    scalers and workers (and their server and slot processes). The directory is the test's own, so this
    finds only processes the test started."""
    needle = str(state).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Deployment:
    """One `./deploy.sh local` run on its own state directory and ports (unless told otherwise)."""

    def __init__(self, directory: Path, *args: str, state: Path | None = None, ports: tuple[int, int] | None = None,
                 env: dict[str, str] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.state = state or directory / "state"
        self.port_a, self.port_b = ports or (free_port(), free_port())
        scheme = "https" if "--tls" in args else "http"
        self.url_a, self.url_b = f"{scheme}://127.0.0.1:{self.port_a}", f"{scheme}://127.0.0.1:{self.port_b}"
        self.ca_file = self.state / "tls" / "ca.pem"
        self.verify: str | bool = str(self.ca_file) if "--tls" in args else True
        self.log_path = directory / f"deploy-{time.monotonic_ns()}.log"
        environment = {**os.environ, "DW_STATE_DIR": str(self.state), **(env or {})}
        environment.pop("DW_SECRET", None)
        with open(self.log_path, "wb") as log:
            # A session of its own, like a terminal's: its process group is what Ctrl-C reaches.
            self.process = subprocess.Popen(
                ["./deploy.sh", "local", "--port-a", str(self.port_a), "--port-b", str(self.port_b), *args],
                cwd=REPO, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, umask=0o022)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_running(self, timeout: float = 120) -> None:
        wait_for(lambda: BANNER_END in self.output() or self.process.poll() is not None, timeout,
                 "deploy.sh to start")
        assert self.process.poll() is None, self.output()

    def wait_exit(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def stop(self, stop_signal: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            if stop_signal == signal.SIGINT:
                os.killpg(self.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            else:
                self.process.send_signal(stop_signal)  # to deploy.sh alone
        return self.wait_exit()

    def kill_everything(self) -> None:
        """After a failed test: whatever this run left, by its session and by its state directory."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in processes_of(self.state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def group_of(self, module: str, node: str) -> int:
        """The process group of this deployment's endpoint or scaler (module "endpoint" or "cron.scale") of a node."""
        groups = set()
        for pid in processes_of(self.state):
            with contextlib.suppress(OSError):
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
                if f"\0-m\0{module}\0".encode() in command and f"\0--node-id\0{node}\0".encode() in command:
                    groups.add(os.getpgid(pid))
        assert len(groups) == 1, f"{module} {node}: groups {groups}"
        return groups.pop()

    def wait_output(self, text: str, timeout: float = 60) -> None:
        wait_for(lambda: text in self.output() or self.process.poll() is not None, timeout, repr(text))
        assert text in self.output(), self.output()

    def stats(self, url: str) -> dict:
        response = requests.get(f"{url}/stats", timeout=10, verify=self.verify)
        assert response.status_code == 200, response.text
        return response.json()

    def enqueue(self, url: str, payload: bytes, iterations: int) -> str:
        response = requests.put(f"{url}/enqueue", params={"iterations": iterations}, data={"data": payload},
                                timeout=10, verify=self.verify)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def work(self, work_id: str) -> dict:
        response = requests.get(f"{self.url_a}/work/{work_id}", timeout=10, verify=self.verify)
        assert response.status_code == 200, response.text
        return response.json()

    def pull_until(self, expected: int, timeout: float = 60) -> list[dict]:
        pulled: list[dict] = []

        def enough() -> bool:
            pulled.extend(requests.post(f"{self.url_a}/pullCompleted?top=100", timeout=10, verify=self.verify).json())
            return len(pulled) >= expected

        wait_for(enough, timeout, f"{expected} result(s) from {self.url_a}")
        return pulled


@pytest.fixture
def deployments(tmp_path: Path) -> Iterator[list[Deployment]]:
    """Deployments a test starts; any still running (or leaving processes) at the end is killed, and fails it."""
    started: list[Deployment] = []
    yield started
    for deployment in reversed(started):
        if deployment.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                deployment.stop()
    leftovers = []
    for deployment in started:
        if deployment.process.poll() is None or processes_of(deployment.state):
            leftovers.append(f"{deployment.state}: {processes_of(deployment.state)}")
            deployment.kill_everything()
    assert leftovers == [], "processes left behind"


def deploy(deployments: list[Deployment], directory: Path, *args: str, **kwargs: object) -> Deployment:
    deployment = Deployment(directory, *args, **kwargs)  # type: ignore[arg-type]
    deployments.append(deployment)
    return deployment


FAST = ("--scale-after", "0", "--idle-timeout", "5", "--every", "0.5", "--max-workers", "2")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_deploy_local_serves_a_job_and_stops_everything(tmp_path: Path, deployments: list[Deployment],
                                                        stop_signal: int) -> None:
    deployment = deploy(deployments, tmp_path, *FAST)
    deployment.wait_running()
    assert (f'curl -X PUT "http://127.0.0.1:{deployment.port_a}/enqueue?iterations=10" -d "data=Hello"'
            in deployment.output())
    work_id = deployment.enqueue(deployment.url_b, b"Hello", 10)
    assert deployment.pull_until(1) == [{"id": work_id, "result": reference(b"Hello", 10)}]
    assert (deployment.state / "secret").stat().st_mode & 0o077 == 0, "the secret file must be private"
    # The dashboard's URLs, and a command that prints the operator key: the key itself in no output or log.
    output = deployment.output()
    assert f"dashboard   {deployment.url_a}/   {deployment.url_b}/" in output
    command = f".venv/bin/python -m endpoint.operator_key --secret-file {deployment.state}/secret"
    assert command in output
    key = subprocess.run(command.split(), cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    assert key == operator_key((deployment.state / "secret").read_text().strip())
    details = requests.get(f"{deployment.url_a}/details", auth=("operator", key), timeout=10)
    assert details.status_code == 200 and 'id="endpoint-b"' in details.text
    logs = [path.read_text(errors="replace") for path in (deployment.state / "log").glob("*.log")]
    assert all(key not in text for text in [output, *logs])

    assert deployment.stop(stop_signal) == (130 if stop_signal == signal.SIGINT else 143)
    assert processes_of(deployment.state) == []
    assert "stopped." in deployment.output()


def test_deploy_local_tls_serves_https_only_with_its_ca_and_the_printed_commands_work(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    deployment = deploy(deployments, tmp_path, *FAST, "--tls")
    deployment.wait_running()
    ca = deployment.ca_file
    output = deployment.output()
    tls_folder = deployment.state / "tls"
    assert sorted(path.name for path in tls_folder.iterdir()) == \
        ["a-key.pem", "a.pem", "b-key.pem", "b.pem", "ca-key.pem", "ca-key.pem.lock", "ca.pem"]
    assert all((tls_folder / name).stat().st_mode & 0o077 == 0 for name in ("ca-key.pem", "a-key.pem", "b-key.pem"))
    # The printed commands, run as printed (in the checkout, as the banner's user would).
    commands = [line.strip() for line in output.splitlines() if line.strip().startswith("curl ")]
    assert len(commands) == 4 and all(command.startswith(f"curl --cacert {ca} ") for command in commands), output
    answers = [subprocess.run(["sh", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=30)
               for command in commands[:2]]
    assert all(answer.returncode == 0 and '"id"' in answer.stdout for answer in answers), answers
    ids = {json.loads(answer.stdout)["id"] for answer in answers}
    pulled = deployment.pull_until(2)  # at endpoint a: b's result comes through the peer, over TLS
    assert {item["id"] for item in pulled} == ids
    assert {item["result"] for item in pulled if item["id"].startswith("a-")} == {reference(b"Hello", 10)}
    # The workers and scalers worked over TLS; plain HTTP and an untrusting client get nothing.
    assert deployment.stats(deployment.url_b)["scaler"]["last_run_s_ago"] is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{deployment.port_a}/stats", timeout=10)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{deployment.url_a}/stats", timeout=10)
    # A restart keeps the CA and issues the endpoints fresh certificates.
    ca_before = ca.read_bytes()
    assert deployment.stop() == 130
    again = deploy(deployments, tmp_path / "again", *FAST, "--tls", state=deployment.state)
    again.wait_running()
    assert ca.read_bytes() == ca_before and "cluster CA created" not in again.output()
    assert again.stats(again.url_a)["pending"] == 0
    assert again.stop() == 130


# --- options ----------------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--bogus"], "unknown option --bogus"),
    (["--max-workers"], "--max-workers needs a value"),
    (["--port-b", "6000", "--every"], "--every needs a value"),
    (["--max-workers", "0"], "--max-workers must be a whole number from 1 to 999999, not '0'"),
    (["--max-workers", "-1"], "--max-workers must be a whole number from 1 to 999999, not '-1'"),
    (["--max-workers", "two"], "--max-workers must be a whole number from 1 to 999999, not 'two'"),
    (["--max-workers", "1.5"], "--max-workers must be a whole number"),
    (["--max-workers="], "--max-workers must be a whole number from 1 to 999999, not ''"),
    (["--idle-timeout", "-5"], "--idle-timeout must be a number of seconds, more than 0, not '-5'"),
    (["--idle-timeout", "0"], "--idle-timeout must be a number of seconds, more than 0, not '0'"),
    (["--idle-timeout", "nan"], "--idle-timeout must be a number of seconds, more than 0, not 'nan'"),
    (["--scale-after", "-3"], "--scale-after must be a number of seconds, 0 or more, not '-3'"),
    (["--scale-after", "1e3"], "--scale-after must be a number of seconds, 0 or more, not '1e3'"),
    (["--every", "0"], "--every must be a number of seconds, more than 0, not '0'"),
    (["--every", "0.000"], "--every must be a number of seconds, more than 0, not '0.000'"),
    (["--port-a", "0"], "--port-a must be a whole number from 1 to 65535, not '0'"),
    (["--port-a", "65536"], "--port-a must be a whole number from 1 to 65535, not '65536'"),
    (["--port-a", "6000", "--port-b", "6000"], "--port-a and --port-b must differ (both are 6000)"),
    (["--max-restarts", "-1"], "--max-restarts must be a whole number from 0 to 999999, not '-1'"),
    (["--max-restarts", "five"], "--max-restarts must be a whole number from 0 to 999999, not 'five'"),
    (["--max-restarts"], "--max-restarts needs a value"),
]


@pytest.mark.parametrize(("args", "message"), BAD_OPTIONS, ids=[" ".join(args) for args, _ in BAD_OPTIONS])
def test_bad_options_are_refused_with_the_usage_before_anything_starts(tmp_path: Path, args: list[str],
                                                                       message: str) -> None:
    state = tmp_path / "state"
    # Free ports first (the options under test come after, and win): should a run start anyway, it takes
    # no port another deployment may use.
    command = ["./deploy.sh", "local", "--port-a", str(free_port()), "--port-b", str(free_port()), *args]
    try:
        completed = subprocess.run(command, cwd=REPO, capture_output=True, timeout=30, start_new_session=True,
                                   env={**os.environ, "DW_STATE_DIR": str(state)})
    finally:
        started = processes_of(state)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert started == []
    assert completed.returncode == 2, completed
    assert message in completed.stderr.decode()
    assert "usage: ./deploy.sh local" in completed.stderr.decode()
    assert not state.exists(), "nothing may be created, let alone started"


def test_help_names_the_state_directory_variable() -> None:
    completed = subprocess.run(["./deploy.sh", "local", "--help"], cwd=REPO, capture_output=True, timeout=30)
    assert completed.returncode == 0
    assert b"go to $DW_STATE_DIR (default var/)" in completed.stdout
    assert b"--max-restarts N" in completed.stdout and b"(default 5; 0: no restarts)" in completed.stdout


def test_options_take_the_equals_form_and_fractional_seconds(tmp_path: Path, deployments: list[Deployment]) -> None:
    # --scale-after 0.5 once broke the banner's arithmetic after everything had started.
    deployment = deploy(deployments, tmp_path, "--max-workers=1", "--scale-after", "0.5", "--every", ".5",
                        "--idle-timeout", "5")
    deployment.wait_running()
    assert "up to 1 worker(s)" in deployment.output() and "more once it waits 0.5s" in deployment.output()
    work_id = deployment.enqueue(deployment.url_a, b"x", 3)
    assert deployment.pull_until(1) == [{"id": work_id, "result": reference(b"x", 3)}]


# --- watching what it started -----------------------------------------------------------------------------------


def test_a_scaler_that_exits_at_start_up_stops_the_deployment(tmp_path: Path, deployments: list[Deployment]) -> None:
    # The scalers read DW_* settings too; one they refuse makes them exit at once.
    deployment = deploy(deployments, tmp_path, *FAST, env={"DW_TARGET_DRAIN": "0"})
    status = deployment.wait_exit(60)
    output = deployment.output()
    assert status == 1, output
    assert "is running locally" not in output
    assert re.search(r"scaler-[ab] exited \(during start-up, status 2\)", output)  # both do; one is told
    assert "--target-drain must be more than 0" in output  # the end of its log, shown
    assert "stopped." in output
    assert processes_of(deployment.state) == []


def test_with_restarts_off_a_service_that_dies_later_stops_the_deployment(tmp_path: Path,
                                                                         deployments: list[Deployment]) -> None:
    deployment = deploy(deployments, tmp_path, *FAST, "--max-restarts", "0")
    deployment.wait_running()
    assert "not restarted (--max-restarts 0)" in deployment.output()
    os.killpg(deployment.group_of("endpoint", "b"), signal.SIGKILL)  # endpoint b and its server process: a crash
    status = deployment.wait_exit(60)
    output = deployment.output()
    assert status == 1, output
    assert "endpoint-b exited (while running, killed by SIGKILL)" in output
    assert "giving up on it: restarts are off" in output
    assert "restarting" not in output
    assert processes_of(deployment.state) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{deployment.url_a}/stats", timeout=5)


def test_a_port_taken_by_something_else_is_refused_before_anything_starts(tmp_path: Path,
                                                                          deployments: list[Deployment]) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        deployment = deploy(deployments, tmp_path, *FAST, ports=(free_port(), taken))
        assert deployment.wait_exit(60) == 1
    assert f"127.0.0.1:{taken} is in use already" in deployment.output()
    assert not (deployment.state / "a.sqlite3").exists()


# --- supervision: a service that exits is restarted ---------------------------------------------------------------


def break_data_file(deployment: Deployment, node: str) -> None:
    """Kill an endpoint and put a folder where its data file was: every start fails from now on (the file
    is kept aside; its lock file stays, as a restart finds it)."""
    os.killpg(deployment.group_of("endpoint", node), signal.SIGKILL)
    db = deployment.state / f"{node}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{db}{suffix}").rename(f"{db}{suffix}.aside")
    db.mkdir()


def test_an_endpoint_killed_whole_comes_back_on_its_port_and_data(tmp_path: Path,
                                                                  deployments: list[Deployment]) -> None:
    deployment = deploy(deployments, tmp_path, *FAST)
    deployment.wait_running()
    instance_id = deployment.stats(deployment.url_b)["instance_id"]
    done = deployment.enqueue(deployment.url_b, b"done before", 5)
    wait_for(lambda: deployment.work(done)["state"] == "completed", 60, "the first job")
    waiting = deployment.enqueue(deployment.url_b, b"waiting", 3_000_000)  # about 2 s of work: not done yet
    old_group = deployment.group_of("endpoint", "b")

    os.killpg(old_group, signal.SIGKILL)  # the endpoint and its server process at once, as a crash
    deployment.wait_output("endpoint-b is back")
    output = deployment.output()
    assert "endpoint-b exited (while running, killed by SIGKILL)" in output
    assert "restarting it in 1 s (attempt 1 of 5)" in output
    new_group = deployment.group_of("endpoint", "b")
    assert new_group != old_group
    assert f"endpoint-b restarted (attempt 1 of 5), pid {new_group}" in output
    assert f"endpoint-b is back: {deployment.url_b}/stats reports this run's instance id" in output
    assert deployment.stats(deployment.url_b)["instance_id"] == instance_id  # same port, same id

    # Its data file: the result stored before the kill, and the job enqueued before it, which completes.
    pulled = {item["id"]: item["result"] for item in deployment.pull_until(2, timeout=90)}
    assert pulled == {done: reference(b"done before", 5), waiting: reference(b"waiting", 3_000_000)}
    assert deployment.process.poll() is None
    for log in (deployment.state / "log" / "deploy.log", deployment.state / "log" / "endpoint-b.log"):
        text = log.read_text()
        assert "endpoint-b exited (while running, killed by SIGKILL)" in text, log
        assert f"endpoint-b restarted (attempt 1 of 5), pid {new_group}" in text, log


def test_a_killed_scaler_is_restarted_and_scales_again(tmp_path: Path, deployments: list[Deployment]) -> None:
    deployment = deploy(deployments, tmp_path, *FAST)
    deployment.wait_running()
    old_group = deployment.group_of("cron.scale", "a")
    os.killpg(old_group, signal.SIGKILL)
    deployment.wait_output("scaler-a restarted (attempt 1 of 5)")
    restarted = time.time()
    assert "scaler-a exited (while running, killed by SIGKILL)" in deployment.output()
    assert deployment.group_of("cron.scale", "a") != old_group

    def ran_since_restart() -> bool:
        ago = deployment.stats(deployment.url_a)["scaler"]["last_run_s_ago"]
        return ago is not None and time.time() - ago > restarted
    wait_for(ran_since_restart, 30, "a decision of the restarted scaler")
    work_id = deployment.enqueue(deployment.url_a, b"after the scaler's restart", 5)
    assert deployment.pull_until(1) == [{"id": work_id, "result": reference(b"after the scaler's restart", 5)}]
    assert deployment.process.poll() is None


def test_a_restart_that_finds_the_port_taken_tries_again_later(tmp_path: Path,
                                                               deployments: list[Deployment]) -> None:
    # Something else takes the dead endpoint's port and answers /stats with another id: the restart meanwhile
    # fails (the endpoint cannot listen) or is not confirmed; once the port is free again, the next one is.
    deployment = deploy(deployments, tmp_path, *FAST)
    deployment.wait_running()
    os.killpg(deployment.group_of("endpoint", "b"), signal.SIGKILL)
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", deployment.port_b), ImpostorHandler,
                                               bind_and_activate=False)
    deadline = time.monotonic() + 5
    while True:  # the killed server's socket closes a moment after the kill
        try:
            impostor.server_bind()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    impostor.server_address = impostor.socket.getsockname()
    impostor.server_activate()
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        assert requests.get(f"{deployment.url_b}/stats", timeout=5).json()["instance_id"] == "someone else"
        deployment.wait_output("restarting it in 2 s (attempt 2 of 5)")
        assert "endpoint-b is back" not in deployment.output()
    finally:
        impostor.shutdown()
        impostor.server_close()
    deployment.wait_output("endpoint-b is back")
    assert re.search(r"endpoint-b exited \(while running, status 1\) after [\d.]+ s; restarting it in 2 s",
                     deployment.output())
    assert "address already in use" in (deployment.state / "log" / "endpoint-b.log").read_text().lower()
    assert deployment.stats(deployment.url_b)["instance_id"] == deployment.stats(deployment.url_a)["instance_id"]


class ImpostorHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 -- the http.server name
        body = b'{"instance_id": "someone else"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_service_that_keeps_crashing_is_given_up_and_everything_stops(tmp_path: Path,
                                                                        deployments: list[Deployment]) -> None:
    deployment = deploy(deployments, tmp_path, *FAST)
    deployment.wait_running()
    break_data_file(deployment, "a")
    status = deployment.wait_exit(120)  # 1 + 2 + 4 + 8 + 16 s of back-off, and the starts
    output = deployment.output()
    assert status == 1, output
    for attempt, delay in enumerate([1, 2, 4, 8, 16], start=1):
        assert f"restarting it in {delay} s (attempt {attempt} of 5)" in output
        assert f"endpoint-a restarted (attempt {attempt} of 5)" in output
    assert "attempt 6" not in output and "endpoint-a is back" not in output
    assert re.search(r"endpoint-a exited \(while running, status 1\) after [\d.]+ s; giving up on it: restarted 5 "
                     r"times in a row, and no run lasted 60 s; the end of \S+endpoint-a.log:", output)
    assert "unable to open database file" in output  # the end of its log, shown
    assert "stopping..." in output and "stopped." in output
    assert processes_of(deployment.state) == []
    for url in (deployment.url_a, deployment.url_b):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/stats", timeout=5)


@pytest.mark.parametrize(("stop_signal", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["Ctrl-C", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_during_a_restart_back_off_stops_everything_at_once(
        tmp_path: Path, deployments: list[Deployment], stop_signal: int, status: int) -> None:
    deployment = deploy(deployments, tmp_path, *FAST)
    deployment.wait_running()
    break_data_file(deployment, "b")
    deployment.wait_output("restarting it in 8 s (attempt 4 of 5)")
    signalled = time.monotonic()
    if stop_signal == signal.SIGINT:
        os.killpg(deployment.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        deployment.process.send_signal(stop_signal)
    assert deployment.wait_exit(60) == status
    took = time.monotonic() - signalled
    output = deployment.output()
    assert "attempt 4 of 5)," not in output  # "restarted (attempt 4 of 5), pid ...": the back-off was not waited out
    assert took < 7, f"the stop took {took:.1f}s, as long as the back-off it interrupted"
    assert "stopping..." in output and "stopped." in output
    assert processes_of(deployment.state) == []


# --- one deployment per state -----------------------------------------------------------------------------------


def test_a_second_run_on_the_same_state_is_refused_and_leaves_the_first_serving(
        tmp_path: Path, deployments: list[Deployment]) -> None:
    first = deploy(deployments, tmp_path / "first", *FAST)
    first.wait_running()
    instance_a, instance_b = first.stats(first.url_a)["instance_id"], first.stats(first.url_b)["instance_id"]
    assert instance_a and instance_a == instance_b
    logs = {path.name: path.stat().st_size for path in (first.state / "log").glob("endpoint-*.log")}

    for ports in [(first.port_a, first.port_b), (free_port(), free_port())]:  # the same ports, and others
        started = time.monotonic()
        second = deploy(deployments, tmp_path / "second", *FAST, state=first.state, ports=ports)
        status = second.wait_exit(30)
        took = time.monotonic() - started
        output = second.output()
        assert status == 1, output
        assert took < 10, f"the refusal took {took:.1f}s"
        assert f"another ./deploy.sh local runs on {first.state} (pid {first.process.pid}" in output
        assert f"endpoints {first.url_a} and {first.url_b}" in output
        assert f"kill -TERM {first.process.pid}" in output
        assert "is running locally" not in output and "stopping" not in output
        for port in ports:
            if port not in (first.port_a, first.port_b):
                with pytest.raises(requests.ConnectionError):
                    requests.get(f"http://127.0.0.1:{port}/stats", timeout=5)

    # The first is untouched: the same processes answer, nothing was started beside them, and it serves.
    assert first.process.poll() is None
    assert first.stats(first.url_a)["instance_id"] == instance_a
    assert {path.name: path.stat().st_size for path in (first.state / "log").glob("endpoint-*.log")} == logs
    work_id = first.enqueue(first.url_b, b"still here", 5)
    assert first.pull_until(1) == [{"id": work_id, "result": reference(b"still here", 5)}]


def test_two_deployments_on_different_states_and_ports_run_side_by_side(tmp_path: Path,
                                                                      deployments: list[Deployment]) -> None:
    one = deploy(deployments, tmp_path / "one", *FAST)
    two = deploy(deployments, tmp_path / "two", *FAST)
    one.wait_running()
    two.wait_running()
    ids = {deployment.stats(url)["instance_id"] for deployment in (one, two) for url in (deployment.url_a,
                                                                                          deployment.url_b)}
    assert len(ids) == 2 and None not in ids  # each deployment's endpoints report its own id

    jobs = {one: [one.enqueue(one.url_a, b"one-%d" % n, 7) for n in range(3)],
            two: [two.enqueue(two.url_b, b"two-%d" % n, 7) for n in range(3)]}
    for deployment, prefix in [(one, b"one"), (two, b"two")]:
        pulled = sorted(deployment.pull_until(3), key=lambda item: item["id"])
        assert pulled == sorted(({"id": work_id, "result": reference(b"%s-%d" % (prefix, n), 7)}
                                 for n, work_id in enumerate(jobs[deployment])), key=lambda item: item["id"])
        assert deployment.stats(deployment.url_a)["completed"] + deployment.stats(deployment.url_b)["completed"] == 3

    # Stopping one leaves the other serving.
    assert two.stop() == 130
    assert processes_of(two.state) == []
    work_id = one.enqueue(one.url_b, b"after", 4)
    assert one.pull_until(1) == [{"id": work_id, "result": reference(b"after", 4)}]


# --- restarts ---------------------------------------------------------------------------------------------------


def running_item(deployment: Deployment, work_id: str) -> dict | None:
    item = deployment.work(work_id)
    return item if item["state"] == "running" else None


def test_restarts_during_a_long_job_do_not_use_up_its_attempts(tmp_path: Path, deployments: list[Deployment]) -> None:
    # A short lease, so that a lease left behind by a stop expires (and would count) within the test;
    # the job (10^8 iterations, about a minute of Python hashing) outlasts every run of the deployment.
    env = {"DW_LEASE_SECONDS": "3", "DW_WORKER_KERNEL": "python"}
    ports = (free_port(), free_port())
    state = tmp_path / "state"
    work_id = ""
    for cycle in range(3):
        deployment = deploy(deployments, tmp_path, *FAST, state=state, ports=ports, env=env)
        deployment.wait_running()
        if not work_id:
            work_id = deployment.enqueue(deployment.url_a, b"long", 100_000_000)
        item = wait_for(functools.partial(running_item, deployment, work_id), 60, f"the job to run (cycle {cycle})")
        assert item["attempts"] == 1, f"cycle {cycle}: {item}"  # the stops before gave it back
        time.sleep(1.5)  # computing, and renewing its lease
        assert deployment.stop() == 130

    deployment = deploy(deployments, tmp_path, *FAST, state=state, ports=ports, env=env)
    deployment.wait_running()
    time.sleep(3 * 3)  # past any lease a stop could have left behind
    item = deployment.work(work_id)
    assert item["state"] in ("pending", "running", "completed"), item
    assert item["attempts"] <= 1, item
    worker_logs = "".join(path.read_text(errors="replace") for path in (state / "log").glob("worker-*.log"))
    assert "could not release" not in worker_logs


# --- file modes -------------------------------------------------------------------------------------------------


def test_everything_under_the_state_directory_is_owner_only(tmp_path: Path, deployments: list[Deployment]) -> None:
    # Started with umask 022, as from an ordinary shell.
    deployment = deploy(deployments, tmp_path, "--scale-after", "0", "--idle-timeout", "30", "--every", "0.5")
    deployment.wait_running()
    deployment.enqueue(deployment.url_a, b"private", 20)
    deployment.enqueue(deployment.url_b, b"private", 20)
    deployment.pull_until(2)
    wait_for(lambda: list((deployment.state / "workers").glob("*.json")), 10, "a worker record")

    def modes() -> dict[str, str]:
        return {str(path.relative_to(deployment.state)): oct(stat.S_IMODE(path.lstat().st_mode))
                for path in [deployment.state, *deployment.state.rglob("*")]}

    while_running = modes()
    for name in ("a.sqlite3", "a.sqlite3-wal", "b.sqlite3-shm", "log/endpoint-a.log", "log/scaler-b.log",
                 "secret", "deploy.lock", "workers", "workers/worker-key"):
        assert name in while_running, sorted(while_running)
    assert any(name.startswith("log/worker-") for name in while_running)
    assert any(name.startswith("workers/local-") for name in while_running)
    open_to_others = {name: mode for name, mode in while_running.items() if int(mode, 8) & 0o077}
    assert open_to_others == {}

    deployment.stop()
    open_to_others = {name: mode for name, mode in modes().items() if int(mode, 8) & 0o077}
    assert open_to_others == {}


# --- the supervisor on its own, with small real processes ---------------------------------------------------------


def test_the_back_off_doubles_from_1_s_to_30_s_and_a_stable_run_starts_it_over() -> None:
    policy = RestartPolicy(max_restarts=8)
    streak, delays = 0, []
    for _ in range(8):
        decision = policy.after_exit(streak, ran_s=0.5)
        assert decision is not None
        streak, delay = decision
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.after_exit(streak, ran_s=59.9) is None  # 8 restarts in a row, none lasted: given up
    assert policy.after_exit(streak, ran_s=60) == (1, 1)  # a stable run: as if it were the first exit
    assert RestartPolicy(max_restarts=0).after_exit(0, ran_s=3600) is None
    assert RestartPolicy(max_restarts=10**6).after_exit(10**5, ran_s=0) == (10**5 + 1, 30)


def supervise_until(supervisor: Supervisor, said: list[str], text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in said):
        assert time.monotonic() < deadline, f"{text!r} not in {said}"
        supervisor.check(restart=True)
        time.sleep(0.02)


def test_what_a_dead_service_left_in_its_group_is_killed_before_the_restart(tmp_path: Path) -> None:
    # The leader exits and leaves a child in its group (as a server's worker process could, holding the port).
    said: list[str] = []
    supervisor = Supervisor(RestartPolicy(first_delay_s=0.1), said.append)
    children = tmp_path / "children"
    service = Service("leaver", ["sh", "-c", f"sleep 60 & echo $! >> {children}; sleep 0.3"], tmp_path / "leaver.log",
                      dict(os.environ))
    supervisor.start(service)
    try:
        supervise_until(supervisor, said, "leaver restarted (attempt 1 of 5)")
        assert re.search(r"leaver exited \(while running, status 0\) after [\d.]+ s; restarting it in 0.1 s", said[0])
        first_child = int(children.read_text().split()[0])
        assert not pid_alive(first_child), "the child left behind must be gone before the restart"
    finally:
        supervisor.stop([service])
    assert service.process is None
    assert all(not pid_alive(int(pid)) for pid in children.read_text().split())
    assert "supervisor: leaver restarted (attempt 1 of 5)" in (tmp_path / "leaver.log").read_text()


def test_a_restart_not_confirmed_in_time_is_killed_and_counts_as_a_crash(tmp_path: Path) -> None:
    said: list[str] = []
    supervisor = Supervisor(RestartPolicy(first_delay_s=0.05, max_restarts=1), said.append, confirm_timeout_s=0.5)
    service = Service("mute", ["sleep", "60"], tmp_path / "mute.log", dict(os.environ),
                      confirm=lambda: (False, "nobody answers"))
    supervisor.start(service)
    try:
        assert service.process is not None
        os.killpg(service.process.pid, signal.SIGKILL)
        with pytest.raises(Failed) as failure:
            supervise_until(supervisor, said, "never said")
    finally:
        supervisor.stop([service])
    assert re.search(r"mute exited \(while running, killed by SIGKILL\) after 0\.[5-9]\d* s, killed because it was "
                     r"not confirmed within 0.5 s \(nobody answers\); giving up on it: restarted 1 time in a row",
                     str(failure.value)), str(failure.value)
    assert not any("is back" in line for line in said)


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace_time(tmp_path: Path) -> None:
    supervisor = Supervisor(RestartPolicy(), print, stop_grace_s=0.5)
    # An ignored signal stays ignored across exec: the shell and its sleep both ignore TERM.
    service = Service("stubborn", ["sh", "-c", "trap '' TERM; sleep 60 & sleep 60"], tmp_path / "stubborn.log",
                      dict(os.environ))
    supervisor.start(service)
    assert service.process is not None
    pgid = service.process.pid
    time.sleep(0.3)
    started = time.monotonic()
    supervisor.stop([service])
    assert time.monotonic() - started < 10
    assert group_members(pgid) == []
    assert service.process is None
