"""The exporter's HTTP server: ``/metrics``, ``/healthz``, and the simulator's fault endpoint.

A scrape returns the bytes of the latest snapshot; nothing is computed per request. The
server is one asyncio event loop (uvicorn with httptools and uvloop) in its own thread, so
requests are answered in the order they arrive, a scrape storm uses at most one core, and
an idle connection costs a few kilobytes instead of a thread. At most
``max_concurrent_scrapes`` scrape bodies are being written at once (a slow client holds
its slot until its body is sent); more wait up to a second and then get 503.
Basic auth (compared in constant time against a hash; the password itself is not kept)
and TLS are optional. ``/healthz`` needs no credentials: it says only whether collection
is fresh.

``POST /-/simulate`` exists only with the simulated backend: it injects a fault, e.g.
``{"gpu": 0, "fault": "overheat"}`` or ``{"gpu": 0, "fault": "overheat", "celsius": 80}``
(see exporter.backends.simulated.FAULTS).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from mlwarden.exporter.backends.simulated import OVERHEAT_CELSIUS, SimulatedBackend
from mlwarden.exporter.snapshot import CONTENT_TYPE, SnapshotStore
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mlwarden import logs

log = logging.getLogger(__name__)

_MAX_BODY = 4096
_MAX_CONNECTIONS = 512  # beyond this, requests get 503: file descriptors stay well below the usual limit of 1024
_PIECE_BYTES = 64 * 1024  # uvicorn's write buffer high-water mark
_BACKLOG = 128  # the default of 5 drops SYNs when 20 scrapers connect at once
_INDEX = b"""<html><head><title>mlwarden exporter</title></head><body>
<h1>mlwarden exporter</h1><p><a href="/metrics">/metrics</a> <a href="/healthz">/healthz</a></p>
</body></html>
"""
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Authenticator(Protocol):
    """Says whether an ``Authorization`` header carries credentials we accept."""

    def allows(self, header: bytes | None) -> bool: ...


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against a SHA-256 of ``user:password``."""

    def __init__(self, user: str, password: str) -> None:
        self._expected = hashlib.sha256(f"{user}:{password}".encode()).digest()

    def allows(self, header: bytes | None) -> bool:
        if not header or not header.startswith(b"Basic "):
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


async def _respond(send: Send, status: HTTPStatus, body: bytes, content_type: str = _TEXT,
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Send a response; a large body goes in pieces, each waiting until the client took the last.

    uvicorn waits for a slow client only between pieces: one large piece would be copied
    whole into its send buffer at once, so every slow scraper would cost a body's worth
    of memory and none would ever hold its scrape slot.
    """
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body)), *headers],
    })
    rest = memoryview(body)
    while len(rest) > _PIECE_BYTES:
        await send({"type": "http.response.body", "body": rest[:_PIECE_BYTES], "more_body": True})
        rest = rest[_PIECE_BYTES:]
    await send({"type": "http.response.body", "body": rest})


class _App:
    """The ASGI application: routing, credentials, the scrape bound and fault injection."""

    def __init__(self, store: SnapshotStore, max_concurrent_scrapes: int, queue_timeout: float,
                 auth: Authenticator | None, simulator: SimulatedBackend | None) -> None:
        self.store = store
        self.queue_timeout = queue_timeout
        self.auth = auth
        self.simulator = simulator
        self.scrape_slots = asyncio.Semaphore(max_concurrent_scrapes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST":
            if not self._authorized(scope):
                await self._refuse(send)
            elif path != "/-/simulate" or self.simulator is None:
                await _respond(send, HTTPStatus.NOT_FOUND, b"not found (fault injection needs --gpu-backend simulated)\n")
            else:
                await self._simulate(scope, receive, send, self.simulator)
        elif method not in ("GET", "HEAD"):
            await _respond(send, HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", headers=((b"allow", b"GET, HEAD, POST"),))
        elif path == "/healthz":
            await self._healthz(send)
        elif not self._authorized(scope):
            await self._refuse(send)
        elif path == "/metrics":
            await self._metrics(scope, send)
        elif path == "/":
            await _respond(send, HTTPStatus.OK, _INDEX, "text/html; charset=utf-8")
        else:
            await _respond(send, HTTPStatus.NOT_FOUND, b"not found\n")

    def _authorized(self, scope: Scope) -> bool:
        if self.auth is None:
            return True
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        return self.auth.allows(header)

    @staticmethod
    async def _refuse(send: Send) -> None:
        await _respond(send, HTTPStatus.UNAUTHORIZED, b"", headers=((b"www-authenticate", b'Basic realm="mlwarden"'),))

    async def _metrics(self, scope: Scope, send: Send) -> None:
        slots = self.scrape_slots
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for can lose a permit acquired
            # just as the timeout fires, and with it one scrape slot for good.
            async with asyncio.timeout(self.queue_timeout):
                await slots.acquire()
        except TimeoutError:
            await _respond(send, HTTPStatus.SERVICE_UNAVAILABLE, b"too many concurrent scrapes\n")
            return
        try:
            snapshot = self.store.snapshot
            if _accepts_gzip(scope):
                await _respond(send, HTTPStatus.OK, snapshot.gzipped, CONTENT_TYPE, headers=_GZIP_HEADERS)
            else:
                await _respond(send, HTTPStatus.OK, snapshot.body, CONTENT_TYPE, headers=_VARY)
        finally:
            slots.release()

    async def _healthz(self, send: Send) -> None:
        stale = self.store.stale_collectors()
        if stale:
            await _respond(send, HTTPStatus.SERVICE_UNAVAILABLE, ("stale: " + ", ".join(stale) + "\n").encode())
        else:
            await _respond(send, HTTPStatus.OK, b"ok\n")

    async def _simulate(self, scope: Scope, receive: Receive, send: Send, simulator: SimulatedBackend) -> None:
        length = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        if not length.isdigit() or not 0 < int(length) <= _MAX_BODY:
            await _respond(send, HTTPStatus.BAD_REQUEST, b"expected a JSON body of at most 4 KiB\n")
            return
        body = await _read_body(receive)
        try:
            request: Any = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            gpu, xid, count = (_integer(request.get(key, default)) for key, default in (("gpu", None), ("xid", 79), ("count", 1)))
            fault, celsius = request.get("fault"), request.get("celsius", OVERHEAT_CELSIUS)
            if not isinstance(celsius, int | float) or isinstance(celsius, bool):
                raise ValueError("celsius must be a number")
            if not isinstance(fault, str):
                raise ValueError("fault must be a string")
            simulator.inject(gpu, fault, xid=xid, count=count, celsius=float(celsius))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            await _respond(send, HTTPStatus.BAD_REQUEST, json.dumps({"error": str(exc)}).encode() + b"\n", _JSON)
            return
        log.info("simulated fault injected: %s", request)
        await _respond(send, HTTPStatus.OK, b'{"ok": true}\n', _JSON)


_VARY = ((b"vary", b"accept-encoding"),)
_GZIP_HEADERS = ((b"content-encoding", b"gzip"), *_VARY)


def _accepts_gzip(scope: Scope) -> bool:
    """Whether Accept-Encoding lists gzip (or ``*``) without ``q=0``."""
    header = next((value for name, value in scope["headers"] if name == b"accept-encoding"), b"")
    for item in header.lower().split(b","):
        coding, _, params = item.partition(b";")
        if coding.strip() in (b"gzip", b"*"):
            quality = params.strip().removeprefix(b"q=")
            try:
                return not params.strip() or float(quality) > 0
            except ValueError:
                return False
    return False


def _integer(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("gpu, xid and count must be integers")
    return value


async def _read_body(receive: Receive) -> bytes:
    """The request body; Content-Length was checked, so it is small."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


class _IdleTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, with the idle timeout also armed before the first request.

    uvicorn starts the keep-alive timeout only after a response, so a client that connects
    and never sends a request would hold its connection for ever.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


class _Server(uvicorn.Server):
    """uvicorn's server, waking once a second instead of ten times to see whether it should exit.

    Each wake-up only checks ``should_exit`` (and refreshes headers we do not send); at ten a
    second they were a measurable share of an idle exporter's CPU. Stopping takes up to 1 s more.
    """

    async def main_loop(self) -> None:
        while not await self.on_tick(0):
            await asyncio.sleep(1.0)


def _listen(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=_BACKLOG)


class ExporterServer:
    def __init__(
        self,
        store: SnapshotStore,
        address: tuple[str, int],
        *,
        max_concurrent_scrapes: int = 10,
        queue_timeout: float = 1.0,
        auth: Authenticator | None = None,
        tls: ssl.SSLContext | None = None,
        simulator: SimulatedBackend | None = None,
        idle_timeout: float = 10.0,  # a client that stops talking cannot hold a connection for ever
    ) -> None:
        self.app = _App(store, max_concurrent_scrapes, queue_timeout, auth, simulator)
        self._socket = _listen(address)  # bound here, so that a taken port is an error of the constructor
        config = uvicorn.Config(
            self.app, http=_IdleTimeoutProtocol, lifespan="off", **logs.uvicorn_options(),
            ws="none",  # no WebSocket routes: "auto" would import the websockets library (2 MiB) for nothing
            proxy_headers=False,
            server_header=False, date_header=False, limit_concurrency=_MAX_CONNECTIONS, timeout_graceful_shutdown=2,
            timeout_keep_alive=idle_timeout,  # type: ignore[arg-type]  # a float is fine: it goes to call_later
        )
        config.load()
        config.ssl = tls  # our context (TLS 1.2 at least), not one uvicorn builds from file names
        self._uvicorn = _Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, args=([self._socket],), name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (open connections get up to 2 s); also fine if never started."""
        self._uvicorn.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self._socket.close()
