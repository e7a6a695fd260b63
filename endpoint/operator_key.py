"""Print the operator key of a cluster: `python -m endpoint.operator_key --secret-file var/secret`.

The key is the password of the dashboard's details (GET /details, HTTP Basic, any user name).
It is derived from the cluster secret (endpoint/secret.py), so whoever can read the secret's
file can get it, and nobody else; it is printed on stdout only, for a terminal or a password
manager, never into a log.
"""

from __future__ import annotations

import argparse
import os
import sys

from endpoint.secret import operator_key, read_secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m endpoint.operator_key", description=__doc__.splitlines()[0])
    parser.add_argument("--secret-file", default=os.environ.get("DW_SECRET_FILE", "var/secret"),
                        help="the cluster secret's file [DW_SECRET_FILE, default var/secret]")
    args = parser.parse_args(argv)
    try:
        secret = read_secret(args.secret_file)
    except OSError as exc:
        print(f"cannot read the cluster secret from {args.secret_file}: {exc.strerror}", file=sys.stderr)
        return 1
    print(operator_key(secret))
    return 0


if __name__ == "__main__":
    sys.exit(main())
