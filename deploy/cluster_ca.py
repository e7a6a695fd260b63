"""The cluster's private certificate authority, and the endpoints' certificates it signs.

`./deploy.sh local --tls` and `./deploy.sh aws` (unless `--no-tls`) make the CA once (an EC
P-256 key, valid for 10 years) and keep it on the deploying machine: its certificate (public,
handed to every client, worker and scaler that must trust the endpoints) and its key (0600,
never uploaded anywhere). At every deploy each endpoint gets a fresh certificate (valid for
397 days) naming all the addresses it is reached at -- public and private IPs and DNS names,
and 127.0.0.1/localhost for its own scaler -- and a fresh key, which goes to that endpoint's
host alone.

Clients check the chain and the name (cli/tls.py); the certificates carry what strict X.509
checking (Python 3.13's default) asks for: critical basic constraints, key usages, subject
and authority key identifiers.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
ENDPOINT_DAYS = 397
# Every endpoint's certificate also names its loopback addresses: its scaler asks it at 127.0.0.1.
LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Pem:
    certificate: bytes
    key: bytes  # keep it 0600


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dynamic-workload"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_ca(label: str, key_pem: bytes | None = None) -> Pem:
    """A new CA; with `key_pem`, its certificate for that key."""
    if key_pem is None:
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        loaded = serialization.load_pem_private_key(key_pem, password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        key = loaded
    name = _name(f"dynamic-workload {label} CA")
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256()))
    return Pem(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _alternative_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue(ca: Pem, names: Iterable[str]) -> Pem:
    """A server certificate for an endpoint reached at `names` (IP addresses or DNS names), with loopback."""
    ca_certificate = x509.load_pem_x509_certificate(ca.certificate)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    wanted = list(dict.fromkeys(name.strip() for name in (*names, *LOOPBACK_NAMES) if name and name.strip()))
    key = ec.generate_private_key(ec.SECP256R1())
    ca_identifier = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder().subject_name(_name(wanted[0])).issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(min(_now() + datetime.timedelta(days=ENDPOINT_DAYS), ca_certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_alternative_name(name) for name in wanted]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_identifier), critical=False)
        .sign(ca_key, hashes.SHA256()))
    return Pem(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Written aside (0600 from the start) and renamed into place: a reader never sees half a file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def ensure_ca(certificate_path: Path, key_path: Path, label: str) -> tuple[Pem, bool]:
    """The CA kept in these two files, made if neither exists; (it, whether it was made now).

    Made under a lock (two deploys at once make one CA), the key first: a key without its certificate
    (a run stopped in between) gets one, as nobody can trust a certificate never written. A certificate
    without its key is refused: clients may trust it, and a new CA would make them refuse the endpoints
    (see the README on rotating it)."""
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(key_path.with_name(key_path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have_certificate, have_key = certificate_path.exists(), key_path.exists()
        if have_certificate and have_key:
            ca = Pem(certificate_path.read_bytes(), key_path.read_bytes())
            check_ca(ca, certificate_path)
            return ca, False
        if have_certificate:
            raise ValueError(f"{certificate_path} exists but {key_path} does not: restore it, or delete both to make "
                             f"a new CA (clients must then trust the new {certificate_path.name})")
        ca = new_ca(label, key_path.read_bytes() if have_key else None)
        if not have_key:
            write_private(key_path, ca.key)
        write_private(certificate_path, ca.certificate, mode=0o644)
        return ca, True


def check_ca(ca: Pem, where: Path) -> None:
    """The key belongs to the certificate, and the certificate is a CA still valid for a while."""
    try:
        certificate = x509.load_pem_x509_certificate(ca.certificate)
        key = serialization.load_pem_private_key(ca.key, password=None)
    except ValueError as exc:
        raise ValueError(f"the CA in {where} is unreadable: {exc}") from exc
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError(f"the CA key beside {where} does not belong to its certificate")
    if certificate.not_valid_after_utc < _now() + datetime.timedelta(days=30):
        raise ValueError(f"the CA in {where} expires on {certificate.not_valid_after_utc:%Y-%m-%d}: make a new one "
                         f"(see the README on rotating it)")
