"""cli/interrupts.py in real processes: a signal raises Interrupted at once, also while threads
wait; a step marked as not to be cut in half finishes first; a second signal ends the process."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time

from conftest import PYTHON, REPO


def start(program: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, "-c", textwrap.dedent(program)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen[str], expected: str) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == expected, (line, process.stderr.read() if process.stderr else "")


PREAMBLE = """
import os, sys, time, threading
from cli.interrupts import Interrupted, deferred_signals, exit_now, parallel, stop_on_signals
stop_on_signals()
"""


def test_a_signal_inside_a_deferred_step_is_raised_when_the_step_is_done() -> None:
    process = start(PREAMBLE + """
try:
    with deferred_signals():
        print("inside", flush=True)
        time.sleep(1.5)  # the signal arrives meanwhile
        print("step done", flush=True)
    print("not reached", flush=True)
except Interrupted as exc:
    print(f"interrupted by {exc.name} after the step", flush=True)
    exit_now(exc.exit_status)
""")
    wait_for_line(process, "inside")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert stdout.splitlines() == ["step done", "interrupted by Ctrl-C after the step"], stderr
    assert process.returncode == 130


def test_threads_still_waiting_do_not_hold_up_the_exit() -> None:
    process = start(PREAMBLE + """
try:
    print("waiting", flush=True)
    parallel(lambda seconds: time.sleep(seconds), [60, 60])  # two threads that wait a minute
except Interrupted as exc:
    print(f"stopped by {exc.name}", flush=True)
    exit_now(exc.exit_status)
""")
    wait_for_line(process, "waiting")
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    stdout, _ = process.communicate(timeout=30)
    assert time.monotonic() - signalled < 5
    assert stdout.strip() == "stopped by SIGTERM" and process.returncode == 143


def test_a_second_signal_ends_the_process_at_once() -> None:
    process = start(PREAMBLE + """
try:
    print("running", flush=True)
    time.sleep(60)
except Interrupted:
    print("reporting", flush=True)
    time.sleep(60)  # a report that hangs: the second Ctrl-C must not wait for it
""")
    wait_for_line(process, "running")
    process.send_signal(signal.SIGINT)
    wait_for_line(process, "reporting")
    process.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    process.communicate(timeout=30)
    assert time.monotonic() - signalled < 5
    assert process.returncode == 130
