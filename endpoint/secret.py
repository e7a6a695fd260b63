"""The shared secret that workers and the peer present on internal routes."""

from __future__ import annotations

import os
from pathlib import Path

MIN_SECRET_LENGTH = 16


def read_secret(secret_file: str = "") -> str:
    """From `secret_file` if given, else from the DW_SECRET environment variable.

    Never taken from a command-line flag: those show up in `ps` and in shell history.
    """
    if secret_file:
        secret = Path(secret_file).read_text().strip()
        source = secret_file
    else:
        secret = os.environ.get("DW_SECRET", "").strip()
        source = "DW_SECRET"
    if not secret:
        raise SystemExit("no shared secret: pass --secret-file (or DW_SECRET_FILE) or set DW_SECRET")
    if len(secret) < MIN_SECRET_LENGTH:
        raise SystemExit(f"the shared secret from {source} is shorter than {MIN_SECRET_LENGTH} characters")
    return secret
