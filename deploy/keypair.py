"""The cluster's key pair `<cluster>-key`: SSH access to the endpoint instances (for `./deploy.sh
aws`) and, from the endpoints' scalers, to the worker instances.

EC2 hands out the private key once, at creation; it is saved to `<aws-dir>/<cluster>-key.pem`
with mode 0600 from the first byte, and the creation and the saving are not cut apart by a
Ctrl-C. Setup never overwrites a private key nor makes a second key pair; destroy deletes the
private key only with its key pair.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from cli.interrupts import deferred_signals
from cloud.aws import error_code
from cloud.ec2 import Tag
from deploy.cluster import Settings, SetupError, report, require_ours, step, tag_value


def find_key_pair(ec2: Any, name: str) -> dict | None:
    try:
        pairs = ec2.describe_key_pairs(KeyNames=[name])["KeyPairs"]
    except ClientError as exc:
        if error_code(exc) == "InvalidKeyPair.NotFound":
            return None
        raise
    return pairs[0] if pairs else None


def write_private_key(path: Path, material: str) -> None:
    """Created 0600 from the first byte (os.open with the mode; never chmod-ed down afterwards),
    under a temporary name, then renamed: a crash leaves no half-written key at the real path."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # exactly 0600, whatever the umask
        with os.fdopen(descriptor, "w") as file:
            file.write(material if material.endswith("\n") else material + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def ensure_key_pair(ec2: Any, settings: Settings) -> dict:
    name, pem = settings.key_name, settings.key_path
    what = f"key pair {name}"
    with step(what):
        existing = find_key_pair(ec2, name)
    if existing:
        require_ours(what, existing.get("Tags"), settings.cluster)
        if not pem.exists():
            raise SetupError(
                f"{what} exists in EC2 ({existing.get('KeyPairId', '?')}) but its private key {pem} is missing "
                f"here. EC2 hands out a private key only once, so setup will not make a second key pair. Either "
                f"restore {pem} (mode 0600) from where you keep a copy, or, if it is lost and no running instance "
                f"needs it, delete the key pair (`aws ec2 delete-key-pair --key-name {name} --region "
                f"{settings.region}`, or `./setup.sh aws --destroy`) and run setup again")
        if pem.stat().st_mode & 0o077:  # ssh refuses a private key others can read
            pem.chmod(0o600)
            report(what, f"private key {pem} was readable by others: now mode 0600")
        report(what, f"already exists ({existing.get('KeyPairId', '?')}), private key {pem}")
        return existing
    if pem.exists():
        raise SetupError(f"{pem} exists but EC2 has no {what}: it is the key of a key pair deleted since. Setup "
                         f"never overwrites a private key: move it away (e.g. `mv {pem} {pem}.old`) and run again")
    # EC2 hands out the private key once: a Ctrl-C between the creation and the saving would leave a
    # key pair nobody can use, which blocks the next run. So the signal waits until the key is saved.
    with deferred_signals():
        with step(what):
            created = ec2.create_key_pair(KeyName=name, KeyType=settings.key_type, TagSpecifications=[
                {"ResourceType": "key-pair", "Tags": settings.tags(name)}])
        try:
            write_private_key(pem, created["KeyMaterial"])
        except OSError as exc:
            # Without its private key the key pair is useless and would block the next run: undo it.
            with step(f"{what} (deleting it again after the private key could not be saved)"):
                ec2.delete_key_pair(KeyName=name)
            raise SetupError(f"saving the private key to {pem}: {exc}; the key pair was deleted again") from exc
    report(what, f"created ({created.get('KeyPairId', '?')}), private key saved to {pem} (mode 0600)")
    return created


def remove_key_pair(ec2: Any, cluster: str, name: str, pem: Path) -> list[str]:
    what = f"key pair {name}"
    removed = []
    with step(what):
        existing = find_key_pair(ec2, name)
        if existing and tag_value(existing.get("Tags")) != cluster:
            report(what, f"not tagged {Tag.CLUSTER}={cluster}: left alone, and so is {pem}")
            return []
        if not existing:
            # The private key may be that of the key pair in another region: never deleted on a guess.
            report(what, "none found" + (f"; private key {pem} kept" if pem.exists() else ""))
            return []
        # By name: moto ignores KeyPairId here. The tag check above made sure it is ours.
        ec2.delete_key_pair(KeyName=name)
        report(what, f"deleted ({existing.get('KeyPairId', '?')})")
        removed.append(what)
    pem.with_name(pem.name + ".tmp").unlink(missing_ok=True)  # left by a run killed while saving the key
    if pem.exists():
        pem.unlink()
        report(what, f"private key {pem} deleted")
        removed.append(f"private key {pem}")
    return removed


def private_key_path(settings: Settings, state: dict) -> Path:
    """The recorded place of the private key (setup may have run with another --aws-dir), but only a
    file of the cluster's key name: a state file never makes destroy delete any other file."""
    recorded = Path(state.get("key_path", "") or settings.key_path)
    return recorded if recorded.name == settings.key_path.name else settings.key_path
