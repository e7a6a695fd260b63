"""A one-minute run of the chaos soak (bench/soak.py) against a real ./deploy.sh local: its own history
check must pass, with every fault kind injected at least once (the disk-full kind only as root)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.soak_faults import KINDS
from conftest import PYTHON, REPO


@pytest.mark.slow
def test_a_one_minute_soak_loses_duplicates_and_leaves_nothing(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    soak = [PYTHON, "-m", "bench.soak", "--minutes", "1", "--lease-seconds", "5", "--fault-gap", "3",
            "--fault-hold", "4", "--worker-fault-gap", "5", "--max-iterations", "8000000",
            "--summary", str(summary_path)]
    # Started as `... &` from a script starts it: SIGINT ignored. Its Ctrl-C must stop the deployment all the same.
    with subprocess.Popen(["bash", "-c", 'trap "" INT; exec "$@"', "soak", *soak], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          # Its directory (kept when it fails) under the test's own.
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}) as soak_process:
        try:
            stdout, stderr = soak_process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            soak_process.terminate()  # the soak stops its deployment and what it started, then exits
            stdout, stderr = soak_process.communicate(timeout=300)
            pytest.fail(f"the soak did not end within 900 s:\n{stdout}\n--- stderr ---\n{stderr}")
    output = f"{stdout}\n--- stderr ---\n{stderr}"
    assert soak_process.returncode == 0, output
    summary = json.loads(summary_path.read_text())
    expected_kinds = set(KINDS) - set(summary["unavailable"])
    if os.geteuid() == 0:
        assert summary["unavailable"] == {}, output
    assert {kind for kind, count in summary["faults"].items() if count >= 1} == expected_kinds, output
    assert summary["acknowledged"] >= 60 and summary["completed_right"] == summary["acknowledged"], output
    for problem in ("lost", "duplicated", "wrong", "unexpected", "left_behind", "window_unreadable", "processes_left"):
        assert summary[problem] == [], output
    assert summary["failed"] is False
    assert summary["deploy_status"] == 130, output  # stopped by its Ctrl-C, not killed after the wait
    assert sum(summary["attempts"].values()) == summary["completed_right"], output
    assert summary["enqueue_wait"]["jobs"] == summary["acknowledged"], output
    assert "verdict: OK" in stdout


@pytest.mark.parametrize("option", [("--minutes", "0"), ("--rate", "-1"), ("--lease-seconds", "nan"),
                                    ("--max-attempts", "0"), ("--curl-share", "1.5"), ("--max-iterations", "1000"),
                                    ("--max-iterations", "100000001"), ("--disk-mib", "8"), ("--minutes", "ten")])
def test_bad_options_are_refused_before_anything_starts(option: tuple[str, str], tmp_path: Path) -> None:
    done = subprocess.run([PYTHON, "-m", "bench.soak", *option], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert option[0] in done.stderr and "usage:" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no directory made, so nothing started
