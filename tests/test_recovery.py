"""A real engine load that fails is acted on: the worker restarts, waiting longer each time.

Two real failures under a real ``bentoml serve``: a profile whose model directory does not exist
(a volume not mounted yet) fails every load, so each restart waits longer; an engine core killed
while it loads fails once, and the next worker serves.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from openai import InternalServerError

from bentospec.watchdog import FIRST_BACKOFF_SECONDS
from tests.conftest import CATALOGUE_DIR, BentoServer, openai_client, wait_for

pytestmark = pytest.mark.server

PROFILE_NAME = "model-not-there-yet"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Where the profile's model will appear; absent at first."""
    return tmp_path / "model"


@pytest.fixture
def failing_server(tmp_path: Path, model_dir: Path) -> Iterator[BentoServer]:
    profile = yaml.safe_load((CATALOGUE_DIR / "cpu-nospec.yaml").read_text())
    profile["model"]["id"] = str(model_dir)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / f"{PROFILE_NAME}.yaml").write_text(yaml.safe_dump(profile))
    proc = BentoServer(PROFILE_NAME, env={"BENTOSPEC_CONFIG_DIR": str(configs)})
    try:
        yield proc
    finally:
        proc.stop()


def test_failed_load_restarts_the_worker_with_a_growing_wait(
    failing_server: BentoServer, model_dir: Path
) -> None:
    log = failing_server.log_path.read_text
    # The first failure restarts at once, the second waits FIRST_BACKOFF_SECONDS.
    assert wait_for(lambda: "restart 2 in a row" in log(), 400), log()[-4000:]
    lines = [line for line in log().splitlines() if "background task 'engine load' failed" in line]
    assert len(lines) == 2, lines
    for line in lines:
        assert f"ModelNotFoundError: '{model_dir}' is not an existing model directory" in line
    assert re.search(r"in 0 s .*restart 1 in a row", lines[0]), lines[0]
    assert f"in {FIRST_BACKOFF_SECONDS:.3g} s" in lines[1], lines[1]
    # While it waits, the worker is alive but not ready, and its routes say why.
    with httpx.Client(base_url=failing_server.url, timeout=10) as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 503
        for route, body in [
            ("/generate_full", {"prompt": "Hi", "max_tokens": 2}),
            ("/v1/spec_decode/completions", {"query": "Hi", "max_new_tokens": 2}),
        ]:
            r = client.post(route, json=body)
            assert r.status_code == 503, r.text
            assert "engine is failed: ModelNotFoundError" in r.json()["error"]["message"]
        health = client.get("/v1/health_check")
        assert health.status_code == 503 and health.json()["engine"] == "failed"
    # OpenAI clients read the same 503 body as an error of their own.
    openai = openai_client(failing_server, timeout=600, max_retries=0)
    with pytest.raises(InternalServerError) as caught:
        openai.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=2)
    assert caught.value.status_code == 503 and caught.value.type == "ServiceUnavailable"


@pytest.mark.engine
def test_engine_core_killed_during_load_is_recovered_by_a_new_worker() -> None:
    server = BentoServer("cpu")
    try:
        assert wait_for(lambda: bool(server.children("EngineCore")), 600)
        (worker,) = server.children("_bentoml_impl.worker.service")
        for core in server.children("EngineCore"):
            core.kill()
        server.wait_ready(900)
        log = server.log_path.read_text()
        assert "background task 'engine load' failed" in log and "restart 1 in a row" in log
        (new_worker,) = server.children("_bentoml_impl.worker.service")
        assert new_worker.pid != worker.pid
        r = httpx.post(
            f"{server.url}/generate_full", json={"prompt": "Hi", "max_tokens": 2}, timeout=120
        )
        assert r.status_code == 200 and r.json()["completion_tokens"] == 2, r.text
    finally:
        server.stop()
