"""The OpenAI surface through a real ``bentoml serve``, called with the official ``openai`` client.

Tool calls with a named or ``required`` tool choice and ``response_format`` are forced by vLLM's
structured output, so even the 135M CPU model answers them deterministically; requests are greedy.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import jsonschema
import pytest

from bentospec.metrics import SpecCounters
from bentospec.profile import load_profile
from tests.conftest import BentoServer, openai_client, sse_payloads

pytestmark = pytest.mark.server

MODEL = load_profile("cpu").served_model_name
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_PARAMETERS,
        # As with OpenAI, only strict tools get their arguments forced to the schema (vLLM's
        # default --tool-strict-level auto); the call's envelope and name are forced anyway.
        "strict": True,
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
NAMED_CHOICE = {"type": "function", "function": {"name": "get_weather"}}
CAPITAL_SCHEMA = {
    "type": "object",
    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["country", "capital"],
    "additionalProperties": False,
}
# Repeats the JSON the answer should hold, so that ngram lookup finds drafts in the prompt.
CAPITAL_QUESTION = [
    {
        "role": "user",
        "content": 'Reply in JSON like {"country": "France", "capital": "Paris"}. '
        "What is the capital of France?",
    }
]


def _tool_call(server: BentoServer, tool_choice: Any, stream: bool) -> tuple[str, str, str]:
    """(function name, arguments, finish reason) of the first tool call of a greedy chat."""
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": WEATHER_QUESTION,
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": tool_choice,
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 128,
    }
    client = openai_client(server, max_retries=0)
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        calls = choice.message.tool_calls
        assert calls, choice.message
        assert calls[0].type == "function" and calls[0].id
        return calls[0].function.name, calls[0].function.arguments, choice.finish_reason
    name, arguments, finish, ids = "", "", "", set()
    for chunk in client.chat.completions.create(**request, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or ():
            assert call.index == 0, "parallel_tool_calls=False: one call"
            if call.id:
                ids.add(call.id)
            if call.function and call.function.name:
                name += call.function.name
            if call.function and call.function.arguments:
                arguments += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert len(ids) == 1, ids
    return name, arguments, finish


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("tool_choice", "finish_reason"),
    # OpenAI's finish reasons: "tool_calls" when the model had to call a tool, "stop" for a
    # call of the named function.
    [("required", "tool_calls"), (NAMED_CHOICE, "stop")],
    ids=["required", "named"],
)
def test_forced_tool_call_matches_the_tool_schema(
    server: BentoServer, tool_choice: Any, finish_reason: str, stream: bool
) -> None:
    name, arguments, finish = _tool_call(server, tool_choice, stream)
    # "required" may pick either tool; the named choice only get_weather.
    tools = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_TOOL["function"]["parameters"]}
    assert name in tools if tool_choice == "required" else name == "get_weather"
    jsonschema.validate(json.loads(arguments), tools[name])
    assert finish == finish_reason


def test_auto_tool_choice_answers(server: BentoServer) -> None:
    """With "auto" the model decides; SmolLM2 (which never sees the tools) answers in text."""
    reply = openai_client(server, max_retries=0).chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        temperature=0,
        max_tokens=32,
    )
    message = reply.choices[0].message
    for call in message.tool_calls or ():
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    assert message.tool_calls or message.content


def _metrics(server: BentoServer) -> SpecCounters:
    return SpecCounters.from_prometheus_text(httpx.get(f"{server.url}/metrics").text)


def _counters_after(server: BentoServer, before: SpecCounters) -> SpecCounters:
    """Spec-decode counters moved since ``before``, once vLLM has recorded the last steps.

    vLLM records a step's spec-decode stats with a later step's scheduler stats, so an idle
    engine may hold back the last ones: a one-token request (no speculation) flushes them.
    """
    openai_client(server, max_retries=0).completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    deadline = time.monotonic() + 30
    while (moved := _metrics(server) - before).draft_tokens == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    return moved


RESPONSE_FORMATS = {
    "json_schema": {
        "type": "json_schema",
        "json_schema": {"name": "capital", "schema": CAPITAL_SCHEMA, "strict": True},
    },
    "json_object": {"type": "json_object"},
}


@pytest.mark.parametrize("kind", list(RESPONSE_FORMATS))
@pytest.mark.parametrize("profile_name", ["cpu", "cpu-draft"])
def test_structured_output_with_speculation(
    request: pytest.FixtureRequest, profile_name: str, kind: str
) -> None:
    server: BentoServer = request.getfixturevalue(
        "server" if profile_name == "cpu" else "draft_server"
    )
    before = _metrics(server)
    reply = openai_client(server, max_retries=0).chat.completions.create(
        model=MODEL,
        messages=CAPITAL_QUESTION,
        response_format=RESPONSE_FORMATS[kind],
        temperature=0,
        max_tokens=64,
    )
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop", content
    value = json.loads(content)
    if kind == "json_schema":
        jsonschema.validate(value, CAPITAL_SCHEMA)
    else:
        assert isinstance(value, dict)
    moved = _counters_after(server, before)
    # Drafts were proposed and verified under the grammar; ngram copies the JSON from the
    # prompt, so some are accepted (the truncated draft model rarely agrees with the target).
    assert moved.draft_tokens > 0, moved
    if profile_name == "cpu":
        assert moved.accepted_tokens > 0, moved


# --- More routes ------------------------------------------------------------------------------


def test_responses_api_answers_as_chat_does(server: BentoServer) -> None:
    """A Responses request renders the same conversation as chat: same greedy answer."""
    client, question = openai_client(server, max_retries=0), "What is the capital of France?"
    response = client.responses.create(
        model=MODEL, input=question, temperature=0, max_output_tokens=16
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=16,
    )
    assert response.status in ("completed", "incomplete"), response
    assert response.output_text and response.output_text == chat.choices[0].message.content


@pytest.mark.parametrize(
    "content",
    [[{"type": "refusal", "refusal": "I cannot say."}], []],
    ids=["refusal", "empty"],
)
def test_responses_replaying_an_assistant_refusal_or_empty_message_completes(
    server: BentoServer, content: list[dict[str, str]]
) -> None:
    """vLLM 0.32 read ``content[0].text`` of replayed assistant output: a 500 (fuzzer find)."""
    replayed = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed"}
    response = openai_client(server, max_retries=0).responses.create(
        model=MODEL,
        input=[{**replayed, "content": content}, {"role": "user", "content": "Then say hi."}],
        temperature=0,
        max_output_tokens=4,
    )
    assert response.status in ("completed", "incomplete") and response.output_text, response


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "messages", 5),
        ("/v1/chat/completions", "structured_outputs", 1309),
        ("/v1/completions", "structured_outputs", [1]),
    ],
)
def test_fields_of_a_type_vllm_crashes_on_are_400s_naming_them(
    server: BentoServer, path: str, field: str, value: object
) -> None:
    """Found by the OpenAPI fuzzer: vLLM answered these with a 500."""
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    body = {"model": MODEL, "max_tokens": 4, **(chat if "chat" in path else {"prompt": "Hi"})}
    response = httpx.post(f"{server.url}{path}", json={**body, field: value}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_tokenize_and_detokenize_round_trip(server: BentoServer) -> None:
    text = "The capital of France is Paris."
    with httpx.Client(base_url=server.url, timeout=60) as client:
        tokens = client.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0, tokens
        back = client.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]})
        assert back.status_code == 200, back.text
    assert back.json()["prompt"] == text


def test_routes_of_vllm_kept_private(server: BentoServer) -> None:
    """Only the documented routes of ``vllm serve`` are served (no LoRA loading, no profiler)."""
    for path in ("/v1/load_lora_adapter", "/start_profile", "/v1/messages"):
        assert httpx.post(f"{server.url}{path}", json={}).status_code == 404, path


# --- OPEA's string `messages` ------------------------------------------------------------------

OPEA_CHAT = {"model": MODEL, "messages": "What is Deep Learning?", "max_tokens": 17}


def _sse_text(response: httpx.Response) -> str:
    chunks = sse_payloads(response.read().decode())
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_opea_string_messages_is_one_user_message(server: BentoServer, stream: bool) -> None:
    """OPEA's form answers as the same conversation with one user message would (greedy)."""
    url = f"{server.url}/v1/chat/completions"
    as_list = [{"role": "user", "content": OPEA_CHAT["messages"]}]
    texts = []
    with httpx.Client(timeout=120) as client:
        for messages in (OPEA_CHAT["messages"], as_list):
            body = {**OPEA_CHAT, "messages": messages, "temperature": 0, "stream": stream}
            if stream:
                with client.stream("POST", url, json=body) as r:
                    assert r.status_code == 200, r.read()
                    texts.append(_sse_text(r))
            else:
                r = client.post(url, json=body)
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["message"]["content"])
    assert texts[0] and texts[0] == texts[1]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_opea_verbatim_string_messages_request(server: BentoServer, stream: bool) -> None:
    """OPEA's documented request, as sent (no temperature): 200 with 17 tokens at most."""
    url = f"{server.url}/v1/chat/completions"
    with httpx.Client(timeout=120) as client:
        if stream:
            with client.stream("POST", url, json={**OPEA_CHAT, "stream": True}) as r:
                assert r.status_code == 200, r.read()
                assert _sse_text(r)
            return
        r = client.post(url, json=OPEA_CHAT)
    assert r.status_code == 200, r.text
    assert 0 < r.json()["usage"]["completion_tokens"] <= 17
