"""The dashboard and /metrics as their users meet them: a real Prometheus server scrapes both endpoints
of a running cluster, and headless Chromium loads the dashboard of a cluster that has done work
(its DOM, its console, a screenshot). Both are Debian packages that tests/run.sh installs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from conftest import PYTHON, REPO, SECRET, Endpoint, Services, drain, free_port, wait_for

PROMETHEUS = shutil.which("prometheus")
CHROMIUM = shutil.which("chromium")
SCREENSHOT = REPO / "docs" / "dashboard.png"


def scale_once(services: Services, node: Endpoint, index: int, peer: Endpoint, state: Path, secret: Path) -> None:
    """One real scaler run (local provider) for `node`: it launches local workers as the queue asks."""
    run = services.start(f"scaler-{node.node_id}", [
        PYTHON, "-m", "cron.scale", "--provider", "local", "--node-id", node.node_id, "--endpoint-index", str(index),
        "--url", node.url, "--peer", peer.url, "--endpoint", node.url, "--endpoint", peer.url,
        "--state-dir", str(state), "--secret-file", str(secret), "--scale-after", "0", "--max-workers", "2",
        "--idle-timeout", "30", "--log-level", "INFO"])
    assert run.process is not None and run.process.wait(60) == 0, run.log()


@pytest.fixture
def cluster(services: Services, tmp_path: Path):
    """Two endpoints whose scalers ran and whose workers did work (and leave none behind)."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    state = tmp_path / "state"
    a, b = services.endpoint_pair()
    try:
        yield a, b, state, secret
    finally:
        stop = services.start("terminate-all", [PYTHON, "-m", "cron.scale", "--provider", "local",
                                                "--terminate-all", "--state-dir", str(state)])
        assert stop.process is not None
        stop.process.wait(60)


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed (tests/run.sh does)")
def test_prometheus_scrapes_both_endpoints_and_sees_what_was_enqueued(services: Services, tmp_path: Path) -> None:
    a, b = services.endpoint_pair()
    for index in range(7):
        a.enqueue(b"for a %d" % index, 2)
    for index in range(5):
        b.enqueue(b"for b %d" % index, 2)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: dynamic-workload
    static_configs:
      - targets: ["{a.url.removeprefix('http://')}", "{b.url.removeprefix('http://')}"]
""")
    prometheus = services.start("prometheus", [
        PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def enqueued() -> dict[str, float] | None:
        if not prometheus.running():
            raise AssertionError(f"prometheus exited:\n{prometheus.log()}")
        try:
            answer = requests.get(api, params={"query": "dw_items_enqueued_total"}, timeout=5).json()
        except (requests.ConnectionError, ValueError):
            return None
        found = {result["metric"]["node"]: float(result["value"][1]) for result in answer["data"]["result"]}
        return found if len(found) == 2 else None

    assert wait_for(enqueued, 60, "Prometheus to scrape both endpoints") == {"a": 7.0, "b": 5.0}
    targets = requests.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    assert sorted(target["health"] for target in targets) == ["up", "up"], targets
    # A histogram Prometheus can compute with: the request durations of the enqueues it saw.
    answer = requests.get(api, params={"query": 'sum(dw_http_request_duration_seconds_count{route="/enqueue"})'},
                          timeout=5).json()
    assert float(answer["data"]["result"][0]["value"][1]) == 12


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium as root in a container: no sandbox, no GPU, nothing that calls home."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"})


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (tests/run.sh does)")
def test_chromium_shows_the_counts_and_charts_of_a_cluster_that_worked(cluster, services: Services,
                                                                        tmp_path: Path) -> None:
    a, b, state, secret = cluster
    ids = [a.enqueue(b"job %d" % index, 20_000) for index in range(6)] + \
          [b.enqueue(b"job %d" % index, 20_000) for index in range(4)]
    scale_once(services, a, 0, b, state, secret)
    scale_once(services, b, 1, a, state, secret)
    wait_for(lambda: a.stats()["completed"] + b.stats()["completed"] == len(ids), 90, "the workers to finish")
    drain([a, b], 3)  # some delivered, the rest waiting

    loaded = chromium(f"{a.url}/", tmp_path / "profile-dom", "--dump-dom")
    dom = loaded.stdout
    assert loaded.returncode == 0, loaded.stderr
    for node, completed in (("a", 6), ("b", 4)):
        section = dom.split(f'id="endpoint-{node}"')[1].split("</section>")[0]
        assert f'data-count="completed"><b>{completed}</b>' in section, section[:2000]
        assert section.count("<svg") == 6
        assert re.search(r"<rect [^>]*fill=\"#2b6cb0\"><title>enqueued: \d", section), \
            section[section.find("<svg"):][:2500]  # bars of the hour drawn
    assert dom.count("<tr class=\"run\">") == 2  # the scalers' decisions, one run each
    console = [line for line in loaded.stderr.splitlines() if "CONSOLE" in line or "Content Security Policy" in line]
    assert console == [], "\n".join(console)

    shot = tmp_path / "dashboard.png"
    taken = chromium(f"{a.url}/", tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1300,1560",
                     "--hide-scrollbars")
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DW_UPDATE_SCREENSHOT"):  # how docs/dashboard.png was made
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_the_page_reloads_itself_and_needs_no_script(services: Services) -> None:
    a = services.endpoint("a")
    page = requests.get(f"{a.url}/", timeout=10).text
    assert '<meta http-equiv="refresh" content="10">' in page
    assert "<script" not in page.lower()


def test_the_operator_key_is_printed_from_the_secret_file(tmp_path: Path) -> None:
    from endpoint.secret import operator_key

    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    printed = subprocess.run([PYTHON, "-m", "endpoint.operator_key", "--secret-file", str(secret)], cwd=REPO,
                             capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0 and printed.stdout.strip() == operator_key(SECRET)
    missing = subprocess.run([PYTHON, "-m", "endpoint.operator_key", "--secret-file", str(tmp_path / "none")],
                             cwd=REPO, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "cannot read the cluster secret" in missing.stderr
