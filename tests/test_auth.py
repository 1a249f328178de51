"""API key: every route but probes and metrics needs ``Authorization: Bearer <key>``.

Runs the real service app in-process without starting the engine (no lifespan): a request
that passes authentication reaches the service and gets its "engine is loading" 503.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentospec import auth, settings
from bentospec.auth import APIKeyMiddleware

KEY = "s3cret-test-key"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    # One app per process: BentoML registers its Prometheus metrics when the app is built.
    # The middleware reads the key when the first request builds the middleware stack.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(settings.API_KEY.name, KEY)
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


#: The engine is not loading in this process: routes that need it answer the one 503 body.
LOADING = {
    "error": {
        "message": "engine is loading; retry in 30 s",
        "type": "ServiceUnavailable",
        "param": None,
        "code": 503,
    }
}
NEED_NO_ENGINE = {"/docs.json", "/"}


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_right_key_passes(client: TestClient, method: str, path: str) -> None:
    body = {"query": "hi"} if path == "/v1/spec_decode/completions" else {"prompt": "hi"}
    r = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, json=body)
    if path in NEED_NO_ENGINE:
        assert r.status_code == 200
    elif path == "/v1/health_check":  # OPEA's health body, with the engine's state
        assert r.status_code == 503 and r.json()["engine"] == "loading"
    else:
        assert r.status_code == 503 and r.json() == LOADING, r.text
        assert r.headers["retry-after"] == "30"


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/metrics"])
def test_probes_and_metrics_stay_open(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    # The service app's /readyz and /metrics wait for what only its lifespan sets up (the
    # service instance, the metrics client), so the middleware is checked around a plain app.
    monkeypatch.setenv(settings.API_KEY.name, KEY)
    inner = Starlette(routes=[Route(path, lambda _: PlainTextResponse("ok"))])
    probe = TestClient(APIKeyMiddleware(inner))
    assert probe.get(path).status_code == 200
    assert probe.get(f"{path}/../v1/models").status_code == 401


def test_livez_of_the_service_stays_open(client: TestClient) -> None:
    assert client.get("/livez").status_code == 200


def test_every_key_check_is_one_constant_time_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    # No early-exit ``==`` anywhere: each decision is hmac.compare_digest of the whole header.
    compared: list[tuple[bytes, bytes]] = []

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setenv(settings.API_KEY.name, KEY)
    monkeypatch.setattr(auth, "hmac", SimpleNamespace(compare_digest=recording))
    inner = Starlette(routes=[Route("/x", lambda _: PlainTextResponse("ok"))])
    client = TestClient(APIKeyMiddleware(inner))
    headers = [f"Bearer {KEY}", "Bearer wrong", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer"]
    statuses = [client.get("/x", headers={"Authorization": h}).status_code for h in headers]
    assert statuses == [200, 401, 401, 401, 401]
    assert compared == [(h.encode(), f"Bearer {KEY}".encode()) for h in headers]
