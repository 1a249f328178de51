"""SSE framing of the OPEA stream: error event then ``[DONE]``, keep-alives, abort on close."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from bentospec import sse


async def _collect(chunks: AsyncIterator[str]) -> list[str]:
    return [chunk async for chunk in chunks]


def test_a_failure_part_way_ends_with_an_error_event_then_done() -> None:
    async def fails_after_one() -> AsyncIterator[dict[str, str]]:
        yield {"text": "Hel"}
        raise RuntimeError("engine core died")

    chunks = asyncio.run(_collect(sse.framed(fails_after_one())))
    assert chunks[0] == sse.event({"text": "Hel"})
    error = json.loads(chunks[1].removeprefix("data: "))["error"]
    assert "engine core died" in error["message"]
    assert chunks[2:] == [sse.DONE]


def test_quiet_streams_get_keepalive_comments_and_keep_every_event() -> None:
    async def slow() -> AsyncIterator[str]:
        yield "a"
        # Long against the keep-alive interval below: at least one comment must come meanwhile.
        await asyncio.sleep(0.5)
        yield "b"

    chunks = asyncio.run(_collect(sse.with_keepalive(slow(), interval=0.02)))
    assert [c for c in chunks if c != sse.KEEPALIVE] == ["a", "b"]
    assert chunks.index(sse.KEEPALIVE) == 1


def test_closing_the_stream_closes_the_source_so_the_request_is_aborted() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                yield "x"
                await asyncio.sleep(3600)  # waiting for the engine when the client leaves
        finally:
            closed.set()

    async def read_one_then_leave() -> None:
        stream = sse.with_keepalive(endless(), interval=0.01)
        assert await anext(stream) == "x"
        assert await anext(stream) == sse.KEEPALIVE
        await stream.aclose()

    asyncio.run(read_one_then_leave())
    assert closed.is_set()
