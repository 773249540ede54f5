"""One small HTTP server for ``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz``.

Bounded: each connection has a socket timeout (an idle or half-open client is dropped after
``TIMEOUT_S``) and at most ``MAX_CONNECTIONS`` are served at once (more are closed at once), so no
client can pile up threads in the daemon. GET and HEAD are answered.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from devrecd.errors import ConfigError

Check = Callable[[], tuple[bool, str]]
TIMEOUT_S = 10.0  # per connection: read of the request and write of the reply
MAX_CONNECTIONS = 16  # served at once; a scrape is one short request


class StatusServer:
    """Serves the registry and the two probes on ``address:port`` (port 0 = any free port)."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int, *, healthy: Check, ready: Check,
                 timeout: float = TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> None:
        reg, checks = registry, {"/healthz": healthy, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802
                self._head_only = True
                self.do_GET()

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
                if not getattr(self, "_head_only", False):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # scrapes every few seconds are not events worth a log line

        Handler.timeout = timeout  # StreamRequestHandler sets it on the connection's socket
        server_class = _Server6 if ":" in address else _Server
        try:
            self._server = server_class((address, port), Handler)
            self._server.slots = threading.BoundedSemaphore(max_connections)
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


class _Server(ThreadingHTTPServer):
    """A threading server that serves at most ``slots`` connections at once and drops the rest."""

    slots: threading.BoundedSemaphore

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed at once, no thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6
