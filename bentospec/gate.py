"""Answer the service's own APIs with 503 and the engine's state while it cannot serve.

BentoML replaces the message of every 5xx an API raises with a generic one; answering before
the API runs keeps "engine is loading" / "engine is dead" visible to clients. (The OpenAI and
OPEA apps answer 503 with the same message themselves.)
"""

from __future__ import annotations

import bentoml
from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from bentospec.engine import EngineUnavailable

#: The service's own routes that need the engine.
GATED_PATHS = frozenset({"/generate", "/generate_full"})


class EngineGateMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in GATED_PATHS:
            try:
                bentoml.get_current_service().engine.llm  # noqa: B018 - raises unless ready
            except (EngineUnavailable, BentoMLException) as exc:
                detail = str(exc) if isinstance(exc, EngineUnavailable) else "engine is loading"
                await JSONResponse({"error": detail}, status_code=503)(scope, receive, send)
                return
        await self.app(scope, receive, send)
