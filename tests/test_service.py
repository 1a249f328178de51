"""A real ``bentoml serve`` on the ``cpu`` profile, driven by every client the README shows."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import subprocess
import time
from typing import Any

import bentoml
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bentospec import __version__
from bentospec.api_docs import GENERATION_TAG, README, README_SECTIONS, TAGS
from bentospec.metrics import SpecCounters
from bentospec.profile import load_profile
from bentospec.schemas import GENERATE_EXAMPLE, OPEA_EXAMPLE
from tests.conftest import ROOT, BentoServer, openai_client, sse_payloads

MODEL = "smollm2-135m-instruct"
#: The served profile's context (the session server runs ``cpu``).
CONTEXT = load_profile("cpu").engine.max_model_len
QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.server
def test_readyz_was_503_while_livez_answered_then_200(server: BentoServer) -> None:
    assert server.probes[-1] == (200, 200)
    loading = [p for p in server.probes if p[1] == 503]
    assert loading, f"never saw /readyz 503 while loading: {server.probes}"
    assert all(live == 200 for live, _ in loading)


@pytest.mark.server
def test_log_names_the_engine_cores_openmp_and_allocator(server: BentoServer) -> None:
    """``bentoml serve`` preloads vLLM's prescribed CPU runtime, and its log says so."""
    log = server.log_path.read_text(errors="replace")
    assert re.search(r"runs with OpenMP libiomp5\.so and allocator libtcmalloc_minimal", log), log[
        -3000:
    ]
    # vLLM's CPU worker warnings ("libiomp is not found in LD_PRELOAD", ...) are gone.
    assert "not found in LD_PRELOAD" not in log and "without Intel OpenMP" not in log


@pytest.mark.server
def test_sync_client_streams_and_completes(server: BentoServer) -> None:
    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        chunks = list(client.generate(prompt=QUESTION, max_tokens=24, temperature=0))
        result = client.generate_full(prompt=QUESTION, max_tokens=24, temperature=0)
    assert 1 < len(chunks) < len(result["text"])  # token deltas, not characters
    assert "".join(chunks) == result["text"]
    assert "Paris" in result["text"]
    assert result["completion_tokens"] > 0 and result["prompt_tokens"] > 0
    assert result["speculation"]["method"] == "ngram"


@pytest.mark.server
def test_async_client_streams(server: BentoServer) -> None:
    async def run() -> tuple[list[str], dict]:
        async with bentoml.AsyncHTTPClient(server.url, timeout=120) as client:
            greedy = {"prompt": QUESTION, "max_tokens": 16, "temperature": 0}
            chunks = [c async for c in client.generate(**greedy)]
            full = await client.generate_full(**greedy)
        return chunks, full

    chunks, full = asyncio.run(run())
    assert 1 < len(chunks) < len(full["text"])
    assert "".join(chunks) == full["text"]


@pytest.mark.server
def test_curl_streams_raw_text(server: BentoServer) -> None:
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{server.url}/generate",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps({"prompt": QUESTION, "max_tokens": 16, "temperature": 0}),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "Paris" in out.stdout


@pytest.mark.server
def test_speculation_counters_grow(server: BentoServer) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        before = SpecCounters.from_prometheus_text(client.get("/metrics").text)
        # Greedy answers copy the document's words, which the ngram proposer drafts.
        rag = (
            "<|im_start|>user\nDocument: The Brewmaster 300 must be descaled every 60 days "
            "with the Brewmaster descaling solution.\nQuestion: How often must the Brewmaster "
            "300 be descaled?<|im_end|>\n<|im_start|>assistant\n"
        )
        r = client.post("/generate_full", json={"prompt": rag, "max_tokens": 48, "temperature": 0})
        assert r.status_code == 200, r.text
        stats = r.json()["speculation"]
        assert stats["applied"] and stats["draft_tokens"] > 0, r.json()
        # vLLM's front end records a step's spec-decode stats with a later step's scheduler
        # stats, so an idle engine may hold back the last ones: one more request flushes them.
        client.post("/generate_full", json={"prompt": "Hi", "max_tokens": 2})
        deadline = time.monotonic() + 30
        while True:
            after = SpecCounters.from_prometheus_text(client.get("/metrics").text)
            if (after - before).draft_tokens >= stats["draft_tokens"] or (
                time.monotonic() > deadline
            ):
                break
            time.sleep(0.5)
    assert (after - before).draft_tokens >= stats["draft_tokens"]
    assert (after - before).accepted_tokens >= stats["accepted_tokens"]


def swagger_example(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The example request body the Swagger UI shows for ``POST path``."""
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rpartition("/")[2]]
    return schema["example"]


@pytest.mark.server
def test_first_examples_show_speculation_working(server: BentoServer) -> None:
    """The Swagger UI's example bodies, which the README's first examples send too, get drafts
    accepted and an answer (a short open prompt gets few drafts or none)."""
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    assert swagger_example(spec, "/generate") == GENERATE_EXAMPLE
    assert swagger_example(spec, "/generate_full") == GENERATE_EXAMPLE
    assert swagger_example(spec, "/v1/spec_decode/completions") == OPEA_EXAMPLE
    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        chunks = list(client.generate(**GENERATE_EXAMPLE))
        full = client.generate_full(**GENERATE_EXAMPLE)
    opea = httpx.post(f"{server.url}/v1/spec_decode/completions", json=OPEA_EXAMPLE, timeout=120)
    assert "".join(chunks) == full["text"]
    for answer in (full, opea.json()):
        assert answer["text"].strip(), answer
        stats = answer["speculation"]
        assert stats["applied"] and stats["accepted_tokens"] > 0, answer


@pytest.mark.server
def test_acceptance_gauges_on_metrics(server: BentoServer) -> None:
    """The service refreshes its gauges from vLLM's counters every few seconds."""
    httpx.post(
        f"{server.url}/generate_full",
        json={"prompt": "Repeat: one two three, one two three, one two", "max_tokens": 24},
        timeout=120,
    )
    deadline = time.monotonic() + 30
    gauges: dict[str, float] = {}
    while "bentospec_spec_decode_acceptance_rate" not in gauges and time.monotonic() < deadline:
        time.sleep(1)
        gauges = {
            sample.name: sample.value
            for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
            for sample in family.samples
            if sample.name.startswith("bentospec_spec_decode")
        }
    assert 0 <= gauges["bentospec_spec_decode_acceptance_rate"] <= 1
    assert gauges["bentospec_spec_decode_mean_acceptance_length"] >= 1


@pytest.mark.server
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "", "max_tokens": 8}, "prompt"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "stop": "not-a-list"}, "stop"),
        ({"prompt": "hi", "min_p": 0.2}, "min_p"),
        ({"prompt": "hi", "bogus": 1}, "bogus"),
    ],
)
@pytest.mark.parametrize("route", ["/generate", "/generate_full"])
def test_bad_input_is_400_naming_the_field(
    server: BentoServer, route: str, body: dict, field: str
) -> None:
    r = httpx.post(f"{server.url}{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert field in r.text


@pytest.mark.server
def test_prompt_longer_than_context_is_400(server: BentoServer) -> None:
    r = httpx.post(
        f"{server.url}/generate_full",
        json={"prompt": "word " * (CONTEXT + 100), "max_tokens": 8},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert "prompt" in r.text and f"max_model_len={CONTEXT}" in r.text


# --- OpenAI API (vLLM's own serving layer around the service's engine) ---------------------


@pytest.mark.server
def test_openai_models_lists_the_profile_model(server: BentoServer) -> None:
    assert [m.id for m in openai_client(server, timeout=120).models.list()] == [MODEL]


@pytest.mark.server
def test_openai_chat_uses_the_chat_template(server: BentoServer) -> None:
    client = openai_client(server, timeout=120)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0
    )
    streamed = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    # bf16 SmolLM2 answers this one in French (a near-tie at the first token), so check the
    # template instead: a ChatML assistant turn, not a continuation of the raw prompt.
    content = reply.choices[0].message.content
    assert content and "<|im_start|>" not in content and not content.startswith("user")
    assert text == content  # greedy, streamed or not
    assert reply.usage.prompt_tokens > len(messages[0]["content"].split())  # template tokens


@pytest.mark.server
def test_openai_completions_stream_and_not(server: BentoServer) -> None:
    client = openai_client(server, timeout=120)
    full = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=16, temperature=0)
    stream = client.completions.create(
        model=MODEL, prompt=QUESTION, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text
    assert full.usage.completion_tokens > 0


@pytest.mark.server
def test_opea_health_check(server: BentoServer) -> None:
    r = httpx.get(f"{server.url}/v1/health_check", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.server
def test_opea_rag_completion_json(server: BentoServer) -> None:
    body = {
        "query": "What is the capital of France?",
        "documents": ["Paris is the capital and largest city of France."],
        "max_new_tokens": 24,
        "streaming": False,
    }
    r = httpx.post(f"{server.url}/v1/spec_decode/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert "Paris" in doc["text"] and doc["prompt"] == body["query"]
    assert doc["speculation"]["method"] == "ngram"


@pytest.mark.server
def test_opea_stream_is_sse_via_curl(server: BentoServer) -> None:
    body = {
        "query": "What is Paris?",
        "documents": ["Paris is the capital of France."],
        "max_new_tokens": 24,
        "temperature": 0,
    }
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{server.url}/v1/spec_decode/completions",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    # SSE comments (": keep-alive") may come while the engine is busy; clients skip them.
    lines = [line for line in out.splitlines() if line and not line.startswith(":")]
    events = [line.removeprefix("data: ") for line in lines]
    assert all(line.startswith("data: ") for line in lines), out
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    # The events carry the whole greedy answer, as the same request without streaming has it.
    r = httpx.post(
        f"{server.url}/v1/spec_decode/completions", json={**body, "streaming": False}, timeout=120
    )
    assert r.status_code == 200, r.text
    assert "".join(p["text"] for p in payloads) == r.json()["text"] != ""
    assert payloads[-1]["finish_reason"] in {"stop", "length"}
    assert "speculation" in payloads[-1]


@pytest.mark.server
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": "x", "typical_p": 0}, "typical_p"),
        ({"query": ""}, "query"),
        ({"query": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"query": "x", "max_new_tokens": 50_000}, "max_new_tokens"),
        ({"query": "x", "temperature": 2.5}, "temperature"),
        ({"query": "x", "input_guardrail_params": {}}, "input_guardrail_params"),
        ({"query": "x", "top_p": 0}, "top_p"),
        ({"query": "x", "documents": "not a list"}, "documents"),
        ({"query": "x", "unknown": True}, "unknown"),
    ],
)
def test_opea_bad_input_is_400(server: BentoServer, body: dict, field: str) -> None:
    r = httpx.post(f"{server.url}/v1/spec_decode/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["field"].startswith(field)


@pytest.mark.server
def test_request_without_drafts_reports_why(server: BentoServer) -> None:
    r = httpx.post(
        f"{server.url}/generate_full", json={"prompt": QUESTION, "max_tokens": 1}, timeout=60
    )
    spec = r.json()["speculation"]
    assert spec["applied"] is False and "no draft tokens" in spec["reason"]


# --- Swagger UI and OpenAPI ------------------------------------------------------------------

ROUTES = [
    "/generate",
    "/generate_full",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
    "/v1/spec_decode/completions",
    "/v1/health_check",
]
#: One route of each group, and the group the Swagger UI files it under.
ROUTE_GROUPS = {
    "/generate": "generation",
    "/v1/chat/completions": "OpenAI",
    "/tokenize": "OpenAI",
    "/v1/spec_decode/completions": "OPEA",
    "/readyz": "probes",
    "/metrics": "probes",
}


@pytest.mark.server
def test_docs_json_lists_every_route(server: BentoServer) -> None:
    paths = httpx.get(f"{server.url}/docs.json", timeout=30).json()["paths"]
    assert set(ROUTES) <= set(paths), sorted(paths)


@pytest.mark.server
def test_docs_json_describes_the_project(server: BentoServer) -> None:
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    assert spec["openapi"] == "3.1.0"  # the dialect of its schemas (pydantic v2, FastAPI)
    assert spec["info"]["version"] == __version__
    assert "speculative decoding" in spec["info"]["description"]
    assert "profile **cpu**" in spec["info"]["description"]
    assert [tag["name"] for tag in spec["tags"]] == ["generation", "OpenAI", "OPEA", "probes"]
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert len(operation["tags"]) == 1, (path, method)
            assert operation["tags"][0] in {name for name, _ in TAGS}, (path, method)
    for path, group in ROUTE_GROUPS.items():
        assert [op["tags"] for op in spec["paths"][path].values()] == [[group]], path


def test_description_links_exist_in_the_readme() -> None:
    """Every README section the Swagger UI links to is a heading of the README."""
    headings = [
        line.lstrip("#").strip()
        for line in (ROOT / README).read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    ]
    for title, anchor in README_SECTIONS:
        assert title in headings, title
        slug = "".join(c for c in title.lower() if c.isalnum() or c in " -").replace(" ", "-")
        assert slug == anchor


def readme_section(title: str) -> str:
    text = (ROOT / README).read_text(encoding="utf-8")
    return text.partition(f"\n## {title}\n")[2].partition("\n## ")[0]


def test_readme_first_examples_send_the_swagger_example() -> None:
    """The README's first curl and BentoML client examples send :data:`GENERATE_EXAMPLE`, the
    body the live-service test above checks."""
    section = readme_section("Calling the service")
    shell = re.search(r"^BODY='(.*)'$", section, re.M)
    assert shell and json.loads(shell[1]) == GENERATE_EXAMPLE
    assert section.count('-d "$BODY"') == 2  # /generate, /generate_full
    python = re.search(r"^body = (\{.*?^\})$", section, re.M | re.S)
    assert python and ast.literal_eval(python[1]) == GENERATE_EXAMPLE
    for call in ("client.generate(**body)", "client.generate_full(**body)"):
        assert call in section, call


@pytest.mark.server
def test_swagger_ui_renders_the_routes_in_chromium(server: BentoServer, tmp_path) -> None:
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            # Deep link: /generate's operation opens, with its example body.
            f"{server.url}/#/{GENERATION_TAG}/bentospec__generate",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    missing = [route for route in ROUTES if route not in dom]
    assert not missing, f"Swagger UI did not render {missing}"
    # The project's description and version instead of BentoML's placeholder, and the routes
    # in their groups (none left in "default").
    assert "Machine Learning Service created with BentoML" not in dom
    assert "speculative decoding as one BentoML service" in dom
    assert f"{__version__}" in dom and ">None<" not in dom.replace(" ", "")
    for name, _ in TAGS:
        assert f'id="operations-tag-{name}"' in dom, name
    assert 'id="operations-tag-default"' not in dom
    assert GENERATE_EXAMPLE["prompt"].rpartition("\n")[2] in dom  # the example's last line


#: One greedy request that runs to its token limit (the counts are then the limit).
COUNTED = "Count from 1 to 100: 1, 2, 3,"


@pytest.mark.server
def test_streamed_answers_report_the_counts_of_the_same_request_unstreamed(
    server: BentoServer,
) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        # The service's own routes: the text stream carries the whole answer of /generate_full.
        own = {"prompt": COUNTED, "max_tokens": 16, "temperature": 0}
        full = client.post("/generate_full", json=own).json()
        assert client.post("/generate", json=own).text == full["text"]
        assert full["completion_tokens"] == 16
        # OPEA: the final event has the non-streamed answer's counts and speculation.
        opea = {"query": COUNTED, "max_new_tokens": 16, "temperature": 0}
        doc = client.post("/v1/spec_decode/completions", json={**opea, "streaming": False}).json()
        events = sse_payloads(
            client.post("/v1/spec_decode/completions", json={**opea, "streaming": True}).text
        )
        final = events[-1]
        assert "".join(e["text"] for e in events) == doc["text"]
        assert len([e for e in events if e["text"]]) > 1  # deltas, not one chunk
        counted = ("prompt_tokens", "completion_tokens", "finish_reason", "speculation")
        assert {k: final[k] for k in counted} == {k: doc[k] for k in counted}
        assert doc["completion_tokens"] == 16
        # OpenAI: stream_options.include_usage reports the usage of the unstreamed answer.
        for route, request in [
            ("/v1/completions", {"prompt": COUNTED}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": COUNTED}]}),
        ]:
            body = {"model": MODEL, "max_tokens": 16, "temperature": 0, **request}
            reply = client.post(route, json=body).json()
            chunks = sse_payloads(
                client.post(
                    route,
                    json={**body, "stream": True, "stream_options": {"include_usage": True}},
                ).text
            )
            usage = ("prompt_tokens", "completion_tokens", "total_tokens")
            streamed = {k: chunks[-1]["usage"][k] for k in usage}
            assert streamed == {k: reply["usage"][k] for k in usage}, route
            assert reply["usage"]["completion_tokens"] == 16, route
