"""Answer 503 with the engine's state while it cannot serve: one body shape for every route.

BentoML replaces the message of every 5xx an API raises with a generic one; answering before
the API runs keeps "engine is loading" / "engine is dead" visible to clients. The OpenAI and
OPEA apps answer their 503s with :func:`unavailable` too.
"""

from __future__ import annotations

import bentoml
from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from bentospec.engine import EngineUnavailable

#: The service's own routes that need the engine.
GATED_PATHS = frozenset({"/generate", "/generate_full"})


def openai_error(status: int, error_type: str, message: str, **fields: object) -> JSONResponse:
    """``status`` in OpenAI's error shape, which the openai SDK parses and other clients can read;
    ``fields`` adds keys such as ``param``."""
    error = {"message": message, "type": error_type, **fields, "code": status}
    return JSONResponse({"error": error}, status_code=status)


def unavailable(message: str) -> JSONResponse:
    return openai_error(503, "ServiceUnavailable", message)


class EngineGateMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in GATED_PATHS:
            try:
                service = bentoml.get_current_service()
            except BentoMLException:  # raised only before the worker has built the service
                await unavailable("engine is loading")(scope, receive, send)
                return
            try:
                service.engine.llm  # noqa: B018 - raises unless ready
            except EngineUnavailable as exc:
                await unavailable(str(exc))(scope, receive, send)
                return
        await self.app(scope, receive, send)
