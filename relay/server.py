"""The relay's HTTP server: uvicorn's httptools protocol, with a short way in for the webhook.

Under uvicorn every request is an ASGI cycle: a request-cycle object and an event, a task
that runs the app behind uvicorn's proxy-headers middleware, ``receive`` and ``send``
messages, a Request and a Response. For the webhook, all of that cost more CPU than the
relay's own work on the event loop (measured under paced load on a stand-in: 0.27-0.31 ms
per request through uvicorn's cycle against 0.10-0.15 ms without it), and at 500 webhooks a
second the event loop and the writer thread share one core's worth of GIL: every tenth of
a millisecond per webhook is queueing, and queueing is the acknowledgement p99.

So a plain webhook POST (the exact path, a Content-Length within the limit, credentials that
pass, no Expect or Transfer-Encoding, no earlier request of the connection still unanswered)
is read by this protocol and handed to :meth:`RelayApp.take`, which answers it through a
callback once its batch is committed. Everything else, the webhook's rarer answers (401, a
body to trim, 405) included, goes through uvicorn's ASGI cycle and FastAPI as before, on the
same connection. Parsing, keep-alive, pipelining, flow control, limits and graceful shutdown
stay uvicorn's: to its protocol, a webhook taken here is a request cycle that answers without
a task (see :class:`_Webhook`).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from mlwarden.relay.app import WEBHOOK_PATH, RelayApp
from starlette.responses import Response
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

_WEBHOOK_URL = WEBHOOK_PATH.encode()
_SERVER_ERROR = (
    500, [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")], b"Internal Server Error",
)


class _NothingWaits:
    """The request cycle's event: uvicorn sets it on a disconnect to wake an app reading the body."""

    def set(self) -> None:
        """A webhook taken here reads nothing after its end: nobody to wake."""


_NOTHING_WAITS = _NothingWaits()


class _Webhook:
    """A webhook on the short way: what uvicorn's protocol reads of a request cycle
    (``response_complete``, ``disconnected``, ``keep_alive``, ``message_event``), and its body."""

    __slots__ = ("body", "disconnected", "keep_alive", "response_complete")
    message_event = _NOTHING_WAITS

    def __init__(self, keep_alive: bool) -> None:
        self.body = bytearray()
        self.keep_alive = keep_alive
        self.disconnected = False
        self.response_complete = False


class WebhookProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (``uvicorn.run(..., http=WebhookProtocol)``); the short way
    is taken only when the app is a :class:`RelayApp`."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._relay = config.app if isinstance(config.app, RelayApp) else None

    def on_headers_complete(self) -> None:
        webhook = self._short_way()
        if webhook is None:
            super().on_headers_complete()
        else:
            self.cycle = webhook  # type: ignore[assignment]  # duck-typed: uvicorn reads only what _Webhook has

    def _short_way(self) -> _Webhook | None:
        """A :class:`_Webhook` for this request, or None: it goes through ASGI."""
        if (
            self._relay is None or self.url != _WEBHOOK_URL or self.parser.get_method() != b"POST"
            or self.limit_concurrency is not None or self.parser.should_upgrade()
            or (self.cycle is not None and not self.cycle.response_complete)  # pipelined: uvicorn queues it
        ):
            return None
        length: bytes | None = None
        authorization: bytes | None = None
        for name, value in self.headers:  # names lowercased by uvicorn
            if name == b"content-length":
                if length is not None:
                    return None
                length = value
            elif name == b"authorization":
                if authorization is None:  # the first one, as Starlette's headers.get reads it
                    authorization = value
            elif name in (b"transfer-encoding", b"expect"):
                return None
        if length is None or not length.isdigit() or not self._relay.admits(authorization, int(length)):
            return None
        return _Webhook(self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        webhook: object = self.cycle  # a RequestResponseCycle to uvicorn's typing, or ours
        if isinstance(webhook, _Webhook):
            webhook.body += body  # at most the admitted Content-Length: the parser stops there
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        webhook: object = self.cycle
        if not isinstance(webhook, _Webhook):
            super().on_message_complete()
            return
        assert self._relay is not None  # a _Webhook is only made with a RelayApp
        answer = functools.partial(self._answer, webhook)
        body, webhook.body = bytes(webhook.body), bytearray()
        try:
            self._relay.take(body, answer)
        except Exception as exc:  # noqa: BLE001 - raised inside the parser, it would read as a bad request
            answer(exc)

    def _answer(self, webhook: _Webhook, outcome: Response | Exception) -> None:
        if webhook.disconnected or self.transport.is_closing():
            return  # stored all the same, as through ASGI: nobody left to tell
        if isinstance(outcome, Exception):
            self.logger.error("Exception in ASGI application\n", exc_info=outcome)
            status, headers, body = _SERVER_ERROR
            webhook.keep_alive = False
        else:
            status, headers, body = outcome.status_code, outcome.raw_headers, bytes(outcome.body)
        content = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            content += (name, b": ", value, b"\r\n")
        if not webhook.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", body)
        self.transport.write(b"".join(content))
        webhook.response_complete = True
        if not webhook.keep_alive:
            self.transport.close()
        self.on_response_complete()
