"""`./deploy.sh local` runs the whole system and leaves nothing behind when stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from conftest import REPO, free_port, group_members, pid_alive, reference, wait_for


def processes_mentioning(*needles: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(needle in cmdline for needle in needles) and pid_alive(int(entry.name)):
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_deploy_local_serves_a_job_and_stops_everything(tmp_path: Path, stop_signal: int) -> None:
    port_a, port_b = free_port(), free_port()
    state = tmp_path / "state"
    env = {**os.environ, "DW_STATE_DIR": str(state)}
    env.pop("DW_SECRET", None)
    log = open(tmp_path / "deploy.log", "wb")  # noqa: SIM115 -- closed below
    deploy = subprocess.Popen(
        ["./deploy.sh", "local", "--port-a", str(port_a), "--port-b", str(port_b), "--scale-after", "0",
         "--idle-timeout", "5", "--every", "0.5", "--max-workers", "2"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    worker_pids: set[int] = set()
    try:
        wait_for(lambda: b"Ctrl-C stops everything" in (tmp_path / "deploy.log").read_bytes() or deploy.poll(),
                 timeout=120, what="deploy.sh to start")
        assert deploy.poll() is None, (tmp_path / "deploy.log").read_text()
        printed = (tmp_path / "deploy.log").read_text()
        assert f'curl -X PUT "http://127.0.0.1:{port_a}/enqueue?iterations=10" -d "data=Hello"' in printed

        work_id = requests.put(f"http://127.0.0.1:{port_b}/enqueue?iterations=10", data={"data": "Hello"},
                               timeout=10).json()["id"]

        def pulled() -> list:
            for record in (state / "workers").glob("*.json"):
                worker_pids.add(json.loads(record.read_text())["pid"])
            return requests.post(f"http://127.0.0.1:{port_a}/pullCompleted?top=5", timeout=10).json()

        assert wait_for(pulled, timeout=60, what="the job's result") == [
            {"id": work_id, "result": reference(b"Hello", 10)}]
        assert worker_pids, "the scaler should have started a worker for the job"
        assert (state / "secret").stat().st_mode & 0o077 == 0, "the secret file must be private"
    finally:
        if stop_signal == signal.SIGINT:
            os.killpg(deploy.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            deploy.send_signal(signal.SIGTERM)  # to deploy.sh alone
        try:
            deploy.wait(60)
        finally:
            log.close()
            leftovers = processes_mentioning(str(state), f"127.0.0.1:{port_a}", f"--port {port_a}")
            leftovers += [f"worker group {pid}" for pid in worker_pids if group_members(pid)]
            if deploy.poll() is None or leftovers:  # clean up what the failed test left, then fail
                os.killpg(deploy.pid, signal.SIGKILL)
                for pid in worker_pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
    assert leftovers == []
    assert "stopped." in (tmp_path / "deploy.log").read_text()


def test_deploy_rejects_unknown_options() -> None:
    completed = subprocess.run(["./deploy.sh", "local", "--bogus"], cwd=REPO, capture_output=True, timeout=30)
    assert completed.returncode == 2
    assert b"unknown option --bogus" in completed.stderr
