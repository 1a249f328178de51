"""Server-sent events as OPEA clients read them: ``data: {json}`` events, then ``data: [DONE]``.

A stream that fails part-way still ends the way clients expect (an error event in OpenAI's
error shape, then ``[DONE]``; one the engine died under says "the engine restarted; retry",
:mod:`bentospec.gate`), and a stream that is quiet for a while (queued behind other requests, a long
prefill) sends SSE comments so that proxies do not close it as idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from bentospec.errors import openai_body

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
#: An SSE comment: clients ignore it, proxies see traffic.
KEEPALIVE = ": keep-alive\n\n"
#: Seconds without an event after which a keep-alive comment is sent.
KEEPALIVE_SECONDS = 5.0


def event(payload: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def framed(events: AsyncIterator[Mapping[str, Any]]) -> AsyncIterator[str]:
    """``events`` as SSE, closed by ``[DONE]``; an error part-way becomes an error event."""
    try:
        async for payload in events:
            yield event(payload)
    except Exception as exc:
        logger.exception("stream failed after it started")
        message = str(exc) or type(exc).__name__
        yield event(openai_body(500, "ServerError", f"generation failed: {message}"))
    yield DONE


async def with_keepalive(
    chunks: AsyncIterator[str], interval: float = KEEPALIVE_SECONDS
) -> AsyncIterator[str]:
    """``chunks``, with :data:`KEEPALIVE` whenever none came for ``interval`` seconds.

    Closing this iterator (client disconnect) closes ``chunks`` too, which aborts the request.
    """
    source = aiter(chunks)
    pending: asyncio.Task[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            task, pending = pending, None
            try:
                chunk = task.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # result unwanted now
                await pending
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
