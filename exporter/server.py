"""The exporter's HTTP server: ``/metrics``, ``/healthz``, and the simulator's fault endpoint.

A scrape returns the bytes of the latest snapshot; nothing is computed per request. At
most ``max_concurrent_scrapes`` scrapes are served at once; more wait up to a second and
then get 503, so a scrape storm cannot take the machine's CPU from the training job.
Basic auth (compared in constant time against a hash; the password itself is not kept)
and TLS are optional. ``/healthz`` needs no credentials: it says only whether collection
is fresh.

``POST /-/simulate`` exists only with the simulated backend: it injects a fault, e.g.
``{"gpu": 0, "fault": "overheat"}`` or ``{"gpu": 0, "fault": "overheat", "celsius": 80}``
(see exporter.backends.simulated.FAULTS).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from exporter.backends.simulated import OVERHEAT_CELSIUS, SimulatedBackend
from exporter.snapshot import CONTENT_TYPE, SnapshotStore

log = logging.getLogger(__name__)

_MAX_BODY = 4096
_SOCKET_TIMEOUT_S = 10.0  # a client that stops talking cannot hold a thread forever
_INDEX = b"""<html><head><title>mlwarden exporter</title></head><body>
<h1>mlwarden exporter</h1><p><a href="/metrics">/metrics</a> <a href="/healthz">/healthz</a></p>
</body></html>
"""


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against a SHA-256 of ``user:password``."""

    def __init__(self, user: str, password: str) -> None:
        self._expected = hashlib.sha256(f"{user}:{password}".encode()).digest()

    def allows(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hashlib.sha256(given).digest(), self._expected)


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection
    server: _Server
    timeout = _SOCKET_TIMEOUT_S
    # A POST answered without reading its body (401, 404, too large) closes the connection:
    # on keep-alive, the unread body would be parsed as the next request.
    _body_unread = False

    def setup(self) -> None:
        super().setup()
        # Headers and body are separate writes; without this, Nagle plus the client's delayed
        # ACK adds ~40 ms to every small response.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, in this connection's thread, not in accept()

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._healthz()
        elif not self._authorized():
            return
        elif path == "/metrics":
            self._metrics()
        elif path == "/":
            self._send(HTTPStatus.OK, _INDEX, "text/html; charset=utf-8")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n")

    def do_POST(self) -> None:  # noqa: N802
        self._body_unread = True
        if not self._authorized():
            return
        if self.path != "/-/simulate" or self.server.simulator is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found (fault injection needs --gpu-backend simulated)\n")
            return
        self._simulate(self.server.simulator)

    def _authorized(self) -> bool:
        auth = self.server.auth
        if auth is None or auth.allows(self.headers.get("Authorization")):
            return True
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", 'Basic realm="mlwarden"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def _metrics(self) -> None:
        slots = self.server.scrape_slots
        if not slots.acquire(timeout=self.server.queue_timeout):
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"too many concurrent scrapes\n")
            return
        try:
            self._send(HTTPStatus.OK, self.server.store.snapshot.body, CONTENT_TYPE)
        finally:
            slots.release()

    def _healthz(self) -> None:
        stale = self.server.store.stale_collectors()
        if stale:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, ("stale: " + ", ".join(stale) + "\n").encode())
        else:
            self._send(HTTPStatus.OK, b"ok\n")

    def _simulate(self, simulator: SimulatedBackend) -> None:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or not 0 < int(length) <= _MAX_BODY:
            self._send(HTTPStatus.BAD_REQUEST, b"expected a JSON body of at most 4 KiB\n")
            return
        body = self.rfile.read(int(length))
        self._body_unread = False
        try:
            request: Any = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            gpu, fault = request.get("gpu"), request.get("fault")
            xid, count = request.get("xid", 79), request.get("count", 1)
            celsius = request.get("celsius", OVERHEAT_CELSIUS)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (gpu, xid, count)):
                raise ValueError("gpu, xid and count must be integers")
            if not isinstance(celsius, int | float) or isinstance(celsius, bool):
                raise ValueError("celsius must be a number")
            if not isinstance(fault, str):
                raise ValueError("fault must be a string")
            simulator.inject(gpu, fault, xid=xid, count=count, celsius=float(celsius))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            self._send(HTTPStatus.BAD_REQUEST, json.dumps({"error": str(exc)}).encode() + b"\n", "application/json")
            return
        log.info("simulated fault injected: %s", request)
        self._send(HTTPStatus.OK, b'{"ok": true}\n', "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def end_headers(self) -> None:
        if self._body_unread:
            self.send_header("Connection", "close")
        super().end_headers()

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default backlog of 5 drops SYNs when 20 scrapers connect at once
    store: SnapshotStore
    scrape_slots: threading.BoundedSemaphore
    queue_timeout: float
    auth: BasicAuth | None
    simulator: SimulatedBackend | None

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up, times out or speaks plain HTTP to TLS is its problem, not
        # a crash worth a traceback on stderr.
        log.debug("connection from %s failed", client_address[0], exc_info=True)


class ExporterServer:
    def __init__(
        self,
        store: SnapshotStore,
        address: tuple[str, int],
        *,
        max_concurrent_scrapes: int = 10,
        queue_timeout: float = 1.0,
        auth: BasicAuth | None = None,
        tls: ssl.SSLContext | None = None,
        simulator: SimulatedBackend | None = None,
    ) -> None:
        self._server = _Server(address, _Handler)
        self._server.store = store
        self._server.scrape_slots = threading.BoundedSemaphore(max_concurrent_scrapes)
        self._server.queue_timeout = queue_timeout
        self._server.auth = auth
        self._server.simulator = simulator
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True, do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def scrape_slots(self) -> threading.BoundedSemaphore:
        return self._server.scrape_slots

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
