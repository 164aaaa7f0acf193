#!/usr/bin/env python3
"""`crs-healthcheck [PATH] [--port N]`: exit 0 when http://127.0.0.1:PORT/PATH answers 200.

The images are slim (no curl/wget), so Docker's HEALTHCHECK and compose's healthchecks call
this instead. The port defaults to $CRS_PORT, the same variable the service itself binds
from, so a container never probes a port other than the one it serves on.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crs-healthcheck")
    parser.add_argument("path", nargs="?", default="/ready", help="HTTP path to probe (default /ready)")
    parser.add_argument("--port", type=int, default=None, help="default: $CRS_PORT, else 8000")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else int(os.environ.get("CRS_PORT", "8000"))
    path = args.path if args.path.startswith("/") else "/" + args.path
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"crs-healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
