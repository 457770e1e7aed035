"""Local stand-ins for Slack and PagerDuty that record what they receive.

They speak just enough of each API for the relay to treat them as the real thing (Slack
answers ``ok``, PagerDuty answers 202 with the dedup key) and keep every request so the
end-to-end test can assert on it and the demo can print it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mlwarden.components import LOOPBACK


@dataclass(frozen=True)
class Received:
    path: str
    body: dict[str, Any]
    at: float


@dataclass
class Sink:
    """An HTTP server on loopback that records JSON POSTs and answers like ``kind`` would."""

    kind: str  # "slack" | "pagerduty"
    on_receive: Callable[[Sink, Received], None] | None = None
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "sink not started"
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> Sink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_unparsable": raw.decode(errors="replace")}
                item = Received(path=self.path, body=body, at=time.time())
                with sink._lock:
                    sink.received.append(item)
                if sink.on_receive is not None:
                    sink.on_receive(sink, item)
                if sink.kind == "pagerduty":
                    reply = {"status": "success", "message": "Event processed", "dedup_key": body.get("dedup_key", "")}
                    self._answer(202, json.dumps(reply).encode(), "application/json")
                else:
                    self._answer(200, b"ok", "text/plain")

            def _answer(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # quiet: the demo prints its own lines
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name=f"{self.kind}-sink", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
