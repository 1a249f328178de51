"""The engine gate: what it answers 503 for, what a request the engine died under gets instead
of a 5xx (JSON, SSE error event, or a cut raw stream), and what it leaves alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import bentoml
import pytest
from bentoml.exceptions import BentoMLException
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message

from bentospec.errors import EngineUnavailable
from bentospec.gate import GATED_PATHS, EngineGateMiddleware
from tests.conftest import sse_events

PATH = sorted(GATED_PATHS)[0]


class Engine:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def require_ready(self) -> None:
        if self.error is not None:
            raise self.error


DEAD = EngineUnavailable("engine is dead")
#: vLLM's error event when the engine core dies under an OpenAI stream.
VLLM_DEAD_EVENT = {
    "error": {
        "message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
}
RESTARTED = {
    "message": "the engine restarted; retry in 30 s",
    "type": "ServiceUnavailable",
    "param": None,
    "code": 503,
}


def gate(
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine | None,
    *,
    status: int = 200,
    dies_under: Exception | None = None,
    path: str = PATH,
    answer: str = "plain",
) -> TestClient:
    """The gate around a plain app answering ``status`` on ``path``, in a worker whose service
    has ``engine`` (None: not built); ``dies_under`` makes the engine fail during the request,
    after which the app answers as ``answer`` says: a 500 (``plain``), an SSE stream that ends
    with vLLM's error event (``events``) or a raw text stream that ends early (``text``)."""

    def current_service() -> SimpleNamespace:
        if engine is None:
            raise BentoMLException("service isn't instantiated yet")
        return SimpleNamespace(engine=engine)

    monkeypatch.setattr(bentoml, "get_current_service", current_service)

    def die() -> None:
        if dies_under is not None and engine is not None:  # the engine core dies mid-request
            engine.error = dies_under

    async def events() -> AsyncIterator[str]:
        yield f"data: {json.dumps({'text': 'Hel'})}\n\n"
        die()
        yield f"data: {json.dumps(VLLM_DEAD_EVENT)}\n\n"
        yield "data: [DONE]\n\n"

    async def text() -> AsyncIterator[str]:
        yield "Hel"
        die()

    def route(_: object) -> Response:
        if answer == "events":
            return StreamingResponse(events(), media_type="text/event-stream")
        if answer == "text":  # BentoML's raw text stream, labelled as SSE
            return StreamingResponse(text(), media_type="text/event-stream")
        if dies_under is not None:
            die()
            return PlainTextResponse("An unexpected error has occurred", status_code=500)
        return PlainTextResponse("served", status_code=status)

    inner = Starlette(routes=[Route(path, route, methods=["POST"])])
    return TestClient(EngineGateMiddleware(inner))


def test_service_not_built_yet_is_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    r = gate(monkeypatch, None).post(PATH)
    assert r.status_code == 503 and r.headers["retry-after"] == "30"
    assert r.json() == {"error": {**RESTARTED, "message": "engine is loading; retry in 30 s"}}


def test_unavailable_engine_is_503_with_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    r = gate(monkeypatch, Engine(DEAD)).post(PATH)
    assert r.status_code == 503 and r.headers["retry-after"] == "30"
    assert r.json()["error"]["message"] == "engine is dead; retry in 30 s"


def test_other_routes_answer_their_own_503(monkeypatch: pytest.MonkeyPatch) -> None:
    # The OpenAI and OPEA apps answer a new request with the same 503 themselves.
    r = gate(monkeypatch, Engine(DEAD), path="/v1/completions", status=418).post("/v1/completions")
    assert r.status_code == 418


def test_ready_engine_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    r = gate(monkeypatch, Engine(None)).post(PATH)
    assert r.status_code == 200 and r.text == "served"


def test_other_bentoml_errors_are_not_reported_as_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug behind the gate must surface as the error it is, not as "engine is loading".
    with pytest.raises(BentoMLException, match="unrelated"):
        gate(monkeypatch, Engine(BentoMLException("unrelated"))).post(PATH)


@pytest.mark.parametrize("path", [PATH, "/v1/completions", "/v1/spec_decode/completions"])
def test_a_request_the_engine_died_under_gets_a_retryable_503(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    r = gate(monkeypatch, Engine(None), dies_under=DEAD, path=path).post(path)
    assert r.status_code == 503 and r.headers["retry-after"] == "30"
    assert r.json() == {"error": RESTARTED}


def test_a_stream_the_engine_died_under_ends_with_a_retryable_error_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chat = "/v1/chat/completions"
    r = gate(monkeypatch, Engine(None), dies_under=DEAD, path=chat, answer="events").post(chat)
    events = sse_events(r.text)
    assert r.status_code == 200
    assert [json.loads(e) for e in events[:-1]] == [{"text": "Hel"}, {"error": RESTARTED}]
    assert events[-1] == "[DONE]"


def test_a_stream_error_of_a_ready_engine_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = "/v1/chat/completions"
    r = gate(monkeypatch, Engine(None), path=chat, answer="events").post(chat)
    assert json.dumps(VLLM_DEAD_EVENT) in r.text


def sent_messages(client: TestClient) -> list[Message]:
    """What the gate sends for one POST, as ASGI messages (TestClient completes a response the
    app left unfinished; uvicorn closes the connection instead)."""
    sent: list[Message] = []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": PATH, "headers": [], "query_string": b""}
    asyncio.run(client.app(scope, receive, send))
    return sent


def test_a_raw_text_stream_the_engine_died_under_is_cut_not_completed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The last (empty) chunk never goes out: the client sees an unfinished transfer.
    cut = sent_messages(gate(monkeypatch, Engine(None), dies_under=DEAD, answer="text"))
    assert [m["type"] for m in cut] == ["http.response.start", "http.response.body"]
    assert cut[-1]["body"] == b"Hel" and cut[-1]["more_body"]
    complete = sent_messages(gate(monkeypatch, Engine(None), answer="text"))
    assert complete[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_a_5xx_of_a_ready_engine_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    r = gate(monkeypatch, Engine(None), status=500).post(PATH)
    assert r.status_code == 500 and r.text == "served"
