"""One small HTTP server for ``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from devrecd.errors import ConfigError

Check = Callable[[], tuple[bool, str]]


class StatusServer:
    """Serves the registry and the two probes on ``address:port`` (port 0 = any free port)."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int, *, healthy: Check, ready: Check) -> None:
        reg, checks = registry, {"/healthz": healthy, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._reply(200, encoder(reg), content_type)
                elif path in checks:
                    ok, detail = checks[path]()
                    self._reply(200 if ok else 503, (detail + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain; charset=utf-8")

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # scrapes every few seconds are not events worth a log line

        server_class = _Server6 if ":" in address else ThreadingHTTPServer
        try:
            self._server = server_class((address, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address}:{port} (metrics.address/port): {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="devrecd-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6
