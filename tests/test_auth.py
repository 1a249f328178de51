"""API key: every route but probes and metrics needs ``Authorization: Bearer <key>``.

Runs the real service app in-process without starting the engine (no lifespan): a request
that passes authentication reaches the service and gets its "engine is loading" 503.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentospec.auth import API_KEY_ENV, APIKeyMiddleware

KEY = "s3cret-test-key"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    # One app per process: BentoML registers its Prometheus metrics when the app is built.
    # The middleware reads the key when the first request builds the middleware stack.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(API_KEY_ENV, KEY)
        from service import BentoSpec

        client = TestClient(BentoSpec.to_asgi(), raise_server_exceptions=False)
        client.get("/livez")
    yield client


PROTECTED = [
    ("POST", "/generate"),
    ("POST", "/generate_full"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/spec_decode/completions"),
    ("GET", "/v1/health_check"),
    ("GET", "/docs.json"),
    ("GET", "/"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", KEY, "Bearer "])
def test_missing_or_wrong_key_is_401(
    client: TestClient, method: str, path: str, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = client.request(method, path, headers=headers, json={"prompt": "hi"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert KEY not in r.text


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_right_key_passes(client: TestClient, method: str, path: str) -> None:
    r = client.request(
        method, path, headers={"Authorization": f"Bearer {KEY}"}, json={"prompt": "hi"}
    )
    assert r.status_code != 401


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/metrics"])
def test_probes_and_metrics_stay_open(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    # The service app's /readyz and /metrics wait for what only its lifespan sets up (the
    # service instance, the metrics client), so the middleware is checked around a plain app.
    monkeypatch.setenv(API_KEY_ENV, KEY)
    inner = Starlette(routes=[Route(path, lambda _: PlainTextResponse("ok"))])
    probe = TestClient(APIKeyMiddleware(inner))
    assert probe.get(path).status_code == 200
    assert probe.get(f"{path}/../v1/models").status_code == 401


def test_livez_of_the_service_stays_open(client: TestClient) -> None:
    assert client.get("/livez").status_code == 200
