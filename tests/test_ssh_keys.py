"""The SSH key is loaded once per version of its file: paramiko checks an RSA key at every load (about
0.2 s of CPU, twice per session), which a scaler provisioning a hundred workers paid per session."""

from __future__ import annotations

import os
from pathlib import Path

import paramiko
import pytest
from fakehosts import ssh_keypair

from cloud import ssh
from cloud.ssh import SshError, load_key


def test_a_key_is_loaded_once_per_version_of_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_path, _ = ssh_keypair(tmp_path, "id_rsa", key_type="rsa")
    loads: list[str] = []
    real = paramiko.PKey.from_path

    def counted(path: str, *args: object, **kwargs: object) -> paramiko.PKey:
        loads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(paramiko.PKey, "from_path", staticmethod(counted))
    ssh._load_key.cache_clear()
    first = load_key(key_path)
    assert load_key(key_path) is first and len(loads) == 1
    # A new key in the same file (rotated) is read again.
    os.remove(key_path)
    ssh_keypair(tmp_path, "id_rsa", key_type="rsa")
    assert load_key(key_path).get_fingerprint() != first.get_fingerprint()
    assert len(loads) == 2


def test_a_missing_or_broken_key_is_an_ssh_error_every_time(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text("not a key\n")
    for _ in range(2):  # a failure is not cached
        with pytest.raises(SshError, match="cannot load the SSH key"):
            load_key(broken)
    with pytest.raises(SshError, match="cannot load the SSH key"):
        load_key(tmp_path / "missing")
