"""What a client sees while the engine cannot serve, on every API: a retryable 503.

New requests: BentoML replaces the message of every 5xx an API raises with a generic one, so
the service's own routes are answered 503 naming the engine's state before the API runs (the
OpenAI and OPEA apps answer theirs with :func:`not_ready` too). Requests the engine dies under:
whatever the API was about to answer (vLLM's "EngineCore encountered an issue" as a 500 or as
an SSE error event, BentoML's generic 500, OPEA's error event) becomes "the engine restarted;
retry" (:data:`bentospec.errors.ENGINE_RESTARTED`), in one place, :class:`EngineGateMiddleware`.
"""

from __future__ import annotations

import json

import bentoml
from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentospec.engine import SpecEngine
from bentospec.errors import (
    EngineUnavailable,
    openai_error,
    restarted,
    restarted_event,
    unavailable,
)

#: The service's own routes that need the engine.
GATED_PATHS = frozenset({"/generate", "/generate_full"})


def not_ready(engine: SpecEngine | None) -> JSONResponse | None:
    """503 naming the state of an engine that cannot serve (``None``: not built yet, loading);
    ``None`` once it serves."""
    try:
        if engine is None:
            raise EngineUnavailable("engine is loading")
        engine.require_ready()
    except EngineUnavailable as exc:
        return unavailable(exc)
    return None


def engine_failed(engine: SpecEngine | None, exc: Exception) -> JSONResponse:
    """The answer to a request the engine failed under: 503 "the engine restarted; retry" when
    it died (the watchdog brings it back), else a JSON 500 with the cause."""
    if not_ready(engine) is not None:
        return restarted()
    return openai_error(500, "InternalServerError", f"{type(exc).__name__}: {exc}")


class EngineGateMiddleware:
    """503 with the engine's state on :data:`GATED_PATHS` while the engine cannot serve; for
    every request the engine dies under (any POST admitted while it served), the retryable
    answer of :class:`_OutageSend` instead of a 5xx."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            engine: SpecEngine | None = bentoml.get_current_service().engine
        except BentoMLException:  # raised only before the worker has built the service
            engine = None
        if (refusal := not_ready(engine)) is not None:
            # The OpenAI and OPEA apps answer with the same 503 themselves.
            app = refusal if scope["path"] in GATED_PATHS else self.app
            await app(scope, receive, send)
            return
        await self.app(scope, receive, _OutageSend(engine, scope, receive, send))


class _OutageSend:
    """``send`` of a request admitted while ``engine`` served. Once the engine is down:

    - a 5xx before the response started becomes :func:`bentospec.errors.restarted`;
    - an SSE error event with a 5xx code (vLLM's, OPEA's) becomes
      :func:`bentospec.errors.restarted_event`;
    - any other stream (``/generate``'s raw text, which has no place for an error) ends without
      its last chunk, so its client sees a broken transfer rather than a complete answer.
    """

    def __init__(self, engine: SpecEngine | None, scope: Scope, receive: Receive, send: Send):
        self._engine = engine
        self._scope = scope
        self._receive = receive
        self._send = send
        self._dropped = False
        self._events = False
        self._chunked = False

    def _down(self) -> bool:
        return not_ready(self._engine) is not None

    async def __call__(self, message: Message) -> None:
        if self._dropped:
            return  # the rest of a replaced or cut response
        if message["type"] == "http.response.start":
            if message["status"] >= 500 and self._down():
                self._dropped = True
                await restarted()(self._scope, self._receive, self._send)
                return
            headers = dict(message.get("headers", ()))
            # BentoML labels /generate's raw text stream text/event-stream too.
            self._events = self._scope["path"] not in GATED_PATHS and headers.get(
                b"content-type", b""
            ).startswith(b"text/event-stream")
            self._chunked = b"content-length" not in headers
        elif message["type"] == "http.response.body":
            body: bytes = message.get("body", b"")
            if self._events:
                if b'"error"' in body and self._down():
                    message = {**message, "body": _restarted_events(body)}
            elif self._chunked and not message.get("more_body", False) and self._down():
                self._dropped = True
                return
        await self._send(message)


def _restarted_events(body: bytes) -> bytes:
    """``body`` (SSE) with each error event of a 5xx code replaced by the restarted event."""
    events = body.split(b"\n\n")
    for i, event in enumerate(events):
        if not event.startswith(b"data: "):
            continue
        try:
            payload = json.loads(event.removeprefix(b"data: "))
        except ValueError:
            continue
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and _server_error(error.get("code")):
            events[i] = b"data: " + json.dumps(restarted_event()).encode()
    return b"\n\n".join(events)


def _server_error(code: object) -> bool:
    return not isinstance(code, int) or code >= 500
