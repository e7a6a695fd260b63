"""`./deploy.sh local` once its options are checked and its state directory is locked (deploy.sh
does both, then runs `python -m deploy.local` in its own place, so the lock and the PID stay).

Starts both endpoints, confirms that each answers /stats with the fresh instance id given to
this run, starts a scaler per endpoint and waits until each has recorded a decision. A service
that exits during that start-up stops the deployment at once. Afterwards each service is
supervised (deploy/supervise.py): restarted with a back-off when it exits, a restarted
endpoint on the same port and data file and confirmed by the same instance id, and given up
after --max-restarts restarts in a row that did not last; then everything stops with status 1.
Ctrl-C, SIGTERM or SIGHUP stop the scalers first, then the workers (through the local provider,
which keeps their records) while the endpoints still answer, then the endpoints.
Every start, exit, restart and stop is told on stderr and in <state>/log/deploy.log.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cli.tls import urlopen
from deploy.cluster_ca import LOOPBACK_NAMES, ensure_ca, issue, write_private
from deploy.supervise import Confirm, Failed, Interrupted, RestartPolicy, Service, Supervisor, signals

NODES = ("a", "b")
START_UP_TIMEOUT_S = 60.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description="Use ./deploy.sh local.")
    add = parser.add_argument
    add("--state-dir", required=True)
    add("--port-a", type=int, required=True)
    add("--port-b", type=int, required=True)
    # Passed on as given (the banner shows them so): deploy.sh has checked them.
    for name in ("--max-workers", "--idle-timeout", "--scale-after", "--every"):
        add(name, required=True)
    add("--max-restarts", type=int, default=RestartPolicy.max_restarts)
    add("--tls", action="store_true", help="HTTPS on every hop, with the cluster CA in <state-dir>/tls/")
    return parser.parse_args(argv)


class Output:
    """The banner on stdout; what happens on stderr and, with the time, in deploy.log. Output that
    is gone (a closed terminal or pipe) is skipped: supervising and stopping go on regardless."""

    def __init__(self, events_path: Path) -> None:
        self.events_path = events_path

    @staticmethod
    def write(fd: int, text: str) -> None:
        data = text.encode()
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            pass

    def show(self, text: str) -> None:
        self.write(1, text)

    def say(self, text: str) -> None:
        self.write(2, f"deploy.sh local: {text}\n")
        self.log(text)

    def log(self, text: str) -> None:
        try:
            with open(self.events_path, "a") as events:
                events.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        except OSError:
            pass


def stats_of(url: str, ca_file: str = "") -> dict | None:
    """An endpoint's /stats, or None while it does not answer with one."""
    try:
        with urlopen(f"{url}/stats", 2, ca_file) as response:
            stats = json.load(response)
    except (OSError, http.client.HTTPException, ValueError):  # refused, timed out, cut off, not JSON
        return None
    return stats if isinstance(stats, dict) else {}


def peer_urls_for_tests(scheme: str) -> dict[str, str] | None:
    """Test only (bench/soak.py): DW_TEST_PEER_URLS, the peer URL of A's endpoint and scaler, then B's, e.g.
    through proxies that can cut the link between the endpoints. Workers and clients reach them directly.
    `scheme` is what the endpoints speak (https with --tls)."""
    given = os.environ.get("DW_TEST_PEER_URLS", "")
    if not given:
        return None
    urls = given.split(",")
    if len(urls) != len(NODES) or not all(url.startswith(f"{scheme}://") for url in urls):
        raise SystemExit(f"deploy.sh local: DW_TEST_PEER_URLS must be two {scheme}:// URLs, A's peer then B's, "
                         f"comma-separated, not {given!r}")
    return dict(zip(NODES, urls, strict=True))


class LocalDeployment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state = Path(args.state_dir)
        self.tls = LocalTls(self.state / "tls") if args.tls else None
        scheme = "https" if self.tls else "http"
        self.urls = {"a": f"{scheme}://127.0.0.1:{args.port_a}", "b": f"{scheme}://127.0.0.1:{args.port_b}"}
        # How each node's endpoint and scaler reach the other endpoint.
        self.peer_urls = peer_urls_for_tests(scheme) or {"a": self.urls["b"], "b": self.urls["a"]}
        # A fresh id for this run's endpoints, which they report in /stats: whatever answers on
        # our ports with another id (or none) is not ours. Restarts keep it.
        self.instance_id = secrets.token_hex(8)
        self.output = Output(self.state / "log" / "deploy.log")
        self.supervisor = Supervisor(RestartPolicy(max_restarts=args.max_restarts), self.output.say)
        env = {**os.environ, "DW_SECRET_FILE": str(self.state / "secret")}
        self.endpoints = [Service(f"endpoint-{node}", self._endpoint_command(node), self._log(f"endpoint-{node}"),
                                  env, confirm=self._confirmer(node)) for node in NODES]
        self.scalers = [Service(f"scaler-{node}", self._scaler_command(node), self._log(f"scaler-{node}"), env)
                        for node in NODES]

    @property
    def _ca_file(self) -> str:
        return str(self.tls.ca) if self.tls else ""

    def _log(self, name: str) -> Path:
        return self.state / "log" / f"{name}.log"

    def _peer(self, node: str) -> str:
        return self.peer_urls[node]

    def _endpoint_command(self, node: str) -> list[str]:
        port = self.args.port_a if node == "a" else self.args.port_b
        tls = self.tls.endpoint_args(node) if self.tls else []
        return [sys.executable, "-m", "endpoint", "--node-id", node, "--port", str(port), "--peer", self._peer(node),
                "--db", str(self.state / f"{node}.sqlite3"), "--instance-id", self.instance_id, *tls]

    def _scaler_command(self, node: str) -> list[str]:
        # One scaler per endpoint, as on EC2 (there: a cron entry on each endpoint host).
        args = self.args
        return [sys.executable, "-m", "cron.scale", "--every", args.every, "--node-id", node,
                "--endpoint-index", str(NODES.index(node)), "--url", self.urls[node], "--peer", self._peer(node),
                "--endpoint", self.urls["a"], "--endpoint", self.urls["b"], "--provider", "local",
                "--state-dir", str(self.state), "--max-workers", args.max_workers,
                "--idle-timeout", args.idle_timeout, "--scale-after", args.scale_after,
                *(["--tls-ca", str(self.tls.ca)] if self.tls else [])]

    def _confirmer(self, node: str) -> Confirm:
        url = self.urls[node]

        def confirm() -> tuple[bool, str]:
            stats = stats_of(url, self._ca_file)
            if stats is None:
                return False, f"no answer at {url}/stats"
            if stats.get("instance_id") != self.instance_id:
                return False, f"something else answers at {url}/stats (instance id {stats.get('instance_id')!r})"
            return True, f"{url}/stats reports this run's instance id"
        return confirm

    # --- a run ------------------------------------------------------------------------------------------------------

    def run(self) -> int:
        if self.tls:
            self.tls.prepare(self.output.say)
        signals.install()
        status = 1
        try:
            status = self._serve()
        except Interrupted as stop:
            status = stop.status
            self.output.log(f"{stop} received")
        finally:
            signals.hold_for_good()
            self._stop()
        return status

    def _serve(self) -> int:
        """Start, then supervise until a service is given up (1); a stop signal raises Interrupted."""
        try:
            self._start_up()
            self._banner()
            while True:
                self.supervisor.check(restart=True)
                time.sleep(0.2)
        except Failed as failure:
            self.output.say(failure.report().rstrip("\n"))
            return 1

    def _start_up(self) -> None:
        for service in self.endpoints:
            self._start(service)
        self._await("endpoints", lambda stats: True)
        scalers_started = time.time()
        for service in self.scalers:
            self._start(service)

        def has_run(stats: dict) -> bool:
            # Ready once it has recorded a decision in its endpoint's file (which /stats shows).
            ago = (stats.get("scaler") or {}).get("last_run_s_ago")
            return isinstance(ago, int | float) and time.time() - ago >= scalers_started - 0.2
        self._await("scalers", has_run)
        self.output.log(f"running: endpoints {self.urls['a']} and {self.urls['b']}, instance id {self.instance_id}")

    def _start(self, service: Service) -> None:
        self.supervisor.start(service)
        assert service.process is not None
        self.output.log(f"started {service.name}, pid {service.process.pid}: {' '.join(service.argv)}")

    def _await(self, what: str, ready: Callable[[dict], bool]) -> None:
        """Until both endpoints answer /stats with this run's id and `ready` says yes; Failed at once if
        a service exits or something else answers, and after a minute anyway."""
        deadline = time.monotonic() + START_UP_TIMEOUT_S
        for node in NODES:
            url = self.urls[node]
            while True:
                self.supervisor.check(restart=False)
                stats = stats_of(url, self._ca_file)
                if stats is not None and stats.get("instance_id") != self.instance_id:
                    raise Failed(f"something else answers on {url}, not the endpoint this run started")
                if stats is not None and ready(stats):
                    break
                if time.monotonic() > deadline:
                    raise Failed(f"the {what} did not come up within {START_UP_TIMEOUT_S:g} s at {url}; "
                                 f"see {self.state}/log/")
                time.sleep(0.1)

    def _banner(self) -> None:
        args, urls, state = self.args, self.urls, self.state
        wait = int(float(args.scale_after) + 3.999)
        curl = f"curl --cacert {self.tls.ca}" if self.tls else "curl"
        tls = (f"  TLS         every hop: the endpoints' certificates are signed by the cluster CA {self.tls.ca}\n"
               f"              (its key {self.tls.ca_key} never leaves this machine); no plain HTTP on the ports\n"
               if self.tls else "")
        restarts = (f"restarted when they exit (at most {args.max_restarts} times in a row; "
                    f"see {state}/log/deploy.log)" if args.max_restarts else "not restarted (--max-restarts 0)")
        self.output.show(f"""\
dynamic-workload is running locally:
  endpoint A  {urls['a']}   (data: {state}/a.sqlite3, log: {state}/log/endpoint-a.log)
  endpoint B  {urls['b']}   (data: {state}/b.sqlite3, log: {state}/log/endpoint-b.log)
  scalers     up to {args.max_workers} worker(s), launched as work arrives (more once it waits {args.scale_after}s),
              each exiting after {args.idle_timeout}s idle (logs: {state}/log/scaler-*.log, worker-*.log)
  services    {restarts}
  dashboard   {urls['a']}/   {urls['b']}/   (both endpoints on each; worker ids, errors and failed items at /details)
  metrics     {urls['a']}/metrics   {urls['b']}/metrics   (Prometheus text format)
{tls}
The dashboard's /details asks for a login: any user name, and the operator key as the password, which
  .venv/bin/python -m endpoint.operator_key --secret-file {state}/secret
prints (it is derived from the cluster secret; keep it as you keep that file).

Try it:
  {curl} -X PUT "{urls['a']}/enqueue?iterations=10" -d "data=Hello"
  {curl} -X PUT "{urls['b']}/enqueue?iterations=3" -F "data=@README.md"
  sleep {wait}
  {curl} -X POST "{urls['a']}/pullCompleted?top=5"
  {curl} "{urls['b']}/stats"

Ctrl-C stops everything.
""")

    def _stop(self) -> None:
        """Scalers first (no more launches), then the workers while the endpoints still answer, so that
        they give their jobs back; the endpoints last. A second signal meanwhile changes nothing."""
        self.output.show("\nstopping...\n")
        self.output.log("stopping: the scalers, then the workers, then the endpoints")
        self.supervisor.stop(self.scalers)
        self._stop_workers()
        self.supervisor.stop(self.endpoints)
        self.output.log("stopped")
        self.output.show("stopped.\n")

    def _stop_workers(self) -> None:
        # Workers run in sessions of their own (they outlive one-shot scaler runs): they are stopped
        # through the provider, with none of the caller's DW_* settings, which are the services' business.
        command = [sys.executable, "-m", "cron.scale", "--provider", "local", "--state-dir", str(self.state),
                   "--terminate-all", "--log-level", "WARNING"]
        try:
            subprocess.run(command, env={"PATH": os.environ.get("PATH", "")}, stdin=subprocess.DEVNULL,
                           start_new_session=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.output.say(f"stopping the workers failed ({exc}); see {self.state}/workers/")


class LocalTls:
    """The cluster CA (made once) and fresh certificates for both endpoints at each start, all in one folder.

    Both endpoints listen on 127.0.0.1, so their certificates name the loopback addresses."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = folder / "ca.pem"
        self.ca_key = folder / "ca-key.pem"

    def prepare(self, say: Callable[[str], None]) -> None:
        try:
            ca, made = ensure_ca(self.ca, self.ca_key, "local")
        except ValueError as exc:
            raise SystemExit(f"deploy.sh local: {exc}") from None
        if made:
            say(f"cluster CA created: {self.ca} (its key {self.ca_key}, mode 0600)")
        for node in NODES:
            pem = issue(ca, LOOPBACK_NAMES)
            write_private(self.folder / f"{node}.pem", pem.certificate)
            write_private(self.folder / f"{node}-key.pem", pem.key)

    def endpoint_args(self, node: str) -> list[str]:
        return ["--tls-cert", str(self.folder / f"{node}.pem"), "--tls-key", str(self.folder / f"{node}-key.pem"),
                "--tls-ca", str(self.ca)]


def main(argv: list[str] | None = None) -> int:
    return LocalDeployment(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
