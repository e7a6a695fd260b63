"""HTTPS on every hop: clients, workers and the peer over TLS, checked against the cluster CA.

Real endpoints with certificates from deploy/cluster_ca.py, a real worker, real TLS on loopback.
A client, worker or peer that does not trust the CA, or reaches the endpoint under a name its
certificate does not carry, is refused; plain HTTP gets no data.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import PEER_AUTH, PYTHON, REPO, SECRET, WORKER_AUTH, Services, drain, free_port, reference, wait_for
from cron.scale import fetch_stats
from deploy.cluster_ca import ensure_ca, issue, write_private
from endpoint.secret import scaler_key


class Cluster:
    """A CA in a folder, and certificates it issues for the names given."""

    def __init__(self, folder: Path, label: str = "test") -> None:
        self.folder = folder
        self.ca_file = folder / "ca.pem"
        self.ca, _ = ensure_ca(self.ca_file, folder / "ca-key.pem", label)

    def endpoint_args(self, node: str, *names: str) -> tuple[str, ...]:
        pem = issue(self.ca, names or ("127.0.0.1",))
        cert, key = self.folder / f"{node}.pem", self.folder / f"{node}-key.pem"
        write_private(cert, pem.certificate)
        write_private(key, pem.key)
        return "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(self.ca_file)


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path / "tls")


@pytest.fixture
def stranger(tmp_path: Path) -> Cluster:
    """Another CA: what a client that does not trust the cluster's CA trusts instead."""
    return Cluster(tmp_path / "other-tls", "other")


def tls_pair(services: Services, cluster: Cluster, peer_ca: str = ""):
    ca = str(cluster.ca_file)
    tls = {node: (*cluster.endpoint_args(node), *(("--tls-ca", peer_ca) if peer_ca else ())) for node in "ab"}
    return services.endpoint_pair(tls=tls, ca_file=ca)


def test_clients_workers_and_the_peer_all_over_tls(services: Services, cluster: Cluster) -> None:
    a, b = tls_pair(services, cluster)
    assert a.url.startswith("https://") and b.url.startswith("https://")
    expected = {}
    for index in range(20):
        payload = f"tls job {index}".encode()
        expected[(a if index % 2 else b).enqueue(payload, 500 + index)] = reference(payload, 500 + index)
    services.worker([a, b], extra_args=("--tls-ca", str(cluster.ca_file)))
    # Everything from endpoint a: b's results come through the peer, over TLS.
    results = drain([a], len(expected))
    assert {item["id"]: item["result"] for item in results} == expected
    assert len(results) == len(expected)
    b_id = next(work_id for work_id in expected if work_id.startswith("b-"))
    answer = a.work(b_id, public=True)  # the peer's item, looked up through the peer
    assert answer.status_code == 200 and answer.json()["result"] == expected[b_id]
    # The scaler's call, with the scaler key, verified against the CA.
    stats = fetch_stats(a.url, scaler_key(SECRET), ca_file=str(cluster.ca_file))
    assert stats is not None and stats["completed"] == 10 and stats["workers"]


def test_plain_http_on_a_tls_port_gets_no_data(services: Services, cluster: Cluster) -> None:
    a = services.endpoint("a", extra_args=cluster.endpoint_args("a"), ca_file=str(cluster.ca_file))
    work_id = a.enqueue(b"secret payload", 3)
    for request in (f"GET /work/{work_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                    b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"POST /pullCompleted?top=5 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", a.port), timeout=10) as sock:
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert b"HTTP/" not in received and work_id.encode() not in received and b"{" not in received
        assert received[:1] in (b"", b"\x15"), received  # nothing, or a TLS alert record
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{a.port}/stats", timeout=10)
    assert a.work(work_id, public=True).json()["state"] == "pending"  # nothing was taken


def test_a_client_that_does_not_trust_the_ca_is_refused(services: Services, cluster: Cluster,
                                                        stranger: Cluster) -> None:
    a = services.endpoint("a", extra_args=cluster.endpoint_args("a"), ca_file=str(cluster.ca_file))
    for verify in (str(stranger.ca_file), True):  # another CA; the system's CAs
        with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            requests.put(f"{a.url}/enqueue?iterations=1", data=b"x", timeout=10, verify=verify)
    curl = subprocess.run(["curl", "-sS", "--cacert", str(stranger.ca_file), f"{a.url}/stats"],
                          capture_output=True, text=True, timeout=30)
    assert curl.returncode == 60 and curl.stdout == "", curl
    ok = subprocess.run(["curl", "-sS", "--cacert", str(cluster.ca_file), f"{a.url}/stats"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and '"pending": 0' in ok.stdout
    assert a.stats(public=True)["pending"] == 0


def test_a_worker_that_does_not_trust_the_ca_gets_no_work(services: Services, cluster: Cluster,
                                                          stranger: Cluster) -> None:
    a = services.endpoint("a", extra_args=cluster.endpoint_args("a"), ca_file=str(cluster.ca_file))
    work_id = a.enqueue(b"job", 5)
    worker = services.worker([a], worker_id="doubter", extra_args=("--tls-ca", str(stranger.ca_file)))
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in worker.log(), 20, "the worker to log the refused certificate")
    time.sleep(1)
    assert a.work(work_id).json()["state"] == "pending"
    assert a.stats()["workers_heard_from"] == 0
    # The same worker that trusts the CA does the job.
    services.worker([a], worker_id="truster", extra_args=("--tls-ca", str(cluster.ca_file)))
    assert drain([a], 1) == [{"id": work_id, "result": reference(b"job", 5)}]


def test_a_peer_that_does_not_trust_the_ca_gets_nothing_from_it(services: Services, cluster: Cluster,
                                                                stranger: Cluster) -> None:
    a, b = tls_pair(services, cluster, peer_ca=str(stranger.ca_file))
    b_id = b.enqueue(b"b's job", 3)
    services.worker([b], extra_args=("--tls-ca", str(cluster.ca_file)))
    wait_for(lambda: b.work(b_id).json()["state"] == "completed", 30, "b's job")
    assert a.pull(10) == []  # a cannot reach b's results: b's certificate is not trusted there
    assert a.work(b_id, public=True).status_code == 503
    assert b.pull(10) == [{"id": b_id, "result": reference(b"b's job", 3)}]  # nothing was lost


def test_a_wrong_host_name_is_refused(services: Services, cluster: Cluster) -> None:
    """The endpoint listens on 127.0.0.2 with a certificate for 127.0.0.1 (and loopback names): every
    client reaching it as 127.0.0.2 refuses it -- requests, curl, the worker, the scaler and the peer."""
    ca = str(cluster.ca_file)
    port = free_port("127.0.0.2")
    wrong = services.endpoint("b", port, extra_args=cluster.endpoint_args("b", "127.0.0.1"), host="127.0.0.2",
                              ca_file=ca)
    with pytest.raises(requests.exceptions.SSLError, match="match|mismatch"):
        requests.get(f"{wrong.url}/stats", timeout=10, verify=ca)
    curl = subprocess.run(["curl", "-sS", "--cacert", ca, f"{wrong.url}/stats"], capture_output=True, text=True,
                          timeout=30)
    assert curl.returncode == 60 and curl.stdout == "", curl
    assert fetch_stats(wrong.url, scaler_key(SECRET), ca_file=ca) is None
    # Under its right name (connected to 127.0.0.2 all the same) the certificate is fine: this is the name alone.
    enqueued = subprocess.run(["curl", "-sS", "--cacert", ca, "--connect-to", f"127.0.0.1:{port}:127.0.0.2:{port}",
                               "-X", "PUT", f"https://127.0.0.1:{port}/enqueue?iterations=2", "-d", "data=x"],
                              capture_output=True, text=True, timeout=30)
    assert enqueued.returncode == 0, enqueued
    work_id = json.loads(enqueued.stdout)["id"]
    worker = services.worker([wrong], extra_args=("--tls-ca", ca))
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in worker.log(), 20, "the worker to refuse the host name")
    assert "IP address mismatch" in worker.log()
    # A peer that reaches b under that wrong name gets nothing from it.
    a = services.endpoint("a", peer_url=wrong.url, extra_args=cluster.endpoint_args("a"), ca_file=ca)
    assert a.pull(10) == []
    assert a.work(work_id, public=True).status_code == 503


def test_the_internal_routes_over_tls_still_need_their_keys(services: Services, cluster: Cluster) -> None:
    a = services.endpoint("a", extra_args=cluster.endpoint_args("a"), ca_file=str(cluster.ca_file))
    claim = {"worker": "w", "claim": "c1"}
    ca = str(cluster.ca_file)
    assert requests.post(f"{a.url}/internal/claims", json=claim, timeout=10, verify=ca).status_code == 401
    assert requests.post(f"{a.url}/internal/claims", json=claim, timeout=10, verify=ca,
                         headers=PEER_AUTH).status_code == 403
    assert requests.post(f"{a.url}/internal/claims", json=claim, timeout=10, verify=ca,
                         headers=WORKER_AUTH).status_code == 200


BAD_TLS = [
    (("--tls-cert", "{cert}"), "tls_cert and tls_key go together"),
    (("--tls-key", "{key}"), "tls_cert and tls_key go together"),
    (("--tls-cert", "{cert}", "--tls-key", "{other_key}"), "is unusable"),
    (("--tls-cert", "{missing}", "--tls-key", "{key}"), "is unusable"),
    (("--tls-cert", "{cert}", "--tls-key", "{key}", "--peer", "http://127.0.0.1:9"), "must be an https:// URL"),
    (("--tls-ca", "{missing}"), "is no usable CA certificate"),
    (("--tls-ca", "{key}"), "is no usable CA certificate"),
]


@pytest.mark.parametrize(("args", "message"), BAD_TLS, ids=[" ".join(args) for args, _ in BAD_TLS])
def test_bad_tls_settings_are_refused_before_the_endpoint_starts(tmp_path: Path, cluster: Cluster,
                                                                 args: tuple[str, ...], message: str) -> None:
    cluster.endpoint_args("a")
    cluster.endpoint_args("other")
    files = {"cert": cluster.folder / "a.pem", "key": cluster.folder / "a-key.pem",
             "other_key": cluster.folder / "other-key.pem", "missing": tmp_path / "nothing.pem"}
    port = free_port()
    completed = subprocess.run([PYTHON, "-m", "endpoint", "--port", str(port), "--db", str(tmp_path / "a.sqlite3"),
                                *(arg.format(**files) for arg in args)], cwd=REPO, capture_output=True, text=True,
                               env={"DW_SECRET": SECRET, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert completed.returncode != 0 and message in completed.stderr, completed.stderr
    with socket.socket() as probe:  # nothing listens
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_certificates_name_the_endpoints_addresses_and_pass_strict_checks(cluster: Cluster) -> None:
    from cryptography import x509

    pem = issue(cluster.ca, ["203.0.113.7", "10.0.0.5", "ec2-203-0-113-7.compute-1.amazonaws.com"])
    certificate = x509.load_pem_x509_certificate(pem.certificate)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == \
        ["203.0.113.7", "10.0.0.5", "127.0.0.1", "::1"]
    assert names.get_values_for_type(x509.DNSName) == ["ec2-203-0-113-7.compute-1.amazonaws.com", "localhost"]
    context = ssl.create_default_context(cafile=str(cluster.ca_file))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default: the chain must pass it
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = cluster.folder / "strict.pem", cluster.folder / "strict-key.pem"
    write_private(cert, pem.certificate)
    write_private(key, pem.key)
    server.load_cert_chain(cert, key)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        served = threading.Thread(target=lambda: server.wrap_socket(theirs, server_side=True), daemon=True)
        served.start()
        client = context.wrap_socket(ours, server_hostname="203.0.113.7")  # raises unless the chain and name pass
        assert ("IP Address", "203.0.113.7") in client.getpeercert()["subjectAltName"]
        served.join(10)


def test_the_ca_is_made_once_and_a_half_ca_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    first, made = ensure_ca(folder / "ca.pem", folder / "ca-key.pem", "x")
    assert made and (folder / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    again, made_again = ensure_ca(folder / "ca.pem", folder / "ca-key.pem", "x")
    assert not made_again and again == first
    key = (folder / "ca-key.pem").read_bytes()
    (folder / "ca-key.pem").unlink()
    with pytest.raises(ValueError, match="exists but"):
        ensure_ca(folder / "ca.pem", folder / "ca-key.pem", "x")
    assert (folder / "ca.pem").read_bytes() == first.certificate  # not replaced
    # A key whose certificate was never written (a run stopped in between) gets one; the key is kept.
    (folder / "ca.pem").unlink()
    (folder / "ca-key.pem").write_bytes(key)
    remade, made = ensure_ca(folder / "ca.pem", folder / "ca-key.pem", "x")
    assert made and remade.key == key and remade.certificate != first.certificate
    pem = issue(remade, ["127.0.0.1"])
    assert pem.certificate


def test_the_aws_deploy_has_tls_on_unless_told_otherwise_and_names_every_address(monkeypatch) -> None:
    from deploy import aws

    for name in ("DW_CLUSTER", "DW_AWS_DIR", "DW_AWS_STATE"):
        monkeypatch.delenv(name, raising=False)
    instance = {"PublicIpAddress": "203.0.113.7", "PrivateIpAddress": "10.0.0.5",
                "PublicDnsName": "ec2-203-0-113-7.compute-1.amazonaws.com",
                "PrivateDnsName": "ip-10-0-0-5.ec2.internal", "Tags": []}
    assert aws.endpoint_names(instance) == ["203.0.113.7", "10.0.0.5", "ec2-203-0-113-7.compute-1.amazonaws.com",
                                            "ip-10-0-0-5.ec2.internal"]
    private = {"a": "10.0.0.5", "b": "10.0.0.6"}
    on = aws.endpoint_settings(aws.parse_args([]), "a", private, {"region": "us-east-1"})
    assert (on["DW_PEER_URL"], on["DW_SELF_URL"], on["DW_ENDPOINTS"]) == \
        ("https://10.0.0.6:5000", "https://127.0.0.1:5000", "https://10.0.0.5:5000,https://10.0.0.6:5000")
    off = aws.endpoint_settings(aws.parse_args(["--no-tls"]), "a", private, {"region": "us-east-1"})
    assert (off["DW_PEER_URL"], off["DW_SELF_URL"]) == ("http://10.0.0.6:5000", "http://127.0.0.1:5000")
    assert aws.cluster_ca(aws.parse_args(["--no-tls"])) is None


def test_a_stalled_handshake_or_a_silent_tls_connection_is_closed_after_the_header_timeout(
        services: Services, cluster: Cluster) -> None:
    a = services.endpoint("a", extra_args=(*cluster.endpoint_args("a"), "--header-timeout", "1"),
                          ca_file=str(cluster.ca_file))
    # Closed by the endpoint (b"") long before the sockets' own 30 s timeout would raise.
    partial = socket.create_connection(("127.0.0.1", a.port), timeout=30)
    partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01")  # the start of a ClientHello, then nothing
    context = ssl.create_default_context(cafile=str(cluster.ca_file))
    silent = context.wrap_socket(socket.create_connection(("127.0.0.1", a.port), timeout=30),
                                 server_hostname="127.0.0.1")  # a whole handshake, then no request
    with partial, silent:
        assert partial.recv(10) == b"" and silent.recv(10) == b""
    assert a.stats(public=True)["pending"] == 0  # and it serves the others meanwhile
