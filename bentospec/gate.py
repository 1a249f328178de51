"""Answer 503 with the engine's state while it cannot serve: one body shape for every route.

BentoML replaces the message of every 5xx an API raises with a generic one; answering before
the API runs keeps "engine is loading" / "engine is dead" visible to clients. The OpenAI and
OPEA apps answer their 503s with :func:`unavailable` too.
"""

from __future__ import annotations

import bentoml
from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentospec.engine import EngineUnavailable, SpecEngine

#: The service's own routes that need the engine.
GATED_PATHS = frozenset({"/generate", "/generate_full"})


def openai_error(status: int, error_type: str, message: str, **fields: object) -> JSONResponse:
    """``status`` in OpenAI's error shape, which the openai SDK parses and other clients can read;
    ``fields`` adds keys such as ``param``."""
    error = {"message": message, "type": error_type, **fields, "code": status}
    return JSONResponse({"error": error}, status_code=status)


def unavailable(message: str) -> JSONResponse:
    return openai_error(503, "ServiceUnavailable", message)


def not_ready(engine: SpecEngine | None) -> JSONResponse | None:
    """503 naming the state of an engine that cannot serve (``None``: not built yet, loading);
    ``None`` once it serves."""
    try:
        if engine is None:
            raise EngineUnavailable("engine is loading")
        engine.require_ready()
    except EngineUnavailable as exc:
        return unavailable(str(exc))
    return None


def engine_failed(engine: SpecEngine | None, exc: Exception) -> JSONResponse:
    """The answer to a request the engine failed under: 503 naming the engine's state when it
    died (the watchdog brings it back), else a JSON 500 with the cause."""
    return not_ready(engine) or openai_error(
        500, "InternalServerError", f"{type(exc).__name__}: {exc}"
    )


class EngineGateMiddleware:
    """503 with the engine's state on :data:`GATED_PATHS` while the engine cannot serve, also
    for a request the engine died under (BentoML would answer it with a generic 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GATED_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            engine: SpecEngine | None = bentoml.get_current_service().engine
        except BentoMLException:  # raised only before the worker has built the service
            engine = None
        if (refusal := not_ready(engine)) is not None:
            await refusal(scope, receive, send)
            return
        replaced = False

        async def send_or_replace(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the failed response's body
            failed = message["type"] == "http.response.start" and message["status"] >= 500
            if failed and (refusal := not_ready(engine)) is not None:
                replaced = True
                await refusal(scope, receive, send)
                return
            await send(message)

        await self.app(scope, receive, send_or_replace)
