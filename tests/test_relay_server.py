"""The relay's HTTP server (relay/server.py) under real uvicorn: the webhook's short way past the
ASGI cycle gives the answers the FastAPI route gives, and leaves uvicorn's keep-alive,
pipelining, fallbacks and graceful shutdown as they were."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from mlwarden.relay.app import WEBHOOK_PATH, Relay, RelayApp, create_app
from mlwarden.relay.auth import Credentials
from mlwarden.relay.server import WebhookProtocol
from mlwarden.relay.store.sqlite import SQLiteStore

from mlwarden import components
from tests.test_relay_app import AUTH, BAD_INPUTS, BrokenStore
from tests.test_relay_support import TOKEN, FakeClock, alert, body, make_config


class Server:
    """The relay app under uvicorn with the relay's protocol, in a thread, as the CLI runs it."""

    def __init__(self, tmp_path: Path, store: SQLiteStore | None = None) -> None:
        self.relay = Relay(make_config(), store or SQLiteStore(tmp_path / "relay.db"),
                           Credentials(TOKEN, "am", "basic-pass"), clock=FakeClock())
        self.app = create_app(self.relay, background=False)
        self.through_asgi: list[tuple[str, str]] = []  # (method, path) of each request the ASGI app got
        self.port = components.free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, http=WebhookProtocol, log_config=None,
                                timeout_graceful_shutdown=10)
        config.load()
        asgi = config.loaded_app

        async def spied(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                self.through_asgi.append((scope["method"], scope["path"]))
            await asgi(scope, receive, send)

        config.loaded_app = spied  # what uvicorn's ASGI cycles call; the protocol finds the RelayApp in config.app
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        components.wait_until(lambda: self.server.started, 20, "uvicorn started")

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.relay.store.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path)
    yield running
    running.stop()


def post(connection: http.client.HTTPConnection, raw: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection.request("POST", WEBHOOK_PATH, body=raw, headers=AUTH if headers is None else headers)
    response = connection.getresponse()
    return response.status, response.read()


def test_a_plain_webhook_skips_the_asgi_cycle_and_is_stored_before_its_answer(server: Server) -> None:
    status, answer = post(server.connect(), body(alert(instance="n1"), alert(instance="n2")))
    assert (status, json.loads(answer)) == (200, {"status": "accepted", "jobs": 2})
    assert len(server.relay.store.jobs()) == 2  # committed before the answer
    assert server.through_asgi == []


def test_the_short_way_gives_the_routes_answers_to_bad_input(server: Server, tmp_path: Path) -> None:
    # The same inputs as the ASGI route's test: 401s and the 413 go through ASGI, 400s the short way.
    with TestClient(create_app(Relay(make_config(), SQLiteStore(tmp_path / "asgi.db"), Credentials(TOKEN),
                                     clock=FakeClock()), background=False)) as client:
        for name, raw, headers, status in BAD_INPUTS:
            expected = client.post(WEBHOOK_PATH, content=raw, headers=headers)
            got = post(server.connect(), raw, headers)
            assert (got[0], json.loads(got[1])) == (status, expected.json()), name
    invalid = [b for n, b, h, s in BAD_INPUTS if s == 400]
    assert [row[0] for row in server.relay.store._read("SELECT body FROM dead_payloads")] == invalid  # type: ignore[attr-defined]  # the SQLite store's private reader, to see what it kept
    assert ("POST", WEBHOOK_PATH) in server.through_asgi  # the 401s and the 413
    assert len(server.through_asgi) == len([s for *_, s in BAD_INPUTS if s != 400])


def test_one_connection_mixes_webhooks_and_other_routes(server: Server) -> None:
    connection = server.connect()
    assert post(connection, body(alert(instance="n1")))[0] == 200
    connection.request("GET", "/healthz")
    assert json.loads(connection.getresponse().read()) == {"status": "ok"}
    assert post(connection, body(alert(instance="n2")))[0] == 200
    connection.request("GET", WEBHOOK_PATH)
    response = connection.getresponse()
    assert (response.status, response.read()) == (405, b'{"detail":"Method Not Allowed"}')  # FastAPI's route, as before
    assert post(connection, body(alert(instance="n3")))[0] == 200
    assert len(server.relay.store.jobs()) == 3
    assert server.through_asgi == [("GET", "/healthz"), ("GET", WEBHOOK_PATH)]


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` HTTP/1.1 responses with a Content-Length, in the order they came."""
    data = b""
    responses = []
    while len(responses) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(responses)} response(s)"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
        while len(data) < length:
            data += sock.recv(65536)
        responses.append((int(lines[0].split()[1]), data[:length]))
        data = data[length:]
    return responses


def raw_post(raw: bytes, *extra: str) -> bytes:
    head = [f"POST {WEBHOOK_PATH} HTTP/1.1", "Host: relay", f"Authorization: Bearer {TOKEN}", *extra]
    if not any(h.lower().startswith("transfer-encoding") for h in extra):
        head.append(f"Content-Length: {len(raw)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw_post(body(alert(instance="n1"))) + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
                     + raw_post(body(alert(instance="n2"), alert(instance="n3"))) + raw_post(b"{"))
        answers = read_responses(sock, 4)
    assert [status for status, _ in answers] == [200, 200, 200, 400]
    assert [json.loads(b) for _, b in answers[:3]] == [
        {"status": "accepted", "jobs": 1}, {"status": "ok"}, {"status": "accepted", "jobs": 2}]
    assert len(server.relay.store.jobs()) == 3


def test_chunked_and_expect_continue_webhooks_go_through_asgi_and_are_accepted(server: Server) -> None:
    raw = body(alert(instance="n1"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw_post(b"", "Transfer-Encoding: chunked") + b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw))
        assert read_responses(sock, 1)[0][0] == 200
    connection = server.connect()
    connection.request("POST", WEBHOOK_PATH, body=body(alert(instance="n2")), headers={**AUTH, "Expect": "100-continue"})
    assert connection.getresponse().status == 200  # http.client sends the body without waiting for the 100
    assert len(server.relay.store.jobs()) == 2 and len(server.through_asgi) == 2


def test_an_http_1_0_webhook_is_answered_and_its_connection_closed(server: Server) -> None:
    raw = body(alert(instance="n1"))
    request = (f"POST {WEBHOOK_PATH} HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):  # ends only when the server closes the connection
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and b"connection: close" in received.lower()
    assert server.through_asgi == []


def test_store_failure_answers_503_on_the_short_way(tmp_path: Path) -> None:
    running = Server(tmp_path, BrokenStore(tmp_path / "relay.db"))
    try:
        status, answer = post(running.connect(), body(alert()))
    finally:
        running.stop()
    assert (status, json.loads(answer)) == (503, {"error": "state store unavailable, retry later"})
    assert running.through_asgi == []


class FailingStore(SQLiteStore):
    def intake_batch(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")


def test_an_unexpected_error_answers_500_and_closes_the_connection(tmp_path: Path) -> None:
    running = Server(tmp_path, FailingStore(tmp_path / "relay.db"))
    try:
        connection = running.connect()
        status, answer = post(connection, body(alert()))
        assert (status, answer) == (500, b"Internal Server Error")
        assert connection.sock is None  # http.client saw "connection: close"
        connection.request("GET", "/healthz")  # a new connection: the server itself goes on
        assert connection.getresponse().status == 200
    finally:
        running.stop()


class HeldStore(SQLiteStore):
    """Commits only once ``release`` is set; ``entered`` says a commit is waiting."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()

    def intake_batch(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.release.wait(20)
        return super().intake_batch(*args, **kwargs)


def test_a_webhook_in_flight_at_shutdown_is_committed_and_answered_before_the_server_stops(tmp_path: Path) -> None:
    store = HeldStore(tmp_path / "relay.db")
    running = Server(tmp_path, store)
    answers: list[tuple[int, str | None]] = []

    def send() -> None:
        connection = running.connect()
        connection.request("POST", WEBHOOK_PATH, body=body(alert()), headers=AUTH)
        response = connection.getresponse()
        answers.append((response.status, response.getheader("connection")))

    client = threading.Thread(target=send)
    client.start()
    assert store.entered.wait(20)
    running.server.should_exit = True
    threading.Timer(0.5, store.release.set).start()  # the shutdown has begun: it must wait for this answer
    running.thread.join(timeout=20)
    client.join(timeout=20)
    assert not running.thread.is_alive()
    assert answers == [(200, "close")]
    assert len(store.jobs()) == 1
    store.close()


def test_a_webhook_whose_client_left_is_stored_all_the_same(tmp_path: Path) -> None:
    store = HeldStore(tmp_path / "relay.db")
    running = Server(tmp_path, store)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:
            sock.sendall(raw_post(body(alert())))
            assert store.entered.wait(20)
        store.release.set()  # the client is gone: the commit goes on, and nothing is written to it
        components.wait_until(lambda: len(store.jobs()) == 1, 20, "the webhook stored")
        assert post(running.connect(), body(alert(instance="n9")))[0] == 200  # and the server serves on
    finally:
        running.stop()


def test_only_a_relay_app_gets_the_short_way(tmp_path: Path) -> None:
    app = create_app(Relay(make_config(), SQLiteStore(tmp_path / "relay.db"), Credentials(TOKEN), clock=FakeClock()))
    assert isinstance(app, RelayApp)
    assert not app.admits(b"Bearer nope", 10) and not app.admits(None, 10)
    assert app.admits(f"Bearer {TOKEN}".encode(), 10) and not app.admits(f"Bearer {TOKEN}".encode(), 1 << 40)


SMUGGLING = [
    ("two lengths", f"Content-Length: 5\r\nContent-Length: 6\r\nAuthorization: Bearer {TOKEN}"),
    ("length and chunked", f"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer {TOKEN}"),
    ("length not a number", f"Content-Length: 5x\r\nAuthorization: Bearer {TOKEN}"),
]


@pytest.mark.parametrize(("name", "headers"), SMUGGLING, ids=[s[0] for s in SMUGGLING])
def test_ambiguous_framing_is_refused_and_nothing_stored(server: Server, name: str, headers: str) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: relay\r\n{headers}\r\n\r\n".encode() + body(alert()))
        received = b""
        while chunk := sock.recv(65536):  # uvicorn answers 400 and closes
            received += chunk
    assert received.startswith(b"HTTP/1.1 400"), name
    assert server.relay.store.jobs() == [] and server.through_asgi == []
