"""A built Bento carries its embedded model and serves it with no conversion, no network and no
writable cache: built, exported, imported into a fresh ``BENTOML_HOME`` and served by tag, as
a container or another machine would (issue 20)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import yaml

from bentospec.bench.servers import Server, free_port
from bentospec.model_build import TARGET_MODEL
from bentospec.model_store import stored_tag
from tests.conftest import ROOT, in_bentoml_home
from tests.test_bento_build import build

pytestmark = [pytest.mark.server, pytest.mark.slow]

BENTOML = (sys.executable, "-m", "bentoml")


def test_an_imported_bento_serves_its_model_with_no_writable_cache(tmp_path: Path) -> None:
    build_home, serve_home = tmp_path / "build-home", tmp_path / "serve-home"
    bento = build("cpu", build_home)
    tag = f"bentospec:{bento.name}"
    listed = yaml.safe_load(in_bentoml_home(build_home, *BENTOML, "get", tag, "-o", "yaml"))
    declared = [model["tag"] for model in listed["services"][0]["models"]]
    assert declared == [stored_tag(TARGET_MODEL)]

    archive = tmp_path / "bentospec.bento"
    in_bentoml_home(build_home, *BENTOML, "export", tag, str(archive))
    in_bentoml_home(serve_home, *BENTOML, "import", str(archive))
    assert (serve_home / "models" / stored_tag(TARGET_MODEL).replace(":", "/")).is_dir()
    # Even root cannot create a directory below a regular file: no cache can be written.
    (tmp_path / "not-a-directory").write_text("")
    cache = tmp_path / "not-a-directory" / "cache"

    port = free_port()
    env = {
        "BENTOML_HOME": str(serve_home),
        "BENTOSPEC_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "BENTOML_DO_NOT_TRACK": "true",
    }
    command = [sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1"]
    server = Server(
        [*command, "--port", str(port)],
        port,
        ROOT / "build" / f"server-imported-bento-{port}.log",
        env,
        cwd=tmp_path,  # not the checkout: the Bento's own code
    )
    with server:
        answer = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
            timeout=120,
        )
        log = server.log_path.read_text(errors="replace")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"].strip()
    # The engine loaded the copy the archive brought into the fresh home's model store.
    name, version = stored_tag(TARGET_MODEL).split(":")
    assert f"model={serve_home / 'models' / name / version}" in log, log[-3000:]
    assert not cache.parent.is_dir()
