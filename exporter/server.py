"""The exporter's HTTP server: ``/metrics``, ``/healthz``, and the simulator's fault endpoint.

A scrape returns the bytes of the latest snapshot; nothing is computed per request on the event loop
(a snapshot not rendered yet is rendered in a worker thread while the loop serves on). The
server is one asyncio event loop in its own thread, with a small HTTP/1.1 protocol of its own
(asyncio.Protocol: a request is parsed and answered in the callback that received it, with no
task, stream or timer per request), so requests are answered in the order they arrive, a scrape
storm uses at most one core, and an idle connection costs a few kilobytes instead of a thread. At most
``max_concurrent_scrapes`` scrape bodies are being written at once (a slow client holds
its slot until its body is sent); more wait up to a second and then get 503.
Basic auth (the shared check of :mod:`mlwarden.auth`) and TLS are optional. ``/healthz`` needs no credentials: it says only whether collection
is fresh.

A client that sends nothing for ``idle_timeout`` (before its first request too), takes longer than
that to send a request, or stops reading its answer for as long, is disconnected. A body is written
in pieces of 1 MiB, the next one only once the client took the last, and a scrape holds its slot
until the client took all of it, so slow scrapers hold at most ``max_concurrent_scrapes`` pieces in
the server's buffers.

``POST /-/simulate`` exists only with the simulated backend: it injects a fault, e.g.
``{"gpu": 0, "fault": "overheat"}`` or ``{"gpu": 0, "fault": "overheat", "celsius": 80}``
(see exporter.backends.simulated.FAULTS).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from mlwarden.exporter.backends.simulated import OVERHEAT_CELSIUS, SimulatedBackend
from mlwarden.exporter.snapshot import CONTENT_TYPE, Snapshot, SnapshotStore

from mlwarden.auth import AuthCheck

log = logging.getLogger(__name__)

_MAX_BODY = 4096
_MAX_CONNECTIONS = 512  # beyond this, requests get 503: file descriptors stay well below the usual limit of 1024
# A body goes out in pieces this large, the next once the client took the last; a scrape holds its slot until
# then, so scrapes hold at most max_concurrent_scrapes pieces in our buffers. At 64 KiB a 64-GPU body took 14
# writes, and each one gave the GIL away to a collection pass and waited to get it back: a 1 MiB piece is one write.
_PIECE_BYTES = 1024 * 1024
_BACKLOG = 128  # the default of 5 drops SYNs when 20 scrapers connect at once
_INDEX = b"""<html><head><title>mlwarden exporter</title></head><body>
<h1>mlwarden exporter</h1><p><a href="/metrics">/metrics</a> <a href="/healthz">/healthz</a></p>
</body></html>
"""
_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"
_HEAD_LIMIT = 16 * 1024  # request line and headers; a scraper sends a few hundred bytes
_BODY_LIMIT = 64 * 1024  # read and dropped for routes that refuse it, so it cannot poison a kept-alive connection
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_VARY = ((b"vary", b"accept-encoding"),)
_GZIP_HEADERS = ((b"content-encoding", b"gzip"), *_VARY)

Headers = tuple[tuple[bytes, bytes], ...]


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    headers: dict[bytes, bytes]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class _Response:
    status: HTTPStatus
    body: bytes = b""
    content_type: bytes = _TEXT
    headers: Headers = ()


@dataclass(frozen=True)
class _Answer:
    """A scrape's answer: the body it was made for, its head, and both as one buffer."""

    body: bytes
    head: bytes
    whole: memoryview


def _text(status: HTTPStatus, text: bytes, headers: Headers = ()) -> _Response:
    return _Response(status, text, _TEXT, headers)


class _ScrapeSlots:
    """At most ``size`` scrape bodies being written at once; a scrape that finds none free waits its turn.

    Called on the event loop only, so a counter and a queue of callbacks are enough.
    """

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiting: collections.deque[Callable[[], None]] = collections.deque()

    def locked(self) -> bool:
        return self.free == 0

    def take(self) -> bool:
        if self.free and not self._waiting:
            self.free -= 1
            return True
        return False

    def wait(self, granted: Callable[[], None]) -> Callable[[], None]:
        """Call ``granted`` (holding a slot) when one is released; returns what withdraws the wait."""
        self._waiting.append(granted)
        return lambda: self._withdraw(granted)

    def _withdraw(self, granted: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):  # granted meanwhile
            self._waiting.remove(granted)

    def release(self) -> None:
        if self._waiting:
            self._waiting.popleft()()  # the slot passes on
        else:
            self.free += 1


class _App:
    """Routing, credentials, the scrape bound and fault injection; every answer but a scrape's is made at once."""

    def __init__(self, store: SnapshotStore, max_concurrent_scrapes: int, queue_timeout: float,
                 auth: AuthCheck | None, simulator: SimulatedBackend | None) -> None:
        self.store = store
        self.queue_timeout = queue_timeout
        self.auth = auth
        self.simulator = simulator
        self.scrape_slots = _ScrapeSlots(max_concurrent_scrapes)
        # one thread, made at the first scrape that needs a render: while scrapers keep up with collection,
        # passes are rendered in the collectors' threads and this one never exists
        self.renderer: concurrent.futures.ThreadPoolExecutor | None = None
        self._answers: dict[tuple[bool, bool], _Answer] = {}  # (gzip, keep-alive) -> the latest snapshot's answer

    def route(self, request: _Request) -> _Response | None:
        """The answer; None for a scrape, which :class:`_HttpProtocol` serves from the snapshot."""
        method, path = request.method, request.path
        if method == "POST":
            if not self._authorized(request):
                return _REFUSED
            if path != "/-/simulate" or self.simulator is None:
                return _text(HTTPStatus.NOT_FOUND, b"not found (fault injection needs --gpu-backend simulated)\n")
            return self._simulate(request, self.simulator)
        if method not in ("GET", "HEAD"):
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", ((b"allow", b"GET, HEAD, POST"),))
        if path == "/healthz":
            stale = self.store.stale_collectors()
            if stale:
                return _text(HTTPStatus.SERVICE_UNAVAILABLE, ("stale: " + ", ".join(stale) + "\n").encode())
            return _text(HTTPStatus.OK, b"ok\n")
        if not self._authorized(request):
            return _REFUSED
        if path == "/metrics":
            return None
        if path == "/":
            return _Response(HTTPStatus.OK, _INDEX, b"text/html; charset=utf-8")
        return _text(HTTPStatus.NOT_FOUND, b"not found\n")

    def answer(self, body: bytes, gzipped: bool, keep_alive: bool) -> _Answer:
        """A scrape's answer to ``body``, made once per snapshot and kind: a scrape storm copies nothing."""
        key = (gzipped, keep_alive)
        answer = self._answers.get(key)
        if answer is None or answer.body is not body:
            head = _head(200, _CONTENT_TYPE, len(body), _GZIP_HEADERS if gzipped else _VARY, keep_alive)
            answer = self._answers[key] = _Answer(body, head, memoryview(head + body))
        return answer

    def _authorized(self, request: _Request) -> bool:
        return self.auth is None or self.auth.allows(request.headers.get(b"authorization"))

    def render(self, snapshot: Snapshot, gzipped: bool) -> concurrent.futures.Future[bytes]:
        """Render a snapshot nobody scraped while it was published, in the worker thread, off the event loop."""
        if self.renderer is None:
            self.renderer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        return self.renderer.submit(snapshot.render, gzipped)

    @staticmethod
    def _simulate(request: _Request, simulator: SimulatedBackend) -> _Response:
        length = request.headers.get(b"content-length", b"")
        if not length.isdigit() or not 0 < int(length) <= _MAX_BODY:
            return _text(HTTPStatus.BAD_REQUEST, b"expected a JSON body of at most 4 KiB\n")
        try:
            body: Any = json.loads(request.body)
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            gpu, xid, count = (_integer(body.get(key, default)) for key, default in (("gpu", None), ("xid", 79), ("count", 1)))
            fault, celsius = body.get("fault"), body.get("celsius", OVERHEAT_CELSIUS)
            if not isinstance(celsius, int | float) or isinstance(celsius, bool):
                raise ValueError("celsius must be a number")
            if not isinstance(fault, str):
                raise ValueError("fault must be a string")
            simulator.inject(gpu, fault, xid=xid, count=count, celsius=float(celsius))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return _Response(HTTPStatus.BAD_REQUEST, json.dumps({"error": str(exc)}).encode() + b"\n", _JSON)
        log.info("simulated fault injected: %s", body)
        return _Response(HTTPStatus.OK, b'{"ok": true}\n', _JSON)


_REFUSED = _Response(HTTPStatus.UNAUTHORIZED, b"", _TEXT, ((b"www-authenticate", b'Basic realm="mlwarden"'),))


def _accepts_gzip(header: bytes) -> bool:
    """Whether an Accept-Encoding header lists gzip (or ``*``) without ``q=0``."""
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


def _framing(head: bytes) -> tuple[str, str, bool, dict[bytes, bytes], int]:
    """(method, path, keep-alive, headers, body length) of a request head; _BadRequest for one not taken."""
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
    keep_alive = b"close" not in connection and (http11 or b"keep-alive" in connection)
    return method, path, keep_alive, fields, int(length)


def _head(status: int, content_type: bytes, length: int, headers: Headers, keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d" % (status, _REASONS.get(status, b""), content_type, length)]
    lines += [name + b": " + value for name, value in headers]
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _HttpProtocol(asyncio.Protocol):
    """One client connection: requests in order, each answered before the next is looked at.

    One timer per connection, re-armed only when it fires, enforces ``idle_timeout`` on whatever the
    connection waits for (a request, the rest of one, the client to take a piece of its answer).
    """

    def __init__(self, server: ExporterServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.idle_timeout = server.idle_timeout
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # answering a request: what arrives meanwhile waits in the buffer
        self.eof = False  # the client will send nothing more: close once its requests are answered
        self.keep_alive = True
        self.waiting_since = 0.0  # loop time the current wait began; 0: waiting on nothing the timeout bounds
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False  # the client has not taken what was written
        self.pending: collections.deque[bytes | memoryview] = collections.deque()  # what is left to write
        self.writing = False  # in _write_pending: a resume_writing meanwhile must not write too
        self.holds_slot = False
        self.withdraw: Callable[[], None] | None = None  # stops waiting for a scrape slot

    # connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        connections = self.server.connections
        if len(connections) >= _MAX_CONNECTIONS:
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            transport.close()
            return
        connections.add(self)
        # paused as soon as anything is left unsent: the next piece of a body waits for the client. Not under
        # TLS: Python 3.11's TLS transport with these limits lost answers followed by a close (one run in
        # three of test_bcrypt_users_are_accepted_and_others_refused); its own limits pause above 64 KiB.
        if transport.get_extra_info("sslcontext") is None:
            transport.set_write_buffer_limits(high=0)
        self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.withdraw is not None:
            self.withdraw()
            self.withdraw = None
        self.pending.clear()
        self._release()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _wait(self) -> None:
        """A wait the idle timeout bounds begins now."""
        self.waiting_since = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(self.waiting_since + self.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self.timer = None
        if not self.waiting_since:
            self.timer = self.loop.call_later(self.idle_timeout, self._check_idle)  # waiting for a slot or a render
            return
        due = self.waiting_since + self.idle_timeout
        if self.loop.time() >= due:
            assert self.transport is not None
            self.transport.abort()  # idle, or not reading its answer: nothing worth answering
        else:
            self.timer = self.loop.call_at(due, self._check_idle)

    # requests ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next_request()
        elif len(self.buffer) > _HEAD_LIMIT + _BODY_LIMIT:
            assert self.transport is not None
            self.transport.pause_reading()  # a client sending ahead of its answers waits

    def eof_received(self) -> bool | None:
        self.eof = True
        if not self.busy:
            self.close()
        # half-closed: the answers still due go out, then the connection closes; TLS has no half-close (and
        # asyncio warns of a True there), so its transport closes at once
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def _next_request(self) -> None:
        """Answer the request in the buffer, if it is complete."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        bare = buffer.find(b"\n\n", 0, end if end >= 0 else len(buffer))
        if bare >= 0:
            # Lines ended by LF alone: refused at once (a CRLF head never holds two LFs in a row),
            # rather than left waiting for a CRLF end that never comes until the idle timeout.
            self._refuse(HTTPStatus.BAD_REQUEST)
            return
        if end < 0:
            if len(buffer) > _HEAD_LIMIT:
                # Say why, so a client with oversized headers (a huge cookie, a proxy's) is not left guessing.
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            return
        if end > _HEAD_LIMIT:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            return
        try:
            method, path, keep_alive, headers, length = _framing(bytes(buffer[:end]))
        except _BadRequest as exc:
            self._refuse(exc.status)
            return
        if len(buffer) < end + 4 + length:
            return  # the body is still on its way
        body = bytes(buffer[end + 4:end + 4 + length])
        del buffer[:end + 4 + length]
        self.keep_alive = keep_alive
        self.busy = True
        self.waiting_since = 0.0
        response = self.app.route(_Request(method, path, headers, body))
        if response is None:
            self._scrape(headers.get(b"accept-encoding"), method == "HEAD")
        else:
            self._send(_head(response.status, response.content_type, len(response.body), response.headers, keep_alive)
                       + (b"" if method == "HEAD" else response.body))

    def _refuse(self, status: HTTPStatus) -> None:
        self.keep_alive = False
        self.busy = True
        self.buffer.clear()
        body = f"{status.phrase.lower()}\n".encode()
        self._send(_head(status, _TEXT, len(body), (), False) + body)

    # answers -------------------------------------------------------------------------
    def _scrape(self, accept_encoding: bytes | None, head_only: bool) -> None:
        gzipped = accept_encoding is not None and _accepts_gzip(accept_encoding)
        slots = self.app.scrape_slots

        def granted() -> None:
            if expiry is not None:
                expiry.cancel()
            self.withdraw = None
            self.holds_slot = True
            if self.transport is None or self.transport.is_closing():
                self._release()
                return
            self._serve_snapshot(gzipped, head_only)

        def expired() -> None:
            if self.withdraw is not None:
                self.withdraw()
                self.withdraw = None
                self._send(_head(HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, len(_BUSY), (), self.keep_alive) + _BUSY)

        expiry: asyncio.TimerHandle | None = None
        if slots.take():
            granted()
        else:
            expiry = self.loop.call_later(self.app.queue_timeout, expired)
            self.withdraw = slots.wait(granted)

    def _serve_snapshot(self, gzipped: bool, head_only: bool) -> None:
        snapshot = self.app.store.snapshot
        body = snapshot.ready(gzipped)
        if body is not None:
            self._send_scrape(body, gzipped, head_only)
            return
        # the first scrape of a snapshot nobody scraped while it was published: rendered in a worker
        # thread, so that the loop goes on serving while it waits; scrapes that come meanwhile queue
        # behind it and find it made
        future = asyncio.wrap_future(self.app.render(snapshot, gzipped), loop=self.loop)
        future.add_done_callback(lambda done: self._rendered(done, gzipped, head_only))

    def _rendered(self, done: asyncio.Future[bytes], gzipped: bool, head_only: bool) -> None:
        error = done.exception()
        if error is None:
            self._send_scrape(done.result(), gzipped, head_only)
            return
        log.error("rendering the snapshot failed", exc_info=error)
        assert self.transport is not None
        self.transport.abort()  # its slot is released as the connection goes

    def _send_scrape(self, body: bytes, gzipped: bool, head_only: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            self._release()
            return
        answer = self.app.answer(body, gzipped, self.keep_alive)
        if head_only:
            self._send(answer.head)
        else:
            whole = answer.whole
            self._send(whole[:_PIECE_BYTES], whole[_PIECE_BYTES:])

    def _send(self, first: bytes | memoryview, rest: memoryview | None = None) -> None:
        """Write an answer: the rest of a large body in pieces, each once the client took the one before.

        One large write would be copied whole into the transport's buffer at once, so every slow scraper
        would cost a body's worth of memory; what the kernel takes at once needs no wait at all.
        """
        self.pending.append(first)
        while rest:
            self.pending.append(rest[:_PIECE_BYTES])
            rest = rest[_PIECE_BYTES:]
        self._write_pending()

    def _write_pending(self) -> None:
        assert self.transport is not None
        self.writing = True
        try:
            while self.pending and not self.paused:
                self.transport.write(self.pending.popleft())
        finally:
            self.writing = False
        if self.paused:
            self._wait()  # until the client takes it, bounded by the idle timeout
            return
        self._answered()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.busy and not self.writing:
            self._write_pending()

    def _answered(self) -> None:
        """The whole answer is with the kernel: the next request may come."""
        self._release()
        self.busy = False
        assert self.transport is not None
        if not self.keep_alive:
            self.transport.close()
            return
        self._wait()
        self.transport.resume_reading()
        if self.buffer:
            self._next_request()
        if self.eof and not self.busy:
            self.transport.close()

    def _release(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.app.scrape_slots.release()


_CONTENT_TYPE = CONTENT_TYPE.encode()
_BUSY = b"too many concurrent scrapes\n"


def _listen(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=_BACKLOG)


class ExporterServer:
    """The HTTP/1.1 server: an asyncio protocol in one thread of its own.

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
        self.idle_timeout = idle_timeout
        self.connections: set[_HttpProtocol] = set()
        self.loop = asyncio.new_event_loop()
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
        stopping = self._stopping
        if stopping is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(stopping.set)
            self._thread.join(timeout=5.0)
        self._socket.close()
        if not self._thread.is_alive():
            self.loop.close()
        if self.app.renderer is not None:
            self.app.renderer.shutdown(wait=False)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(_quiet)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await self.loop.create_server(
            lambda: _HttpProtocol(self), sock=self._socket, ssl=self._tls,
            ssl_handshake_timeout=self.idle_timeout if self._tls else None,
        )
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for connection in list(self.connections):
                connection.close()


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Failed TLS handshakes and clients gone mid-write are the clients' business: debug; anything else is ours."""
    exception = context.get("exception")
    if exception is None or isinstance(exception, OSError):  # ssl.SSLError and ConnectionError are OSErrors
        log.debug("http: %s", context.get("message"), exc_info=exception)
    else:
        log.error("http: %s", context.get("message"), exc_info=exception)
