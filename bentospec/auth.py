"""Bearer-token authentication for every route but probes and metrics.

Enabled by ``BENTOSPEC_API_KEY`` (:data:`bentospec.settings.API_KEY`); the key is compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from bentospec import settings

#: Routes that stay open so that orchestrators can probe and scrape without the key.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


class APIKeyMiddleware:
    """ASGI middleware: 401 unless ``Authorization: Bearer <key>`` matches ``BENTOSPEC_API_KEY``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        key = settings.API_KEY.get()
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self._expected is None
            or scope["type"] == "lifespan"
            or scope["path"] in OPEN_PATHS
            or hmac.compare_digest(self._authorization(scope), self._expected)
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": "missing or invalid API key (Authorization: Bearer <key>)"})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    @staticmethod
    def _authorization(scope: Scope) -> bytes:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return value
        return b""
