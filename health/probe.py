"""The container's HEALTHCHECK: `python -m health.probe` exits 0 when /health answers 200.

Python is in the image and curl is not; this asks the health server on HEALTH_CHECK_PORT, within a deadline.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from pydantic import ValidationError

from service.settings import ProbeSettings

#: Seconds the probe waits for /health; the Dockerfile's HEALTHCHECK --timeout is longer.
PROBE_TIMEOUT_S = 3.0


def probe(port: int, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, what /health said or why it could not be asked)."""
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200, response.read(500).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return False, exc.read(500).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


def main() -> int:
    try:
        port = ProbeSettings().health_check_port
    except ValidationError:
        print("HEALTH_CHECK_PORT: must be a port number", file=sys.stderr)
        return 1
    healthy, detail = probe(port)
    print(detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
