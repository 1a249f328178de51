"""Reliability and security of the real service on the ``cpu`` profile.

Hostile input, dropped streams and overload run against the shared session ``server``. Engine
death, shutdown and secrets need a server of their own (one, started once for this module),
since they kill or stop it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.routing import APIRoute

from bentospec import settings
from bentospec.profile import list_profiles, load_profile
from tests.conftest import (
    CATALOGUE_DIR,
    ROOT,
    BentoServer,
    free_port,
    openai_client,
    sse_payloads,
    wait_for,
)

MODEL = "smollm2-135m-instruct"
PROFILE = load_profile("cpu")
#: The small greedy request that must still succeed after each hostile one.
PROBE = {"prompt": "Hello", "max_tokens": 4}
#: A prompt the model continues for as long as it is allowed to (greedy counting).
COUNTING = "Count from 1 to 1000: 1, 2, 3, 4,"
JSON = {"content-type": "application/json"}


def assert_still_serving(url: str, headers: dict[str, str] | None = None) -> None:
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        r = client.post("/generate_full", json=PROBE)
        assert r.status_code == 200, r.text
        assert client.get("/readyz").status_code == 200


def engine_gauges(client: httpx.Client) -> dict[str, float]:
    """vLLM's request gauges and finish counters, summed over labels, from ``/metrics``."""
    text = client.get("/metrics").text
    values: dict[str, float] = {}
    for name, labels, value in re.findall(r"^vllm:(\w+)\{([^}]*)\} (\S+)$", text, re.M):
        reason = re.search(r'finished_reason="(\w+)"', labels)
        key = f"{name}:{reason.group(1)}" if reason else name
        values[key] = values.get(key, 0.0) + float(value)
    return values


def in_flight(gauges: dict[str, float]) -> float:
    # vLLM publishes its gauges once its first step ran.
    return gauges.get("num_requests_running", 0) + gauges.get("num_requests_waiting", 0)


# --- 1. Hostile and malformed input ------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One hostile request: raw body bytes, and a word the 4xx answer must contain."""

    route: str
    body: bytes
    names: str
    status: int = 400

    @classmethod
    def of(cls, route: str, body: object, names: str, status: int = 400) -> Bad:
        return cls(route, json.dumps(body).encode(), names, status)


def _chat(**fields: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def _completion(**fields: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields}


SEVENTEEN_STOPS = [f"s{i}" for i in range(17)]
FIVE_MB = "x" * 5_000_000
CONTEXT = f"max_model_len={PROFILE.engine.max_model_len}"
#: One token per word: more tokens than the context holds, fewer characters than the limit.
TOO_MANY_TOKENS = "word " * (PROFILE.engine.max_model_len + 100)
assert len(TOO_MANY_TOKENS) < PROFILE.serving.max_prompt_chars
BAD_INPUT = {
    # The service's own routes (BentoML IO descriptors + profile checks).
    "generate-nan-temperature": Bad(
        "/generate", b'{"prompt":"hi","temperature":NaN}', "temperature"
    ),
    "generate-infinite-top_p": Bad("/generate", b'{"prompt":"hi","top_p":Infinity}', "top_p"),
    "generate-invalid-utf8": Bad("/generate", b'{"prompt":"\xff\xfe hi"}', "Invalid JSON"),
    "generate-not-json": Bad("/generate", b"{not json", "Invalid JSON"),
    "generate-array-body": Bad("/generate", b"[1, 2]", "object"),
    "generate-missing-prompt": Bad("/generate", b"{}", "prompt"),
    "generate-17-stops": Bad.of("/generate", {"prompt": "hi", "stop": SEVENTEEN_STOPS}, "stop"),
    "generate-5mb-prompt": Bad.of("/generate", {"prompt": FIVE_MB}, "prompt"),
    "generate-prompt-beyond-context": Bad.of(
        "/generate", {"prompt": TOO_MANY_TOKENS, "max_tokens": 4}, CONTEXT
    ),
    "generate-seed-beyond-int64": Bad.of("/generate", {**PROBE, "seed": 2**70}, "seed"),
    "full-huge-max_tokens": Bad.of("/generate_full", {**PROBE, "max_tokens": 10**30}, "max_tokens"),
    "full-infinite-max_tokens": Bad(
        "/generate_full", b'{"prompt":"hi","max_tokens":Infinity}', "max_tokens"
    ),
    "full-deeply-nested-json": Bad(
        "/generate_full", b'{"prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON"
    ),
    "full-empty-stop": Bad.of("/generate_full", {**PROBE, "stop": [""]}, "stop"),
    "full-prompt-list": Bad.of("/generate_full", {"prompt": ["a", "b"]}, "prompt"),
    "full-negative-repetition_penalty": Bad.of(
        "/generate_full", {**PROBE, "repetition_penalty": -1}, "repetition_penalty"
    ),
    "full-seed-beyond-int64": Bad.of("/generate_full", {**PROBE, "seed": 2**70}, "seed"),
    # OpenAI routes (vLLM's serving layer behind the service's guard).
    "completions-unknown-model": Bad.of(
        "/v1/completions", _completion(model="no-such-model"), "does not exist", 404
    ),
    "completions-n-1000": Bad.of("/v1/completions", _completion(n=1000), "n must be"),
    "completions-17-stops": Bad.of("/v1/completions", _completion(stop=SEVENTEEN_STOPS), "stop"),
    "completions-nan-temperature": Bad(
        "/v1/completions",
        f'{{"model":"{MODEL}","prompt":"hi","max_tokens":4,"temperature":NaN}}'.encode(),
        "temperature",
    ),
    "completions-max_tokens-0": Bad.of("/v1/completions", _completion(max_tokens=0), "max_tokens"),
    "completions-max_tokens-negative": Bad.of(
        "/v1/completions", _completion(max_tokens=-5), "max_tokens"
    ),
    "completions-max_tokens-huge": Bad.of(
        "/v1/completions", _completion(max_tokens=10**9), "max_tokens"
    ),
    "completions-prompt-beyond-context": Bad.of(
        "/v1/completions", _completion(prompt=TOO_MANY_TOKENS), "maximum context length"
    ),
    "completions-invalid-utf8": Bad(
        "/v1/completions", b'{"model":"x","prompt":"\xff\xfe"}', "parsing the body"
    ),
    "completions-not-json": Bad("/v1/completions", b"{not json", "JSON decode error"),
    "completions-seed-beyond-int64": Bad.of("/v1/completions", _completion(seed=2**70), "seed"),
    "completions-token-out-of-vocabulary": Bad.of(
        "/v1/completions", _completion(prompt=[999_999_999]), "out of vocabulary"
    ),
    # A string is OPEA's one-user-message form (accepted); a number is neither form.
    "chat-messages-not-a-list": Bad.of("/v1/chat/completions", _chat(messages=42), "messages"),
    "chat-missing-messages": Bad.of("/v1/chat/completions", {"model": MODEL}, "messages"),
    "chat-unknown-model": Bad.of(
        "/v1/chat/completions", _chat(model="no-such-model"), "does not exist", 404
    ),
    "chat-n-1000": Bad.of("/v1/chat/completions", _chat(n=1000, max_tokens=4), "n must be"),
    "chat-17-stops": Bad.of("/v1/chat/completions", _chat(stop=SEVENTEEN_STOPS), "stop"),
    "chat-infinite-temperature": Bad(
        "/v1/chat/completions",
        json.dumps(_chat()).encode()[:-1] + b',"temperature":Infinity}',
        "temperature",
    ),
    "chat-5mb-message": Bad.of(
        "/v1/chat/completions",
        _chat(messages=[{"role": "user", "content": FIVE_MB}], max_tokens=4),
        "maximum context length",
    ),
    "chat-top_logprobs-1000": Bad.of(
        "/v1/chat/completions", _chat(logprobs=True, top_logprobs=1000), "logprobs"
    ),
    "responses-not-json": Bad("/v1/responses", b"{not json", "JSON decode error"),
    "responses-unknown-model": Bad.of(
        "/v1/responses", {"model": "no-such-model", "input": "hi"}, "does not exist", 404
    ),
    "tokenize-not-json": Bad("/tokenize", b"{not json", "JSON decode error"),
    "tokenize-unknown-model": Bad.of(
        "/tokenize", {"model": "no-such-model", "prompt": "hi"}, "does not exist", 404
    ),
    "detokenize-not-json": Bad("/detokenize", b"{not json", "JSON decode error"),
    "detokenize-negative-token": Bad.of("/detokenize", {"model": MODEL, "tokens": [-1]}, "tokens"),
    # OPEA route (its own FastAPI validation + profile checks).
    "opea-nan-temperature": Bad(
        "/v1/spec_decode/completions", b'{"query":"hi","temperature":NaN}', "temperature"
    ),
    "opea-invalid-utf8": Bad(
        "/v1/spec_decode/completions", b'{"query":"\xff\xfe"}', "parsing the body"
    ),
    "opea-not-json": Bad("/v1/spec_decode/completions", b"{not json", "JSON decode error"),
    "opea-33-documents": Bad.of(
        "/v1/spec_decode/completions", {"query": "hi", "documents": ["d"] * 33}, "documents"
    ),
    "opea-documents-beyond-context": Bad.of(
        "/v1/spec_decode/completions",
        {"query": "hi", "documents": [TOO_MANY_TOKENS]},
        CONTEXT,
    ),
    "opea-5mb-query": Bad.of("/v1/spec_decode/completions", {"query": FIVE_MB}, "query"),
    "opea-streaming-not-bool": Bad.of(
        "/v1/spec_decode/completions", {"query": "hi", "streaming": "yes please"}, "streaming"
    ),
    "opea-negative-max_new_tokens": Bad.of(
        "/v1/spec_decode/completions", {"query": "hi", "max_new_tokens": -3}, "max_new_tokens"
    ),
}


@pytest.mark.server
@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_4xx_naming_the_problem_and_harmless(server: BentoServer, case: Bad) -> None:
    r = httpx.post(f"{server.url}{case.route}", content=case.body, headers=JSON, timeout=120)
    assert r.status_code == case.status, r.text[:500]
    assert case.names in r.text, r.text[:500]
    assert_still_serving(server.url)


def test_bad_input_table_covers_every_route_that_takes_a_body() -> None:
    # Read from the service itself, so that a new route without hostile cases fails here.
    from service import BentoSpec, opea_app, openai_app

    routes = {api.route for api in BentoSpec.apis.values()} | {
        route.path
        for app in (openai_app, opea_app)
        for route in app.routes
        if isinstance(route, APIRoute) and "POST" in route.methods
    }
    assert routes - {case.route for case in BAD_INPUT.values()} == set()


# --- 2. Client disconnects ---------------------------------------------------------------


@pytest.mark.server
def test_dropped_stream_aborts_the_engine_request(server: BentoServer) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        before = engine_gauges(client)
        # Long enough (~15 s here) to still be generating when the gauges are read.
        body = {"prompt": COUNTING, "max_tokens": 3000, "temperature": 0}
        with client.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            assert len(list(itertools.islice(r.iter_text(), 3))) == 3
            assert wait_for(lambda: in_flight(engine_gauges(client)) >= 1, 10)
        # Leaving the block unread closes the connection: the client is gone.
        assert wait_for(lambda: in_flight(engine_gauges(client)) == 0, 30)
        after = engine_gauges(client)
        # Run to the end, the request would have finished with reason "length".
        assert after["request_success_total:length"] == before["request_success_total:length"]
        r = client.post("/generate_full", json=PROBE)
        assert r.status_code == 200 and r.json()["completion_tokens"] == 4


# --- 3. Load ------------------------------------------------------------------------------

WORDS = [
    "apple",
    "river",
    "candle",
    "tiger",
    "violin",
    "marble",
    "pepper",
    "rocket",
    "garden",
    "silver",
    "lemon",
    "falcon",
    "copper",
    "window",
    "meadow",
    "pirate",
    "cactus",
    "banjo",
    "tulip",
    "walrus",
    "anchor",
    "velvet",
    "comet",
    "ginger",
    "harbor",
    "igloo",
    "jungle",
    "kettle",
    "lantern",
    "mango",
    "nectar",
    "orchid",
    "parrot",
    "quartz",
    "raven",
    "saddle",
    "tomato",
    "umbrella",
    "valley",
    "wizard",
    "yogurt",
    "zipper",
    "badger",
    "cobalt",
    "dragon",
    "ember",
    "fossil",
    "glacier",
    "hazel",
    "ivory",
    "jasper",
    "koala",
    "lotus",
    "magnet",
    "nutmeg",
    "olive",
    "pebble",
    "quill",
    "rhino",
    "spruce",
    "thistle",
    "beacon",
    "canyon",
    "dolphin",
]
CONCURRENCY = 64


def word_prompt(word: str) -> str:
    """A prompt this model answers by copying ``word``, so every answer names its request."""
    return f"word: {word}\nword: {word}\nword: {word}\nword:"


@dataclass
class LoadResult:
    status: int | str
    seconds: float
    text: str


@dataclass
class LoadFigures:
    sent: int = 0
    completed: dict[str, LoadResult] = field(default_factory=dict)
    rejected: dict[str, LoadResult] = field(default_factory=dict)
    #: Answered with another status.
    failed: dict[str, LoadResult] = field(default_factory=dict)
    #: No HTTP answer at all (connection error or client timeout).
    lost: dict[str, LoadResult] = field(default_factory=dict)


async def _stream(client: httpx.AsyncClient, word: str) -> LoadResult:
    start = time.monotonic()
    try:
        # Greedy: each answer must repeat its own word (sampling would wander off it).
        body = {"prompt": word_prompt(word), "max_tokens": 16, "temperature": 0}
        async with client.stream("POST", "/generate", json=body) as r:
            text = "".join([chunk async for chunk in r.aiter_text()])
            return LoadResult(r.status_code, time.monotonic() - start, text)
    except httpx.HTTPError as exc:
        return LoadResult(type(exc).__name__, time.monotonic() - start, str(exc))


async def _burst(url: str, words: list[str], figures: LoadFigures) -> None:
    limits = httpx.Limits(max_connections=len(words), max_keepalive_connections=len(words))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        results = await asyncio.gather(*(_stream(client, w) for w in words))
    figures.sent += len(words)
    for word, result in zip(words, results, strict=True):
        if result.status == 200:
            figures.completed[word] = result
        elif result.status == 429:
            figures.rejected[word] = result
        elif isinstance(result.status, int):
            figures.failed[word] = result
        else:
            figures.lost[word] = result


@pytest.mark.server
def test_64_concurrent_streams_complete_or_get_fast_429(server: BentoServer) -> None:
    assert len(set(WORDS)) == CONCURRENCY
    first = LoadFigures()
    asyncio.run(_burst(server.url, WORDS, first))
    retried = LoadFigures()
    asyncio.run(_burst(server.url, list(first.rejected), retried))
    print(
        f"\nload: sent={first.sent} completed={len(first.completed)} "
        f"rejected_429={len(first.rejected)} failed={len(first.failed)} "
        f"lost={len(first.lost)}; retry of the rejected: sent={retried.sent} "
        f"completed={len(retried.completed)} rejected={len(retried.rejected)}; slowest 429: "
        f"{max((r.seconds for r in first.rejected.values()), default=0):.2f}s, slowest stream: "
        f"{max(r.seconds for r in first.completed.values()):.2f}s"
    )
    assert not first.failed and not first.lost
    # BentoML's MaxConcurrencyMiddleware rejects at once (no queue) beyond max_concurrency.
    limit = PROFILE.serving.max_concurrency
    assert len(first.completed) >= limit and first.rejected
    for result in first.rejected.values():
        assert result.text == '{"error":"Too many requests"}' and result.seconds < 10
    # The retried ones fit under the limit: every request is answered once, with its own word.
    assert not retried.rejected and not retried.failed and not retried.lost
    answers = {**first.completed, **retried.completed}
    assert sorted(answers) == sorted(WORDS)
    for word, result in answers.items():
        named = set(re.findall(r"\w+", result.text)) & set(WORDS)
        assert named == {word}, (word, result.text)
    assert_still_serving(server.url)


@pytest.mark.slow
def test_traffic_limits_come_from_the_served_profile(tmp_path: Path) -> None:
    # A profile of its own with limits no catalogue profile has, chosen explicitly (so the
    # machine's GPUs do not matter), read back from the service a fresh interpreter builds.
    profile = yaml.safe_load((CATALOGUE_DIR / "cpu-nospec.yaml").read_text())
    profile["serving"].update(timeout=123, max_concurrency=7)
    (tmp_path / "odd-limits.yaml").write_text(yaml.safe_dump(profile))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, service; print(json.dumps(service.BentoSpec.config['traffic']))",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "BENTOSPEC_CONFIG_DIR": str(tmp_path),
            "BENTOSPEC_PROFILE": "odd-limits",
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1]) == {"timeout": 123, "max_concurrency": 7}


# --- 5. Security (no server of its own) ---------------------------------------------------


def test_no_pickle_eval_or_exec_in_the_project_source() -> None:
    sources = [ROOT / "service.py", *sorted((ROOT / "bentospec").rglob("*.py"))]
    pattern = re.compile(r"pickle|(?<![\w.])(?:eval|exec)\s*\(")
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits


@pytest.mark.server
@pytest.mark.parametrize("route", ["/generate", "/generate_full"])
def test_bentoml_pickle_payload_is_refused(server: BentoServer, route: str) -> None:
    # Deserialising this would be code execution; BentoML must refuse it on the main server.
    payload = b"\x80\x05\x95\x15\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x06prompt\x94\x8c\x02hi\x94s."
    r = httpx.post(
        f"{server.url}{route}",
        content=payload,
        headers={"content-type": "application/vnd.bentoml+pickle"},
        timeout=60,
    )
    assert r.status_code == 415 and "pickle" in r.text, r.text
    assert_still_serving(server.url)


@pytest.mark.slow
def test_profile_name_cannot_escape_configs() -> None:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "bentoml", "serve", "service:BentoSpec"),
            *("--port", str(free_port()), "--arg", "profile=../etc/passwd"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "unknown profile '../etc/passwd'" in log
    assert all(name in log for name in list_profiles())
    assert "root:x:" not in log


# --- 4. Engine death and shutdown, 5. secrets: one dedicated server ------------------------

API_KEY = "bentospec-canary-key-7f3a9c"
HF_TOKEN = "hf_canaryTokenNeverLogged4b1d"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def own_server() -> Iterator[BentoServer]:
    """A server to kill and stop, with recognisable secrets in its environment."""
    with BentoServer("cpu", env={settings.API_KEY.name: API_KEY, "HF_TOKEN": HF_TOKEN}) as proc:
        yield proc


def assert_no_secret(text: str) -> None:
    assert API_KEY not in text and HF_TOKEN not in text


@pytest.mark.server
def test_secrets_never_reach_logs_or_responses(own_server: BentoServer) -> None:
    requests = [
        ("POST", "/generate_full", {}, PROBE, 401),
        ("POST", "/generate_full", {"Authorization": "Bearer wrong"}, PROBE, 401),
        ("POST", "/generate_full", AUTH, {**PROBE, "max_tokens": 0}, 400),
        ("POST", "/generate_full", AUTH, {"prompt": "hi", "bogus": 1}, 400),
        ("POST", "/v1/chat/completions", AUTH, _chat(temperature=-1), 400),
        ("POST", "/generate_full", AUTH, PROBE, 200),
        ("GET", "/v1/models", AUTH, None, 200),
        ("GET", "/docs.json", AUTH, None, 200),
        ("GET", "/metrics", {}, None, 200),
    ]
    with httpx.Client(base_url=own_server.url, timeout=120) as client:
        for method, path, headers, body, status in requests:
            r = client.request(method, path, headers=headers, json=body)
            assert r.status_code == status, (path, r.text)
            assert_no_secret(r.text)
            assert_no_secret(str(r.headers))
    assert_no_secret(own_server.log_path.read_text(errors="replace"))


def _chat_stream(content: str, max_tokens: int) -> dict[str, object]:
    return {**_chat(messages=[{"role": "user", "content": content}]), "max_tokens": max_tokens}


def streams(prompt: str, max_tokens: int) -> list[tuple[str, dict[str, object]]]:
    """One greedy stream on each API: (route, body)."""
    greedy = {"max_tokens": max_tokens, "temperature": 0}
    return [
        ("/generate", {"prompt": prompt, **greedy}),
        ("/v1/completions", _completion(prompt=prompt, **greedy, stream=True)),
        (
            "/v1/chat/completions",
            {**_chat_stream(prompt, max_tokens), "temperature": 0, "stream": True},
        ),
        ("/v1/spec_decode/completions", _opea(prompt, max_tokens, streaming=True)),
    ]


def _opea(prompt: str, max_tokens: int, *, streaming: bool) -> dict[str, object]:
    # OPEA's default repetition_penalty (1.03) stops the count after a few seconds.
    return {
        "query": prompt,
        "max_new_tokens": max_tokens,
        "temperature": 0,
        "repetition_penalty": 1.0,
        "streaming": streaming,
    }


#: In flight when the engine core dies: 16 long streams (4 per API) and a JSON request on each
#: API that has one (route, body).
UNDER_LOAD = 4 * streams(COUNTING, 1000) + [
    ("/v1/completions", _completion(prompt=COUNTING, max_tokens=1000, temperature=0)),
    ("/generate_full", {"prompt": COUNTING, "max_tokens": 1000, "temperature": 0}),
    ("/v1/spec_decode/completions", _opea(COUNTING, 1000, streaming=False)),
]
#: What a request the engine died under gets (a JSON 503, or an SSE error event).
RESTARTED = {
    "message": "the engine restarted; retry in 30 s",
    "type": "ServiceUnavailable",
    "param": None,
    "code": 503,
}


@dataclass
class Outcome:
    """One request's answer: status, body and headers, and the transfer error if it broke."""

    route: str
    status: int | None = None
    text: str = ""
    retry_after: str | None = None
    broken: str | None = None


def _sent(client: httpx.Client, route: str, body: dict[str, object]) -> Outcome:
    outcome = Outcome(route)
    try:
        with client.stream("POST", route, json=body) as r:
            outcome.status, outcome.retry_after = r.status_code, r.headers.get("retry-after")
            for chunk in r.iter_text():
                outcome.text += chunk
    except httpx.HTTPError as exc:
        outcome.broken = f"{type(exc).__name__}: {exc}"
    return outcome


def _retryable(outcome: Outcome) -> bool:
    """The engine restarted: a 503 with Retry-After, an SSE stream that ends with the retryable
    error event, or a raw text stream (/generate's) broken off before its end."""
    if outcome.status == 503:
        error = json.loads(outcome.text)["error"]
        return outcome.retry_after == "30" and error["type"] == "ServiceUnavailable"
    if outcome.route == "/generate":
        return outcome.status == 200 and outcome.broken is not None
    if outcome.status != 200 or outcome.broken:
        return False
    return sse_payloads(outcome.text)[-1] == {"error": RESTARTED}


def _complete(outcome: Outcome) -> bool:
    if outcome.status != 200 or outcome.broken:
        return False
    if outcome.route == "/generate":
        return bool(outcome.text)
    payloads = sse_payloads(outcome.text)
    return bool(payloads) and not any("error" in p for p in payloads)


@pytest.mark.server
def test_engine_death_under_load_answers_retry_then_a_new_engine_serves_in_the_same_worker(
    own_server: BentoServer,
) -> None:
    (worker,) = own_server.children("_bentoml_impl.worker.service")
    (core,) = own_server.children("EngineCore")
    with (
        concurrent.futures.ThreadPoolExecutor(len(UNDER_LOAD)) as pool,
        httpx.Client(base_url=own_server.url, timeout=120, headers=AUTH) as client,
    ):
        running = [pool.submit(_sent, client, route, body) for route, body in UNDER_LOAD]
        all_running = wait_for(lambda: in_flight(engine_gauges(client)) >= len(UNDER_LOAD), 120)
        finished = [f.result().route for f in running if f.done()]
        assert all_running, f"not all in flight at once; finished already: {finished}"
        killed = time.monotonic()
        core.kill()
        cut = [future.result(timeout=60) for future in running]  # every one of them ends
        ended = time.monotonic() - killed
    unclear = [(o.route, o.status, o.broken, o.text[-300:]) for o in cut if not _retryable(o)]
    assert not unclear
    assert {o.route for o in cut} == {route for route, _ in UNDER_LOAD}
    with httpx.Client(base_url=own_server.url, timeout=10, headers=AUTH) as client:
        # New requests while the engine restarts: 503 with Retry-After on every API.
        assert wait_for(lambda: client.get("/readyz").status_code == 503, 30)
        refused = [_sent(client, route, body) for route, body in streams("Hi", 4)]
        refused.append(_sent(client, "/generate_full", PROBE))
        for outcome in refused:
            assert outcome.status == 503 and outcome.retry_after == "30", outcome
            assert "retry in 30 s" in json.loads(outcome.text)["error"]["message"], outcome
        # The openai SDK retries a 503 (twice by default), waiting the Retry-After it names.
        sdk = openai_client(own_server, api_key=API_KEY, timeout=600)
        asked = time.monotonic()
        answer = sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
        retried = time.monotonic() - asked
        assert answer.choices[0].text and retried >= 30  # it waited: the first try got 503
        assert client.get("/readyz").status_code == 200
        restart = time.monotonic() - killed
    print(
        f"\nengine killed under {len(UNDER_LOAD)} requests: all ended {ended:.2f}s later; "
        f"the SDK's retried request completed {restart:.1f}s after the kill, same worker"
    )
    assert worker.is_running()
    assert own_server.children("_bentoml_impl.worker.service") == [worker]
    (new_core,) = own_server.children("EngineCore")
    assert new_core.pid != core.pid
    log = own_server.log_path.read_text()
    died = "engine core of profile 'cpu' died (exit code -9): starting a new engine in this worker"
    assert died in log
    # After recovery: 16 streams (4 per API) complete, and the JSON routes answer.
    with (
        concurrent.futures.ThreadPoolExecutor(16) as pool,
        httpx.Client(base_url=own_server.url, timeout=300, headers=AUTH) as client,
    ):
        after = list(pool.map(lambda rb: _sent(client, *rb), 4 * streams(COUNTING, 32)))
    assert all(_complete(o) for o in after), [(o.route, o.status, o.text[-200:]) for o in after]
    assert_still_serving(own_server.url, AUTH)
    completion = httpx.post(
        f"{own_server.url}/v1/completions", json=_completion(), headers=AUTH, timeout=120
    )
    assert completion.status_code == 200, completion.text


@pytest.mark.server
def test_sigterm_drains_the_stream_in_flight(own_server: BentoServer) -> None:
    body = {"prompt": COUNTING, "max_tokens": 400, "temperature": 0}
    with (
        httpx.Client(base_url=own_server.url, timeout=120, headers=AUTH) as client,
        client.stream("POST", "/generate", json=body) as r,
    ):
        assert r.status_code == 200
        chunks = r.iter_text()
        text = "".join(itertools.islice(chunks, 3))
        own_server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        text += "".join(chunks)
        drained = time.monotonic() - signalled
    own_server.proc.wait(120)
    exited = time.monotonic() - signalled
    print(f"\nSIGTERM: stream drained in {drained:.1f}s, server exited after {exited:.1f}s")
    # 400 greedy tokens count well past 100; an aborted stream stops after a few numbers.
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    assert numbers[:3] == [5, 6, 7] and max(numbers) > 100, text
    assert own_server.proc.returncode is not None
    assert_no_secret(own_server.log_path.read_text(errors="replace"))
