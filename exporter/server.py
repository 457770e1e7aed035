"""The exporter's HTTP server: ``/metrics``, ``/healthz``, and the simulator's fault endpoint.

A scrape returns the bytes of the latest snapshot; nothing is computed per request on the event loop
(a snapshot not rendered yet is rendered in a worker thread while the loop serves on). The
server is one asyncio event loop (a small HTTP/1.1 server on asyncio streams) in its own thread, so
requests are answered in the order they arrive, a scrape storm uses at most one core, and
an idle connection costs a few kilobytes instead of a thread. At most
``max_concurrent_scrapes`` scrape bodies are being written at once (a slow client holds
its slot until its body is sent); more wait up to a second and then get 503.
Basic auth (the shared check of :mod:`mlwarden.auth`) and TLS are optional. ``/healthz`` needs no credentials: it says only whether collection
is fresh.

``POST /-/simulate`` exists only with the simulated backend: it injects a fault, e.g.
``{"gpu": 0, "fault": "overheat"}`` or ``{"gpu": 0, "fault": "overheat", "celsius": 80}``
(see exporter.backends.simulated.FAULTS).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from mlwarden.exporter.backends.simulated import OVERHEAT_CELSIUS, SimulatedBackend
from mlwarden.exporter.snapshot import CONTENT_TYPE, SnapshotStore

from mlwarden.auth import AuthCheck

log = logging.getLogger(__name__)

_MAX_BODY = 4096
_MAX_CONNECTIONS = 512  # beyond this, requests get 503: file descriptors stay well below the usual limit of 1024
_PIECE_BYTES = 64 * 1024  # asyncio's write buffer high-water mark
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


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


async def _respond(send: Send, status: HTTPStatus, body: bytes, content_type: str = _TEXT,
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Send a response; a large body goes in pieces, each waiting until the client took the last.

    The server waits for a slow client only between pieces: one large piece would be copied
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
                 auth: AuthCheck | None, simulator: SimulatedBackend | None) -> None:
        self.store = store
        self.queue_timeout = queue_timeout
        self.auth = auth
        self.simulator = simulator
        self.scrape_slots = asyncio.Semaphore(max_concurrent_scrapes)
        # one thread, made at the first scrape that needs a render: while scrapers keep up with collection,
        # passes are rendered in the collectors' threads and this one never exists
        self.renderer: concurrent.futures.ThreadPoolExecutor | None = None

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
            gzipped = _accepts_gzip(scope)
            body = snapshot.ready(gzipped)
            if body is None:
                # the first scrape of a snapshot nobody scraped while it was published: it is rendered in a
                # worker thread, so that the loop goes on serving while it waits; scrapes that come meanwhile
                # queue behind it and find it made
                if self.renderer is None:
                    self.renderer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
                body = await asyncio.get_running_loop().run_in_executor(self.renderer, snapshot.render, gzipped)
            await _respond(send, HTTPStatus.OK, body, CONTENT_TYPE, headers=_GZIP_HEADERS if gzipped else _VARY)
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


_HEAD_LIMIT = 16 * 1024  # request line and headers; a scraper sends a few hundred bytes
_BODY_LIMIT = 64 * 1024  # read and dropped for routes that refuse it, so it cannot poison a kept-alive connection
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class _BadRequest(ValueError):
    """A request this server does not take: answered with this status, then the connection closes."""

    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


def _parse_head(head: bytes) -> tuple[str, str, bool, list[tuple[bytes, bytes]]]:
    """(method, path, HTTP/1.1, headers with lower-case names) of a request head."""
    try:
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        raise _BadRequest(HTTPStatus.BAD_REQUEST) from None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not target.startswith("/"):
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    headers = []
    for line in lines:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(HTTPStatus.BAD_REQUEST)
        headers.append((name.lower().encode("latin-1"), value.strip().encode("latin-1")))
    return method, target.partition("?")[0], version == "HTTP/1.1", headers


class _Connection:
    """One client connection: requests in order, each answered before the next is read.

    A client that sends nothing for ``idle_timeout`` (before its first request too) is
    disconnected, and so is one that stops reading its response for as long.
    """

    def __init__(self, app: _App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_timeout: float) -> None:
        self.app = app
        self.reader = reader
        self.writer = writer
        self.idle_timeout = idle_timeout
        self.keep_alive = True

    async def serve(self) -> None:
        try:
            while self.keep_alive:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        head = await self.reader.readuntil(b"\r\n\r\n")
                except (TimeoutError, asyncio.IncompleteReadError):
                    return  # idle or gone: nothing worth answering
                except asyncio.LimitOverrunError:
                    # Say why, so a client with oversized headers (a huge cookie, a proxy's) is not left guessing.
                    self.keep_alive = False
                    await self._send_simple(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                    return
                try:
                    await self._request(head[:-4])
                except _BadRequest as exc:
                    self.keep_alive = False
                    await self._send_simple(exc.status)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass  # the client went away or stopped reading: nothing to answer
        finally:
            self.writer.close()

    async def _request(self, head: bytes) -> None:
        method, path, http11, headers = _parse_head(head)
        fields = dict(headers)
        if len(fields) != len(headers) and len({value for name, value in headers if name == b"content-length"}) > 1:
            raise _BadRequest(HTTPStatus.BAD_REQUEST)  # two lengths: which body is the next request's?
        if b"transfer-encoding" in fields:
            raise _BadRequest(HTTPStatus.LENGTH_REQUIRED)  # no route takes a streamed body
        length = fields.get(b"content-length", b"0")
        if not length.isdigit():
            raise _BadRequest(HTTPStatus.BAD_REQUEST)
        if int(length) > _BODY_LIMIT:
            raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        connection = fields.get(b"connection", b"").lower()
        self.keep_alive = b"close" not in connection and (http11 or b"keep-alive" in connection)
        body = b""
        if int(length):
            async with asyncio.timeout(self.idle_timeout):
                body = await self.reader.readexactly(int(length))
        scope = {"type": "http", "method": method, "path": path, "headers": headers}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, receive, self._sender(method == "HEAD"))

    def _sender(self, head_only: bool) -> Send:
        head = b""

        async def send(message: dict[str, Any]) -> None:
            nonlocal head
            if message["type"] == "http.response.start":
                status = int(message["status"])
                lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b""))]
                lines += [name + b": " + value for name, value in message.get("headers", ())]
                if not self.keep_alive:
                    lines.append(b"connection: close")
                head = b"\r\n".join(lines) + b"\r\n\r\n"  # sent with the first piece: one segment for a small answer
                return
            self.writer.write(head + (b"" if head_only else message.get("body", b"")))
            head = b""
            # a client that stops reading holds at most one piece in our buffers, and not for ever; what the
            # kernel took at once needs no wait (most scrapes: a timer per piece was a tenth of a scrape's CPU)
            if self.writer.transport.get_write_buffer_size():
                async with asyncio.timeout(self.idle_timeout):
                    await self.writer.drain()
        return send

    async def _send_simple(self, status: HTTPStatus) -> None:
        await _respond(self._sender(False), status, f"{status.phrase.lower()}\n".encode())


def _listen(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=_BACKLOG)


class ExporterServer:
    """The HTTP/1.1 server: asyncio streams in one thread of its own.

    Small on purpose (uvicorn, uvloop and their imports were a fifth of the exporter's resident
    memory): pre-rendered bodies, a handful of routes, keep-alive, TLS through the ssl module.
    An idle server sleeps in the kernel; nothing wakes it on a timer.
    """

    def __init__(
        self,
        store: SnapshotStore,
        address: tuple[str, int],
        *,
        max_concurrent_scrapes: int = 10,
        queue_timeout: float = 1.0,
        auth: AuthCheck | None = None,
        tls: ssl.SSLContext | None = None,
        simulator: SimulatedBackend | None = None,
        idle_timeout: float = 10.0,  # a client that stops talking cannot hold a connection for ever
    ) -> None:
        self.app = _App(store, max_concurrent_scrapes, queue_timeout, auth, simulator)
        self._socket = _listen(address)  # bound here, so that a taken port is an error of the constructor
        self._tls = tls
        self._idle_timeout = idle_timeout
        self._connections: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5.0)

    def stop(self) -> None:
        """Stop serving (open connections are closed); also fine if never started."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stopping.set)
            self._thread.join(timeout=5.0)
        self._socket.close()
        if self.app.renderer is not None:
            self.app.renderer.shutdown(wait=False)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(_quiet)
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._accept, sock=self._socket, ssl=self._tls, limit=_HEAD_LIMIT,
            ssl_handshake_timeout=self._idle_timeout if self._tls else None,
        )
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for writer in list(self._connections):
                writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= _MAX_CONNECTIONS:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            writer.close()
            return
        self._connections.add(writer)
        try:
            await _Connection(self.app, reader, writer, self._idle_timeout).serve()
        finally:
            self._connections.discard(writer)


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Failed TLS handshakes and clients gone mid-write are the clients' business: debug; anything else is ours."""
    exception = context.get("exception")
    if exception is None or isinstance(exception, OSError):  # ssl.SSLError and ConnectionError are OSErrors
        log.debug("http: %s", context.get("message"), exc_info=exception)
    else:
        log.error("http: %s", context.get("message"), exc_info=exception)
