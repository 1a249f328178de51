"""The engine gate of the service's own routes: what it answers 503 for, and what it does not."""

from __future__ import annotations

from types import SimpleNamespace

import bentoml
import pytest
from bentoml.exceptions import BentoMLException
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentospec.engine import EngineUnavailable
from bentospec.gate import GATED_PATHS, EngineGateMiddleware

PATH = sorted(GATED_PATHS)[0]


class Engine:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def require_ready(self) -> None:
        if self.error is not None:
            raise self.error


def gate(
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine | None,
    *,
    status: int = 200,
    dies_under: Exception | None = None,
) -> TestClient:
    """The gate around a plain app answering ``status``, in a worker whose service has
    ``engine`` (None: not built); ``dies_under`` makes the engine fail during the request."""

    def current_service() -> SimpleNamespace:
        if engine is None:
            raise BentoMLException("service isn't instantiated yet")
        return SimpleNamespace(engine=engine)

    monkeypatch.setattr(bentoml, "get_current_service", current_service)

    def route(_: object) -> PlainTextResponse:
        if dies_under is not None and engine is not None:  # the engine core dies mid-request
            engine.error = dies_under
            return PlainTextResponse("An unexpected error has occurred", status_code=500)
        return PlainTextResponse("served", status_code=status)

    inner = Starlette(routes=[Route(PATH, route, methods=["POST"])])
    return TestClient(EngineGateMiddleware(inner))


def test_service_not_built_yet_is_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    r = gate(monkeypatch, None).post(PATH)
    assert r.status_code == 503
    assert r.json() == {
        "error": {"message": "engine is loading", "type": "ServiceUnavailable", "code": 503}
    }


def test_unavailable_engine_is_503_with_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    r = gate(monkeypatch, Engine(EngineUnavailable("engine is dead"))).post(PATH)
    assert r.status_code == 503 and r.json()["error"]["message"] == "engine is dead"


def test_ready_engine_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    r = gate(monkeypatch, Engine(None)).post(PATH)
    assert r.status_code == 200 and r.text == "served"


def test_other_bentoml_errors_are_not_reported_as_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug behind the gate must surface as the error it is, not as "engine is loading".
    with pytest.raises(BentoMLException, match="unrelated"):
        gate(monkeypatch, Engine(BentoMLException("unrelated"))).post(PATH)


def test_a_request_the_engine_died_under_gets_503_with_its_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = Engine(None)
    r = gate(monkeypatch, engine, dies_under=EngineUnavailable("engine is dead")).post(PATH)
    assert r.status_code == 503 and r.json()["error"]["message"] == "engine is dead"


def test_a_5xx_of_a_ready_engine_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    r = gate(monkeypatch, Engine(None), status=500).post(PATH)
    assert r.status_code == 500 and r.text == "served"
