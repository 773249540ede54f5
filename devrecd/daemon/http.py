"""One small HTTP server for ``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz``.

Bounded: each connection has ``TIMEOUT_S`` in all (a deadline for the whole request, reading and
reply, not per read: a client sending a header byte every few seconds is cut off all the same) and
at most ``MAX_CONNECTIONS`` are served at once, so no client can pile up threads in the daemon. When
all are taken, a new connection evicts the oldest one still sending its request: slow clients cannot
starve a probe or a scrape, whose request arrives at once. A client that goes away early (reset,
broken pipe) is no event worth a traceback; any other error of a connection is logged through the
daemon's log (one line, JSON where ``log.format = "json"``). GET and HEAD are answered.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from devrecd.errors import ConfigError

log = logging.getLogger("devrecd.daemon.http")

Check = Callable[[], tuple[bool, str]]
TIMEOUT_S = 10.0  # per connection, in all: read of the request and write of the reply
MAX_CONNECTIONS = 16  # served at once; a scrape is one short request


class StatusServer:
    """Serves the registry and the two probes on ``address:port`` (port 0 = any free port)."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int, *, healthy: Check, ready: Check,
                 timeout: float = TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> None:
        reg, checks = registry, {"/healthz": healthy, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def parse_request(self) -> bool:
                ok = super().parse_request()
                self.server.replying(self.connection)  # type: ignore[attr-defined]
                return ok

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

        Handler.timeout = timeout  # per read; the reaper enforces the same limit on the whole request
        server_class = _Server6 if ":" in address else _Server
        try:
            self._server = server_class((address, port), Handler)
            self._server.slots = threading.BoundedSemaphore(max_connections)
            self._server.deadline_s = timeout
            self._server.conns = {}
            self._server.conns_lock = threading.Lock()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address}:{port} (metrics.address/port): {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="devrecd-http", daemon=True)
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="devrecd-http-reaper", daemon=True)

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
        self._reaper.start()

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._reaper.join(timeout=5)

    def _reap(self) -> None:
        """Cut off every connection past its deadline (whatever it is doing)."""
        tick = min(0.25, self._server.deadline_s / 4)
        while not self._stopping.wait(tick):
            self._server.expire(time.monotonic())


class _Server(ThreadingHTTPServer):
    """A threading server that serves at most ``slots`` connections at once and drops the rest."""

    slots: threading.BoundedSemaphore
    deadline_s: float
    conns: dict  # socket -> [deadline (monotonic), still reading its request]
    conns_lock: threading.Lock

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        if not self.slots.acquire(blocking=False):
            self._evict_oldest_reader()
            if not self.slots.acquire(timeout=0.5):
                self.shutdown_request(request)  # every slot busy replying: closed at once, no thread
                return
        with self.conns_lock:
            self.conns[request] = [time.monotonic() + self.deadline_s, True]
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)
            self.slots.release()

    def replying(self, request) -> None:
        """The connection's request has arrived whole: it is no longer a candidate for eviction."""
        with self.conns_lock:
            if request in self.conns:
                self.conns[request][1] = False

    def _forget(self, request) -> None:
        with self.conns_lock:
            self.conns.pop(request, None)

    def _evict_oldest_reader(self) -> None:
        with self.conns_lock:
            readers = [(d, s) for s, (d, reading) in self.conns.items() if reading]
        if readers:
            _cut(min(readers, key=lambda x: x[0])[1])

    def expire(self, now: float) -> None:
        with self.conns_lock:
            late = [s for s, (d, _) in self.conns.items() if d <= now]
        for s in late:
            _cut(s)

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)) or (
                isinstance(exc, OSError) and not isinstance(exc, ConnectionError) and exc.errno in (9, 107)):
            return  # the client went away, or was cut off at its deadline: nothing to report
        log.error("error serving an HTTP request", exc_info=True, extra={"client": str(client_address[0])})


def _cut(request: socket.socket) -> None:
    """End a connection from another thread: its handler's blocked read or write returns at once."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


class _Server6(_Server):
    address_family = socket.AF_INET6
