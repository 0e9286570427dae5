"""Container health check: ``python -m dicom_node.console.health`` exits 0 when the node is ready.

With the console on, it asks the console's ``/readyz`` (database reachable, the DICOM port answering a
C-ECHO, a receiving process and a worker alive, the storage folder writable), which answers whatever the
Host header (``console.allowed_hosts`` applies to every other path); otherwise it C-ECHOes the node's own
DICOM port itself (over TLS where the port speaks it). The configuration is read as ``serve`` reads it
(``$DICOM_NODE_CONFIG`` and the environment).
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.logs import os_error_text

TIMEOUT_SECONDS = 10.0


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def console_ready(settings: Settings) -> tuple[bool, str]:
    """Ask /readyz; HTTPS is checked for encryption only (the certificate names the public host, not loopback)."""
    console = settings.console
    scheme = "https" if console.https else "http"
    url = f"{scheme}://{_local(console.host)}:{console.port}/readyz"
    context = ssl._create_unverified_context() if console.https else None
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS, context=context) as response:
            return True, response.read().decode()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode(errors="replace")
    except OSError as exc:
        return False, f"the console at {url} does not answer ({os_error_text(exc)})"


def dicom_ready(settings: Settings) -> tuple[bool, str]:
    from dicom_node.console.metrics import ECHO_TIMEOUT_SECONDS, echo_own_port

    outcome = echo_own_port(settings, ECHO_TIMEOUT_SECONDS)
    return outcome.ok, f"C-ECHO to {settings.network.ae_title}: {'success' if outcome.ok else outcome.reason}"


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    ready, detail = console_ready(settings) if settings.console.enabled else dicom_ready(settings)
    print(detail if not detail.startswith("{") else json.dumps(json.loads(detail)))
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
