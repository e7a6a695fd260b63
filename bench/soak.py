"""A chaos soak of the local cluster, with a history check.

Runs a real `./deploy.sh local` (its own state directory and free ports; its endpoints' peer URLs
through link proxies that the soak controls, and as root each endpoint's data file on a tmpfs of its
own) for --minutes under a steady mixed load: enqueues in the four client forms of the prior art,
by curl and by a Python client, jobs from 1 iteration to several seconds, pullCompleted at both
endpoints at once, with and without delivery tokens. Meanwhile it injects faults at random moments
(bench/soak_faults.py): worker supervisors and single slots SIGKILLed, an endpoint's process group
SIGKILLed, an endpoint SIGSTOPped past the lease, a scaler SIGKILLed while it runs, the link between
the endpoints cut, an endpoint's disk filled. Then it stops the faults and the enqueues, pulls until
everything acknowledged is back (or nothing is left to pull), stops the deployment with Ctrl-C,
checks that no process of it is left, reads both data files and checks the history
(bench/soak_check.py). It prints a table and exits with status 1 if anything was lost, duplicated,
wrong or left behind, or a process was left running.

    usage: .venv/bin/python -m bench.soak [--minutes 10] [--seed N] [options: --help]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

from bench.soak_check import SIZE_CLASSES, Check, Report, Row, read_rows
from bench.soak_cluster import NODES, Cluster, load_average
from bench.soak_faults import KINDS, Faults
from bench.soak_load import SHORT_ITERATIONS, History, Load, send
from endpoint.config import OPTIONS as ENDPOINT_OPTIONS

DEFAULT_MAX_ATTEMPTS = int(ENDPOINT_OPTIONS["max_attempts"].default)
MAX_ITERATIONS = int(ENDPOINT_OPTIONS["max_iterations"].default)  # what the endpoints accept


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="load and faults for this long (default 10)")
    add("--rate", type=float, default=3.0, help="enqueues per second, both endpoints together (default 3)")
    add("--curl-share", type=float, default=0.25, help="share of requests sent by curl itself (default 0.25)")
    add("--max-iterations", type=int, default=16_000_000,
        help="the longest jobs (default 16,000,000: several seconds with the native kernel)")
    add("--lease-seconds", type=float, default=10.0, help="the endpoints' lease, DW_LEASE_SECONDS (default 10)")
    add("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
        help=f"the endpoints' DW_MAX_ATTEMPTS (default {DEFAULT_MAX_ATTEMPTS}, the endpoint's own: the soak's faults "
             "cost attempts only where a lease could not be given back, see the README)")
    add("--fault-gap", type=float, default=20.0, help="mean seconds between cluster faults (default 20)")
    add("--fault-hold", type=float, default=15.0, help="mean seconds a link cut or a full disk lasts (default 15)")
    add("--worker-fault-gap", type=float, default=15.0, help="mean seconds between worker kills (default 15)")
    add("--max-workers", type=int, default=2, help="./deploy.sh local --max-workers (default 2)")
    add("--every", type=float, default=1.0, help="./deploy.sh local --every: seconds between scaler decisions")
    add("--disk-mib", type=int, default=128, help="size of each endpoint's tmpfs (default 128)")
    add("--drain-timeout", type=float, default=300.0, help="most seconds to wait for the last results")
    add("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    add("--summary", type=Path, default=None, help="also write the figures as JSON to this file")
    add("--keep", action="store_true", help="keep the soak's directory (logs, data files) afterwards")
    args = parser.parse_args(argv)
    problem = bad_option(args)
    if problem:
        parser.error(problem)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    return args


def bad_option(args: argparse.Namespace) -> str:
    """What is wrong with the options, or ''."""
    positive = ("minutes", "rate", "lease_seconds", "max_attempts", "fault_gap", "fault_hold", "worker_fault_gap",
                "max_workers", "every", "drain_timeout")
    for name in positive:
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be more than 0, not {getattr(args, name)}"
    if not 0 <= args.curl_share <= 1:
        return f"--curl-share must be between 0 and 1, not {args.curl_share}"
    if not SHORT_ITERATIONS < args.max_iterations <= MAX_ITERATIONS:
        return f"--max-iterations must be {SHORT_ITERATIONS + 1:,} to {MAX_ITERATIONS:,}, not {args.max_iterations:,}"
    if args.disk_mib < 16:
        return f"--disk-mib must be at least 16 (the data files and their WAL), not {args.disk_mib}"
    return ""


class Progress:
    """A line on stderr now and then, and the machine's load over the run."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.loads: list[float] = [load_average()]

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f} s] {text}", file=sys.stderr, flush=True)

    def sample(self) -> None:
        self.loads.append(load_average())


def run_load(args: argparse.Namespace, cluster: Cluster, history: History, load: Load, faults: Faults,
             progress: Progress) -> None:
    end = time.monotonic() + args.minutes * 60
    next_line = 0.0
    while time.monotonic() < end:
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
        progress.sample()
        if time.monotonic() >= next_line:
            next_line = time.monotonic() + 30
            stats = [cluster.stats(node, timeout=2) or {} for node in NODES]
            progress.say(f"acknowledged {len(history.acknowledged())}, results received {len(history.received)}, "
                         f"pending {sum(s.get('pending', 0) for s in stats)}, running "
                         f"{sum(s.get('running', 0) for s in stats)}, workers {len(cluster.workers())}, faults "
                         f"{len(faults.injected)}, load {progress.loads[-1]:.1f}")
        if not cluster.deploy_running():
            raise RuntimeError(f"./deploy.sh local ended:\n{cluster.deploy_log.read_text(errors='replace')[-4000:]}")


def drain(cluster: Cluster, history: History, timeout_s: float, progress: Progress) -> str:
    """Pull until every acknowledged result is back, or nothing is pending, running or undelivered for a few
    seconds, or the timeout."""
    started = time.monotonic()
    quiet = 0
    while time.monotonic() - started < timeout_s:
        missing = {job.work_id for job in history.acknowledged()} - history.received_ids()
        if not missing:
            return f"every acknowledged result received {time.monotonic() - started:.0f} s after the load stopped"
        stats = [cluster.stats(node, timeout=3) for node in NODES]
        left = sum(s["pending"] + s["running"] + s["undelivered"] for s in stats) if all(stats) else -1
        quiet = quiet + 1 if left == 0 else 0
        if quiet >= 5:
            return (f"nothing pending, running or undelivered {time.monotonic() - started:.0f} s after the load "
                    f"stopped; {len(missing)} acknowledged result(s) never received")
        progress.sample()
        time.sleep(1)
    return f"drain timed out after {timeout_s:.0f} s"


def read_back(cluster: Cluster, history: History) -> dict[str, tuple[str, str | None]]:
    """GET /work/<id> for every acknowledged item no pull handed out."""
    readable = {}
    for work_id in sorted({job.work_id for job in history.acknowledged()} - history.received_ids()):
        assert work_id is not None
        node = work_id.split("-", 1)[0] if work_id[:1] in NODES else "a"
        answer = send(cluster.urls[node], "GET", f"/work/{work_id}")
        document = answer.json()
        if answer.status == 200 and isinstance(document, dict):
            readable[work_id] = (str(document.get("state")), document.get("result"))
        else:
            readable[work_id] = (answer.label(), None)
    return readable


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def wait_lines(report: Report) -> list[str]:
    """How long clients waited: for an enqueue's acknowledgement, and for the result."""
    lines = [f"{'what clients waited for, s':58} {'jobs':>6} {'p50':>7} {'p95':>7} {'max':>7}"]
    rows = [("an enqueue's 200 (from its first send, repeats included)", report.enqueue_waits),
            ("the result (from the 200 to pullCompleted), all jobs", report.latencies.get("all", []))]
    rows += [(f"  {name}", report.latencies.get(name, [])) for name in SIZE_CLASSES]
    for name, values in rows:
        if values:
            lines.append(f"  {name:56} {len(values):6d} {percentile(values, 0.5):7.1f} "
                         f"{percentile(values, 0.95):7.1f} {max(values):7.1f}")
    return lines


def attempts_used(attempts: Counter[int]) -> str:
    over = sum(jobs for used, jobs in attempts.items() if used > DEFAULT_MAX_ATTEMPTS)
    return (", ".join(f"{used} -> {jobs}" for used, jobs in sorted(attempts.items()))
            + f"; more than the default limit ({DEFAULT_MAX_ATTEMPTS}): {over}")


def table(args: argparse.Namespace, report: Report, history: History, faults: Faults, drained: str,
          left: list[str], cleanup: list[str], progress: Progress, deploy_status: int | None) -> list[str]:
    lines = [f"soak: {args.minutes:g} min of load and faults (seed {args.seed}, lease {args.lease_seconds:g} s, "
             f"max attempts {args.max_attempts}, "
             f"{args.rate:g} enqueues/s, {args.curl_share:.0%} by curl, jobs of 1 to {args.max_iterations:,} "
             f"iterations); machine load {min(progress.loads):.1f}-{max(progress.loads):.1f} on "
             f"{os.cpu_count()} cores", f"drain: {drained}", "",
             f"{'faults injected':58} {'count':>6}  seconds held"]
    counts = Counter(fault.kind for fault in faults.injected)
    for kind, text in KINDS.items():
        held = sum(fault.held_s for fault in faults.injected if fault.kind == kind)
        why = f"  not injected: {faults.unavailable[kind]}" if kind in faults.unavailable else ""
        lines.append(f"  {text:56} {counts[kind]:6d}  {held:7.0f}{why}")
    for skip, times in sorted(faults.skipped.items()):
        lines.append(f"  (skipped {times}x: {skip})")
    readable = "all readable at /work/<id>" if not report.window_unreadable else \
        f"{len(report.window_unreadable)} NOT readable at /work/<id>"
    unknown_note = f"{report.unknown_stored} stored, {report.unknown - report.unknown_stored} not"
    lines += ["", "jobs",
              f"  {'enqueues acknowledged':56} {report.acknowledged:6d}  "
              + ", ".join(f"{form} {count}" for form, count in sorted(report.by_form.items())),
              f"    {'completed with the reference result':54} {report.completed_right:6d}",
              f"    {'lost':54} {len(report.lost):6d}",
              f"    {'duplicated (handed out more than once)':54} {len(report.duplicated):6d}",
              f"    {'wrong':54} {len(report.wrong):6d}",
              f"    {'delivered, never received (at-most-once window)':54} {len(report.window):6d}  "
              f"{readable if report.window else ''}; pulls without a token whose answer was lost: "
              f"{history.lost_pull_answers}",
              f"  {'enqueues refused (4xx, 503/507, no connection)':56} {report.refused:6d}  "
              f"left something behind: {len(report.left_behind)}",
              f"  {'enqueues with an unknown outcome (504, no answer; no key)':56} {report.unknown:6d}  {unknown_note}",
              f"  {'results handed out by pullCompleted':56} {report.received:6d}  in {history.pulls} answered "
              f"pulls; unaccounted for: {len(report.unexpected)}",
              f"  {'attempts a completed job used -> jobs':56} {'':6}  {attempts_used(report.attempts)}", "",
              *wait_lines(report)]
    lines += ["", f"{'errors clients saw':58} {'count':>6}"]
    for (operation, label), count in sorted(history.errors.items()):
        lines.append(f"  {operation + ': ' + label:56} {count:6d}")
    if not history.errors:
        lines.append("  none")
    lines += ["", f"deploy.sh local exit status after Ctrl-C: {deploy_status}",
              f"processes left running: {len(left)}" + "".join(f"\n  {line}" for line in left)]
    lines += [f"clean-up: {problem}" for problem in cleanup]
    for name, found in (("LOST", report.lost), ("DUPLICATED", report.duplicated), ("WRONG", report.wrong),
                        ("UNACCOUNTED", report.unexpected), ("LEFT BEHIND", report.left_behind),
                        ("NOT READABLE", report.window_unreadable), ("at-most-once window", report.window)):
        lines += [f"{name}: {line}" for line in found[:20]] + ([f"{name}: ... {len(found) - 20} more"]
                                                                if len(found) > 20 else [])
    return lines


def summary(report: Report, history: History, faults: Faults, left: list[str], deploy_status: int | None) -> dict:
    return {"faults": dict(Counter(fault.kind for fault in faults.injected)), "unavailable": faults.unavailable,
            "acknowledged": report.acknowledged, "completed_right": report.completed_right,
            "lost": report.lost, "duplicated": report.duplicated, "wrong": report.wrong,
            "window": report.window, "window_unreadable": report.window_unreadable,
            "unexpected": report.unexpected, "left_behind": report.left_behind, "refused": report.refused,
            "unknown": report.unknown, "unknown_stored": report.unknown_stored, "received": report.received,
            "errors": {f"{operation}: {label}": count for (operation, label), count in history.errors.items()},
            "processes_left": left, "failed": report.failed or bool(left), "deploy_status": deploy_status,
            "attempts": {str(used): jobs for used, jobs in sorted(report.attempts.items())},
            "enqueue_wait": {"jobs": len(report.enqueue_waits), "p50": percentile(report.enqueue_waits, 0.5),
                             "p95": percentile(report.enqueue_waits, 0.95), "max": max(report.enqueue_waits)}
            if report.enqueue_waits else {},
            "latency": {name: {"jobs": len(values), "p50": percentile(values, 0.5), "p95": percentile(values, 0.95),
                               "max": max(values)} for name, values in report.latencies.items() if values}}


def read_data_files(cluster: Cluster, copies: Path) -> dict[str, Row]:
    """Both endpoints' rows; the files are copied out first (they may live on a tmpfs that goes)."""
    rows: dict[str, Row] = {}
    copies.mkdir(exist_ok=True)
    for node in NODES:
        db = cluster.state / f"{node}.sqlite3"
        if db.exists():
            for suffix in ("", "-wal"):
                source = db.resolve().with_name(db.name + suffix)
                if source.exists():
                    shutil.copyfile(source, copies / source.name)
            rows.update(read_rows(copies / db.name, node))
    return rows


def terminate_as_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminate_as_interrupt)
    # Started in the background by a shell (`... &`), the soak inherits SIGINT ignored, and so would
    # ./deploy.sh local, which then could not be stopped with its Ctrl-C at the end. A handler of our
    # own is reset to the default in every program the soak starts.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root = Path(tempfile.mkdtemp(prefix="dw-soak-"))
    progress = Progress()
    rng = random.Random(args.seed)
    cluster = Cluster(root, lease_s=args.lease_seconds, max_attempts=args.max_attempts, max_workers=args.max_workers,
                      disk_bytes=args.disk_mib * 2**20, every_s=args.every, say=progress.say)
    history = History()
    load = Load(cluster.urls, history, rng, root / "curl", rate=args.rate, curl_share=args.curl_share,
                max_iterations=args.max_iterations)
    faults = Faults(cluster, random.Random(rng.random()), gap_s=args.fault_gap, hold_s=args.fault_hold,
                    worker_gap_s=args.worker_fault_gap, say=progress.say, large_uploads=load.large_uploads)
    progress.say(f"soak in {root}, seed {args.seed}; " + (f"disk-full faults skipped: {cluster.no_disks_reason}"
                                                           if cluster.no_disks_reason else "data files on tmpfs"))
    rows: dict[str, Row] = {}
    readable: dict[str, tuple[str, str | None]] = {}
    drained = "not reached"
    interrupted = False
    try:
        cluster.start()
        if cluster.no_disks_reason:
            faults.unavailable["disk_full"] = cluster.no_disks_reason
        progress.say(f"deploy.sh local runs: {cluster.urls['a']}, {cluster.urls['b']}")
        load.start()
        faults.start()
        run_load(args, cluster, history, load, faults, progress)
        progress.say("faults stop; enqueues stop; pulling the rest")
        faults.stop()
        load.stop_enqueues()
        drained = drain(cluster, history, args.drain_timeout, progress)
        progress.say(drained)
        readable = read_back(cluster, history)
        load.stop_pulls()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if faults.threads[0].ident is not None:
            faults.stop()
        load.abandon()  # a no-op after a run that ended as it should
        deploy_status, left = cluster.stop()
        rows = read_data_files(cluster, root / "data")
        cleanup = cluster.close()
        threading.Thread(target=load.pool.shutdown, daemon=True).start()
    if interrupted:
        print(f"soak interrupted; cleaned up; its files: {root}", file=sys.stderr)
        return 130
    report = Check(history, load.shared_payload, rows, readable).run()
    print("\n".join(table(args, report, history, faults, drained, left, cleanup, progress, deploy_status)))
    if args.summary:
        args.summary.write_text(json.dumps(summary(report, history, faults, left, deploy_status), indent=1))
    failed = report.failed or bool(left)
    if args.keep or failed:
        print(f"the soak's files (logs, data files): {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    print("verdict: " + ("FAILED (see above)" if failed else "OK: nothing lost, duplicated, wrong or left behind"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
