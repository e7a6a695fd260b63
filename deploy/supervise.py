"""Keep services running: each in a session and process group of its own, started again with a
back-off when it exits, given up after repeated crashes, and stopped by its group.

`./deploy.sh local` runs its endpoints and scalers under this (deploy/local.py), as systemd
runs them on EC2. The rule (RestartPolicy): a service that exits is started again after 1 s,
then 2, 4, 8, ... at most 30 s; a run that lasted 60 s counts as stable and resets the delay.
A service that has been restarted `max_restarts` times in a row (5) without a stable run is
not restarted again: its next exit is final, and the caller stops the rest. A restart can
be confirmed before the service counts as back (an endpoint: its /stats reports the instance
id it was started with); one not confirmed within `confirm_timeout_s` is killed, which counts
as one more crash.

Only the process groups this module created are signalled, and a group only while its leader
is not yet reaped: until then the kernel keeps the group's number for it, so no other process
can be hit. Stop signals (INT, TERM, HUP) become `Interrupted`, raised at once (a back-off wait
included) but held back while a service is being started or reaped, so no service goes untracked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TAIL_LINES = 15

# What a confirmation says: whether the service is the one started, and what was seen.
Confirm = Callable[[], tuple[bool, str]]


class Interrupted(Exception):
    """A stop signal arrived; `status` is the exit status that tells which (128 + its number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.status = 128 + signum


class Failed(Exception):
    """A service exited for good (or the start-up failed): the message, and the end of its log."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path
        self.log_tail = tail(log_path, TAIL_LINES) if log_path else []

    def report(self) -> str:
        if self.log_path is None:
            return str(self)
        return f"{self}; the end of {self.log_path}:\n" + "".join(f"    {line}\n" for line in self.log_tail)


class StopSignals:
    """INT, TERM and HUP as `Interrupted`, except inside `held_back()`, which raises it on leaving."""

    def __init__(self) -> None:
        self.holding = 0
        self.pending: int | None = None
        self.stopping = False

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            # A signal ignored from the start (nohup's HUP) stays ignored, as bash's traps leave it.
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._arrived)

    def _arrived(self, signum: int, _frame: FrameType | None) -> None:
        if self.holding or self.stopping:
            self.pending = self.pending or signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def held_back(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if not self.holding and not self.stopping and self.pending:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)

    def hold_for_good(self) -> None:
        """From now on (the stop itself) a stop signal changes nothing."""
        self.stopping = True


signals = StopSignals()


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # restarts in a row without a stable run; the exit after them is final
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_s: float = 60.0  # a run this long resets the back-off

    def after_exit(self, streak: int, ran_s: float) -> tuple[int, float] | None:
        """Given the restarts in a row so far and how long the run that ended lasted: the new count
        and the delay before the next start, or None to give up."""
        if ran_s >= self.stable_s:
            streak = 0
        if streak >= self.max_restarts:
            return None
        return streak + 1, min(self.first_delay_s * 2 ** min(streak, 30), self.max_delay_s)

    def why_given_up(self) -> str:
        if self.max_restarts == 0:
            return "restarts are off"
        times = "time" if self.max_restarts == 1 else "times"
        return f"restarted {self.max_restarts} {times} in a row, and no run lasted {self.stable_s:g} s"


@dataclass(eq=False)
class Service:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    confirm: Confirm | None = None  # asked after a restart, until it says yes
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    started_at: float = 0.0
    streak: int = 0  # restarts in a row without a stable run
    restart_at: float | None = None  # when a restart is due (monotonic), while it waits
    confirmed: bool = True
    note: str = ""  # why the supervisor killed it, for the exit's report


def describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def tail(path: Path, count: int) -> list[str]:
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 64 * 1024))
            return log.read().decode(errors="replace").splitlines()[-count:]
    except OSError as exc:
        return [f"(cannot read it: {exc.strerror})"]


def groups_with_members(pgids: set[int]) -> set[int]:
    """Those of the process groups that still have a process that is not a zombie."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) in pgids:
            found.add(int(fields[2]))
    return found


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Only while the leader is unreaped (returncode None): then the group's number is still ours."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)


class Supervisor:
    """The services, started by `start`, watched by `check` (call it often), stopped by `stop`."""

    def __init__(self, policy: RestartPolicy, say: Callable[[str], None], confirm_timeout_s: float = 60.0,
                 stop_grace_s: float = 10.0) -> None:
        self.policy = policy
        self.say = say
        self.confirm_timeout_s = confirm_timeout_s
        self.stop_grace_s = stop_grace_s
        self.services: list[Service] = []

    def start(self, service: Service) -> None:
        with signals.held_back():
            if service not in self.services:
                self.services.append(service)
            with open(service.log_path, "ab") as log:
                service.process = subprocess.Popen(service.argv, env=service.env, stdin=subprocess.DEVNULL,
                                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            service.started_at = time.monotonic()
            service.restart_at = None
            service.note = ""

    def check(self, restart: bool) -> None:
        """One look at every service: an exit is collected and, if `restart`, answered with a restart
        after the back-off (else, or when the policy gives up, Failed); due restarts are made and
        restarted services confirmed."""
        for service in self.services:
            if service.process is not None and self._exited(service.process):
                self._after_exit(service, restart)
            elif service.process is not None and not service.confirmed:
                self._confirm(service)
            elif service.restart_at is not None and time.monotonic() >= service.restart_at:
                self._restart(service)

    def stop(self, services: list[Service]) -> None:
        """TERM to each group, KILL to what is left after the grace time, then reap the leaders."""
        for service in services:
            service.restart_at = None
        running = [service for service in services if service.process is not None]
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for service in running:
                assert service.process is not None
                signal_group(service.process, signum)
            if self._await_empty(running, self.stop_grace_s):
                break
        for service in running:
            self._reap(service)

    # --- the steps -----------------------------------------------------------------------------------------------

    @staticmethod
    def _exited(process: subprocess.Popen[bytes]) -> bool:
        # WNOWAIT: the leader stays a zombie, so its group can still be cleared safely.
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def _after_exit(self, service: Service, restart: bool) -> None:
        ran_s = time.monotonic() - service.started_at
        assert service.process is not None
        signal_group(service.process, signal.SIGKILL)  # what the leader left behind (a server's children)
        self._await_empty([service], self.stop_grace_s)
        how = describe_exit(self._reap(service))
        phase = "while running" if restart else "during start-up"
        report = f"{service.name} exited ({phase}, {how}) after {ran_s:.1f} s"
        if service.note:
            report += f", killed because it {service.note}"
        decision = self.policy.after_exit(service.streak, ran_s) if restart else None
        if decision is None:
            if restart:
                report += f"; giving up on it: {self.policy.why_given_up()}"
            failure = Failed(report, service.log_path)
            self._log_to_service(service, report)
            raise failure
        service.streak, delay_s = decision
        service.restart_at = time.monotonic() + delay_s
        self._event(service, f"{report}; restarting it in {delay_s:g} s (attempt {service.streak} of "
                             f"{self.policy.max_restarts})")

    def _restart(self, service: Service) -> None:
        self.start(service)
        service.confirmed = service.confirm is None
        assert service.process is not None
        self._event(service, f"{service.name} restarted (attempt {service.streak} of {self.policy.max_restarts}),"
                             f" pid {service.process.pid}")

    def _confirm(self, service: Service) -> None:
        assert service.confirm is not None and service.process is not None
        confirmed, seen = service.confirm()
        if confirmed:
            service.confirmed = True
            self._event(service, f"{service.name} is back: {seen}")
        elif time.monotonic() - service.started_at > self.confirm_timeout_s:
            service.note = f"was not confirmed within {self.confirm_timeout_s:g} s ({seen})"
            signal_group(service.process, signal.SIGKILL)

    def _reap(self, service: Service) -> int:
        assert service.process is not None
        with signals.held_back():
            try:
                returncode = service.process.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:  # unkillable (stuck in the kernel): leave it, say so
                self.say(f"{service.name} (pid {service.process.pid}) does not go away; left as it is")
                returncode = -signal.SIGKILL
            service.process = None
        return returncode

    @staticmethod
    def _await_empty(services: list[Service], timeout_s: float) -> bool:
        pgids = {service.process.pid for service in services if service.process is not None}
        deadline = time.monotonic() + timeout_s
        while groups_with_members(pgids):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _event(self, service: Service, text: str) -> None:
        self.say(text)
        self._log_to_service(service, text)

    @staticmethod
    def _log_to_service(service: Service, text: str) -> None:
        """A line in the service's own log too, where its runs begin and end (it is not running)."""
        with contextlib.suppress(OSError), open(service.log_path, "a") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {text}\n")
