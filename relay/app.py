"""The relay's HTTP face (FastAPI): the Alertmanager webhook, health, metrics and read-only views.

``POST /webhook/alertmanager`` answers 200 only after the payload, its state changes and its
delivery jobs are committed; 503 when the store cannot commit (Alertmanager retries 5xx
only); 400 for a payload it cannot use (kept in a dead-letter table); 401 for a bad token.
A body over the limit keeps the alerts that fit (see oversize); 413 only when none does. Background tasks drain the outbox, watch the heartbeat
and prune old records.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlparse

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from mlwarden.relay import intake, oversize, payload, statepage, watchdog
from mlwarden.relay.auth import Credentials
from mlwarden.relay.config import ConfigError, RelayConfig
from mlwarden.relay.groupcommit import GroupCommit
from mlwarden.relay.metrics import RelayMetrics
from mlwarden.relay.notifiers import notifier_for
from mlwarden.relay.notifiers.base import Context, Notifier
from mlwarden.relay.outbox import Outbox
from mlwarden.relay.store.base import DEAD, IntakeRequest, IntakeResult, Store, StoreError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

from mlwarden.logs import RepeatFilter

log = logging.getLogger(__name__)
log.addFilter(RepeatFilter(about=(StoreError,)))  # with the store down, every pass would log the same error

WEBHOOK_PATH = "/webhook/alertmanager"
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # about 30,000 alerts of a usual size
STATE_PAGE_PATH = "/state"
ACK_BODY_LIMIT = 16 * 1024
DEAD_BODY_SHOWN = 64 * 1024  # of each dead payload, in the dead-letter view
WATCHDOG_TICK_SECONDS = 1.0
PRUNE_EVERY_SECONDS = 3600.0
PRUNE_RETRY_SECONDS = 60.0


@dataclass
class Relay:
    """Everything one relay process holds; built by the CLI, or by tests with fakes."""

    config: RelayConfig
    store: Store
    credentials: Credentials
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    workers: int = 4
    clock: Callable[[], float] = time.time
    metrics: RelayMetrics = field(default_factory=RelayMetrics)
    http: httpx.AsyncClient | None = None
    outbox: Outbox | None = None
    watching_since: float = 0.0  # when create_app started watching the Watchdog heartbeat
    load_config: Callable[[], RelayConfig] | None = None  # reads relay.yml again (SIGHUP, POST /-/reload)

    def start_outbox(self) -> Outbox:
        self.http = httpx.AsyncClient(timeout=self.config.delivery.timeout)
        self.outbox = Outbox(
            self.store, self.config.destinations, self._notifiers(self.config), self.config.delivery, self.metrics,
            clock=self.clock, workers=self.workers,
        )
        return self.outbox

    def _notifiers(self, config: RelayConfig) -> dict[str, Notifier]:
        assert self.http is not None
        context = Context(self.http, config.templates, config.delivery.max_alerts_per_message)
        return {name: notifier_for(d, context) for name, d in config.destinations.items()}

    def reload(self) -> RelayConfig:
        """Read relay.yml again and use it from the next webhook and delivery on; raises
        ConfigError (the running config stays) when it does not validate."""
        if self.load_config is None:
            raise ConfigError("this relay was not started from a config file")
        config = self.load_config()
        if self.outbox is not None:
            self.outbox.reconfigure(config.destinations, self._notifiers(config), config.delivery)
        self.config = config
        log.info("relay config reloaded: %d destination(s), %d route(s)", len(config.destinations), len(config.routes))
        return config


class RelayApp:
    """The ASGI app: the webhook straight, everything else through FastAPI.

    FastAPI's middleware stack, routing and endpoint wrapper cost 0.2 ms of CPU per request
    (measured under uvicorn: 0.35 ms for an endpoint that reads the body and answers, 0.14 ms
    for the same on plain ASGI with Starlette's Request and Response), which at 500 webhooks a
    second is a tenth of a core. The webhook uses none of what they add: it reads its own
    headers and body and answers with a ready Response. Its FastAPI route stays, for what is
    not a plain POST to its exact path (a 405 for a GET, for one).

    It also takes webhooks without ASGI at all, from :class:`mlwarden.relay.server.WebhookProtocol`
    (:meth:`admits`, :meth:`take`): the same answers, without a request cycle of uvicorn's.
    """

    def __init__(self, app: FastAPI, relay: Relay, commits: GroupCommit,
                 webhook: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = app
        self._relay = relay
        self._commits = commits
        self._webhook = webhook
        self._rejecting: set[asyncio.Task[Response]] = set()  # referenced until done: the loop holds tasks weakly

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            response = await self._webhook(Request(scope, receive))
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def admits(self, authorization: bytes | None, content_length: int) -> bool:
        """Whether a webhook POST with these headers may go to :meth:`take`: one with the right
        credentials and a body within the limit. The rest (401, a body to trim) goes through ASGI."""
        credentials = None if authorization is None else authorization.decode("latin-1")
        return content_length <= self._relay.max_body_bytes and self._relay.credentials.allows(credentials)

    def take(self, body: bytes, answer: Callable[[Response | Exception], None]) -> None:
        """Take a webhook :meth:`admits` let through and call ``answer`` with what the webhook
        route answers, once that is known (after the commit), or with the exception that
        unexpectedly stopped it."""
        now = self._relay.clock()
        taken = _taken(self._relay, oversize.Trimmed(body), now)
        if isinstance(taken, payload.PayloadError):
            task = asyncio.get_running_loop().create_task(_rejected(self._relay, body, taken, now))
            self._rejecting.add(task)
            task.add_done_callback(functools.partial(self._answer_rejected, answer))
            return
        notification, request = taken
        self._commits.enqueue(request).add_done_callback(functools.partial(self._committed, notification, answer))

    def _committed(self, notification: payload.Notification, answer: Callable[[Response | Exception], None],
                   future: asyncio.Future[IntakeResult | None]) -> None:
        try:
            try:
                result = future.result()
            except StoreError as exc:
                response = _unavailable(self._relay, exc)
            else:
                response = _accepted(self._relay, notification, result)
        except Exception as exc:  # noqa: BLE001 - answered 500 and logged, as uvicorn does for an ASGI app
            answer(exc)
        else:
            answer(response)

    def _answer_rejected(self, answer: Callable[[Response | Exception], None], task: asyncio.Task[Response]) -> None:
        self._rejecting.discard(task)
        if not task.cancelled():
            failure = task.exception()
            answer(failure if isinstance(failure, Exception) else task.result())  # result() raises the rest


def create_app(relay: Relay, background: bool = True) -> RelayApp:
    """The ASGI app. ``background=False`` leaves the outbox and watchdog to the caller (tests)."""
    relay.watching_since = relay.clock()
    relay.metrics.watch_store(relay.store, lambda: relay.config.watchdog, relay.clock, relay.watching_since)
    commits = GroupCommit(relay.store)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        outbox = relay.start_outbox()
        if relay.load_config is not None:
            with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):  # not the main thread
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reload_logged, relay)
        tasks = []
        if background:
            tasks = [asyncio.create_task(outbox.run()), asyncio.create_task(_maintenance(relay))]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await outbox.drain()
        if relay.http is not None:
            await relay.http.aclose()

    app = FastAPI(title="mlwarden relay", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def unauthorized() -> JSONResponse:
        return JSONResponse({"error": "missing or wrong credentials"}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="mlwarden-relay"'})

    @app.post(WEBHOOK_PATH)
    async def webhook(request: Request) -> Response:
        if not relay.credentials.allows(request.headers.get("authorization")):
            relay.metrics.webhooks.labels("unauthorized").inc()
            return unauthorized()
        trimmed = await oversize.read_webhook(request.stream(), relay.max_body_bytes)
        if trimmed is None:
            relay.metrics.webhooks.labels("too_large").inc()
            return JSONResponse({"error": f"not even one alert fits in {relay.max_body_bytes} bytes"}, status_code=413)
        return await _accept(relay, commits, trimmed)

    @app.post("/-/reload")
    async def reload(request: Request) -> Response:
        if not relay.credentials.allows(request.headers.get("authorization")):
            return unauthorized()
        try:
            config = await asyncio.to_thread(relay.reload)
        except ConfigError as exc:
            log.error("relay config not reloaded, the running one stays: %s", exc)
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"status": "reloaded", "destinations": len(config.destinations), "routes": len(config.routes)})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            await asyncio.to_thread(relay.store.ping)
        except StoreError as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        # In a thread: the registry reads the store (outbox depth, watchdog) for its gauges.
        text = await asyncio.to_thread(generate_latest, relay.metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/state")
    async def state(request: Request) -> Response:
        if not relay.credentials.allows(request.headers.get("authorization")):
            return unauthorized()
        return await _view(lambda: {"keys": [s.to_dict() for s in relay.store.key_states()]})

    @app.post("/api/v1/keys/{key}/ack")
    async def ack(key: str, request: Request) -> Response:
        """Stop the escalation of ``key`` until it resolves. JSON ``{"by": ..., "comment": ...}``,
        or the state page's form (answered with a redirect back to it)."""
        if not relay.credentials.allows(request.headers.get("authorization")):
            return unauthorized()
        form = request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
        origin = request.headers.get("origin")
        if form and origin and urlparse(origin).netloc != request.headers.get("host"):
            # A browser sends basic credentials with any site's form: only the state page's own may ack.
            return JSONResponse({"error": "cross-site form refused"}, status_code=403)
        raw = await _read_body(request, ACK_BODY_LIMIT)
        try:
            # The form is parsed here: Starlette's own form parser needs python-multipart.
            fields = {k: v[0] for k, v in parse_qs(raw.decode()).items()} if form and raw else json.loads(raw or b"")
        except (ValueError, AttributeError):
            fields = None
        if not isinstance(fields, dict):
            return JSONResponse({"error": "expected a JSON object or a form with by and comment"}, status_code=400)
        by, comment = str(fields.get("by") or "").strip()[:200], str(fields.get("comment") or "").strip()[:1000]
        if not by:
            return JSONResponse({"error": "'by' (who acknowledges) is required"}, status_code=400)
        try:
            state = await asyncio.to_thread(relay.store.acknowledge, key, by, comment, relay.clock())
        except StoreError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        if state is None:
            return JSONResponse({"error": "no such key firing (it resolved, or never fired)"}, status_code=404)
        log.info("key %s acknowledged by %s: escalation stopped at level %d", key, by, state.level)
        if form:
            return RedirectResponse(STATE_PAGE_PATH, status_code=303)
        return JSONResponse(state.to_dict())

    @app.get(STATE_PAGE_PATH)
    async def state_page(request: Request) -> Response:
        if not relay.credentials.allows(request.headers.get("authorization")):
            if relay.credentials.accepts_basic:  # let a browser ask for the basic credentials
                return JSONResponse({"error": "missing or wrong credentials"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="mlwarden-relay"'})
            return unauthorized()
        try:
            states = await asyncio.to_thread(relay.store.key_states)
        except StoreError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return HTMLResponse(statepage.render(states, relay.clock()))

    @app.get("/api/v1/dead-letters")
    async def dead_letters(request: Request) -> Response:
        """Payloads that could not be used and deliveries that failed for good, each with its reason."""
        if not relay.credentials.allows(request.headers.get("authorization")):
            return unauthorized()

        def read() -> dict[str, object]:
            deliveries = [{**j.to_dict(), "reason": j.last_error} for j in relay.store.jobs() if j.status == DEAD]
            payloads = [p.to_dict(DEAD_BODY_SHOWN) for p in relay.store.dead_payloads()]
            return {"payloads": payloads, "deliveries": deliveries}

        return await _view(read)

    @app.post("/api/v1/dead-letters/{job_id}/retry")
    async def retry_dead_letter(job_id: str, request: Request) -> Response:
        if not relay.credentials.allows(request.headers.get("authorization")):
            return unauthorized()
        try:
            job = await asyncio.to_thread(relay.store.retry_dead, job_id, relay.clock())
        except StoreError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        if job is None:
            return JSONResponse({"error": "no dead-lettered delivery with that id"}, status_code=404)
        log.info("dead-lettered delivery %s to %s queued again by an operator", job_id, job.destination)
        if relay.outbox is not None:
            relay.outbox.wake()
        return JSONResponse(job.to_dict())

    @app.get("/api/v1/outbox")
    async def outbox(request: Request) -> Response:
        if not relay.credentials.allows(request.headers.get("authorization")):
            return unauthorized()

        def queue() -> dict[str, object]:
            depth, oldest = relay.store.outbox_stats()
            return {"depth": depth, "oldest_created_at": oldest, "jobs": [j.to_dict() for j in relay.store.jobs()]}

        return await _view(queue)

    return RelayApp(app, relay, commits, webhook)


async def _view(read: Callable[[], dict[str, object]]) -> JSONResponse:
    """``read`` runs in a thread, like every store call the handlers make: a store that stalls
    must not stop the event loop."""
    try:
        return JSONResponse(await asyncio.to_thread(read))
    except StoreError as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed ``limit`` (never buffering more)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def _accept(relay: Relay, commits: GroupCommit, trimmed: oversize.Trimmed) -> Response:
    now = relay.clock()
    taken = _taken(relay, trimmed, now)
    if isinstance(taken, payload.PayloadError):
        return await _rejected(relay, trimmed.body, taken, now)
    notification, request = taken
    try:
        result = await commits.submit(request)
    except StoreError as exc:
        return _unavailable(relay, exc)
    return _accepted(relay, notification, result)


def _taken(
    relay: Relay, trimmed: oversize.Trimmed, now: float
) -> tuple[payload.Notification, IntakeRequest] | payload.PayloadError:
    """The webhook parsed and planned for the store, or why its payload cannot be used."""
    config = relay.config  # one config for the whole webhook, should a reload land meanwhile
    try:
        notification = payload.parse(trimmed.body)
    except payload.PayloadError as exc:
        return exc
    if trimmed.omitted_alerts:
        # Kept what fits rather than answer 413: Alertmanager never retries a 4xx.
        notification = dataclasses.replace(notification, omitted_alerts=trimmed.omitted_alerts)
        relay.metrics.omitted.inc(trimmed.omitted_alerts)
        log.warning("webhook over %d bytes: kept %d alert(s) of group %s, left out %d (%d bytes)",
                    relay.max_body_bytes, len(notification.alerts), notification.group_key,
                    trimmed.omitted_alerts, trimmed.dropped_bytes)
    return notification, intake.request(notification, trimmed.body, now, config)


async def _rejected(relay: Relay, body: bytes, exc: payload.PayloadError, now: float) -> Response:
    relay.metrics.webhooks.labels("invalid").inc()
    relay.metrics.dead_letters.labels("invalid_payload").inc()
    try:
        await asyncio.to_thread(relay.store.dead_letter_payload, body, str(exc), now)
    except StoreError as store_exc:
        log.error("cannot keep an invalid payload: %s", store_exc)
    log.warning("rejected webhook payload: %s", exc)
    return JSONResponse({"error": str(exc)}, status_code=400)


def _unavailable(relay: Relay, exc: StoreError) -> Response:
    relay.metrics.webhooks.labels("unavailable").inc()
    log.error("cannot store webhook, answering 503 so Alertmanager retries: %s", exc)
    return JSONResponse({"error": "state store unavailable, retry later"}, status_code=503)


def _accepted(relay: Relay, notification: payload.Notification, result: IntakeResult | None) -> Response:
    if result is None:
        relay.metrics.webhooks.labels("duplicate").inc()
        return JSONResponse({"status": "duplicate"})
    relay.metrics.webhooks.labels("accepted").inc()
    if notification.truncated_alerts:
        log.warning("Alertmanager left %d alert(s) out of group %s (its max_alerts); they were not seen",
                    notification.truncated_alerts, notification.group_key)
    for status, count in Counter(alert.status for alert in notification.alerts).items():
        relay.metrics.alerts.labels(status).inc(count)
    for decision in result.decisions:
        if decision.action == "suppress":
            relay.metrics.suppressed.labels(decision.severity).inc()
        if decision.escalated:
            relay.metrics.escalations.labels(decision.severity).inc()
    if relay.outbox is not None and result.jobs:
        relay.outbox.wake()
    # Written by hand: JSONResponse's encoder costs more than the rest of the answer, at every webhook.
    return Response(f'{{"status":"accepted","jobs":{len(result.jobs)}}}', media_type="application/json")


def _reload_logged(relay: Relay) -> None:
    try:
        relay.reload()
    except ConfigError as exc:
        log.error("SIGHUP: relay config not reloaded, the running one stays: %s", exc)


async def _maintenance(relay: Relay) -> None:
    """Watch the heartbeat every second; prune old records every hour."""
    await asyncio.gather(_watch_heartbeat(relay), _prune(relay))


async def _watch_heartbeat(relay: Relay) -> None:
    while True:
        try:
            heartbeat = relay.config.watchdog  # read at every tick: a reload may add or drop it
            if heartbeat is not None:
                # In a thread, like the prune: a store that hangs (Redis, for its 5 s timeout) must
                # not freeze the event loop every tick.
                await asyncio.to_thread(watchdog.check, relay.store, heartbeat, relay.clock(), relay.watching_since)
                if relay.outbox is not None:
                    relay.outbox.wake()
        except StoreError as exc:
            log.error("watchdog: %s", exc)
        except Exception:  # noqa: BLE001 - a dead loop would silence the watchdog for good
            log.exception("watchdog pass failed; trying again in %ss", WATCHDOG_TICK_SECONDS)
        await asyncio.sleep(WATCHDOG_TICK_SECONDS)


async def _prune(relay: Relay) -> None:
    """In a thread: the first prune after an upgrade or a long stop may delete a week of records,
    and neither intake nor the watchdog may wait for it (the stores make that safe, see Store.prune)."""
    while True:
        pause = PRUNE_EVERY_SECONDS
        try:
            await asyncio.to_thread(relay.store.prune, relay.clock())
        except StoreError as exc:
            log.error("prune: %s; trying again in %ss", exc, PRUNE_RETRY_SECONDS)
            pause = PRUNE_RETRY_SECONDS
        except Exception:  # noqa: BLE001 - a dead loop would let the store grow for good
            log.exception("prune failed; trying again in %ss", PRUNE_RETRY_SECONDS)
            pause = PRUNE_RETRY_SECONDS
        await asyncio.sleep(pause)
