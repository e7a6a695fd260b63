"""A small filesystem made for one test (a size-limited tmpfs), and a file of ours that fills it.

Mounting needs root (the tests run as root); elsewhere the tests that need it are skipped.
The mount is always unmounted when the block ends: the caller stops its processes first.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER_NAME = "filler-of-the-test"


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` at `mount_point` (created) for the block; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        _unmount(mount_point)


def _unmount(mount_point: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        done = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            # Something of the test still holds a file there: detach it anyway, and say so.
            subprocess.run(["umount", "-l", str(mount_point)], check=False)
            raise AssertionError(f"{mount_point} was still busy at the end of the test: {done.stderr.strip()}")
        time.sleep(0.2)


def fill(directory: Path) -> Path:
    """Write a file into `directory` until its filesystem has no byte left; returns the file."""
    filler = directory / FILLER_NAME
    chunk = b"\0" * 65536
    with open(filler, "ab", buffering=0) as out:
        for size in (65536, 4096, 1):  # the last bytes too, so that nothing fits any more
            while True:
                try:
                    out.write(chunk[:size])
                except OSError:
                    break
    assert free_bytes(directory) == 0, f"{directory} still has {free_bytes(directory)} bytes free"
    return filler


def free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize
