"""The whole sampling space, generated, against live speculative engines (ngram, the adaptive
``custom_class`` proposer, a draft model), several requests batched at once.

Property: every request completes (200 with text, streams closed by ``[DONE]``) unless the
service's documented contract refuses it, and then it gets a 4xx whose JSON body names the
field; the engine is ready after every batch. Examples chosen by hand missed that ``top_k``
without ``top_p`` killed the engine core (docs/upstream/vllm-cpu-top-k-empty-step.md).

CI runs a fixed number of examples from a fixed seed; ``BENTOSPEC_FUZZ_EXAMPLES=N`` runs N
random examples per profile instead (see :func:`tests.conftest.fuzz_settings`).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from bentospec import vllm_api
from bentospec.model_store import resolve_model
from bentospec.profile import load_profile
from tests.conftest import BentoServer, fuzz_settings, sse_events

pytestmark = pytest.mark.server

#: Profile name -> the session fixture serving it.
SERVERS = {"cpu": "server", "cpu-adaptive": "adaptive_server", "cpu-draft": "draft_server"}
MODEL = load_profile("cpu").served_model_name
#: A document the answer copies from (ngram and the draft find matches) and open prompts that
#: give ngram nothing to copy.
DOCUMENT = (
    "The Brewmaster 300 must be descaled every 60 days. Descaling the Brewmaster 300 takes "
    "20 minutes and needs one bottle of Brewmaster descaler."
)
QUESTIONS = ["How often must the Brewmaster 300 be descaled?", "The river", "Hi"]
RAW_PROMPTS = [f"{DOCUMENT}\n{DOCUMENT}\nThe Brewmaster 300", "The river", "1, 2, 3,"]
JSON_SCHEMA = {
    "type": "object",
    "properties": {"days": {"type": "integer"}, "unit": {"enum": ["days", "weeks"]}},
    "required": ["days", "unit"],
}
#: ``None`` for left out. Temperature: greedy (0), and any value up to the largest, tiny ones
#: included (vLLM samples at all of them, raising those below 0.01 to 0.01); top-k off, 1,
#: small and the whole vocabulary (added per profile); top-p from tiny to 1; min-p mostly left
#: out (refused with speculation unless greedy).
temperatures = st.one_of(
    st.none(), st.just(0.0), st.floats(1e-9, 1e-2), st.floats(1e-9, 2.0), st.just(2.0)
)
top_ps = st.sampled_from([None, 1.0, 1e-3, 0.5, 0.95])
min_ps = st.sampled_from([None, None, None, 0.0, 0.05])
penalties = st.floats(-2.0, 2.0).map(lambda x: round(x, 2))
repetition_penalties = st.floats(0.5, 2.0).map(lambda x: round(x, 2))
max_tokens = st.integers(1, 64)
stops = st.lists(st.sampled_from(["\n", ".", " the", "Brewmaster"]), max_size=3, unique=True)
seeds = st.integers(0, 2**31)


@dataclass
class Call:
    """One HTTP request of a batch, and what the contract says of it."""

    path: str
    body: dict[str, Any]
    stream: bool
    #: Fields the service refuses for this body and profile (documented, not guessed): the
    #: request must get a 4xx naming one of them; empty: it must complete.
    refused: set[str] = field(default_factory=set)


def optional(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Each of ``fields`` present or left out (the API's default)."""
    return st.fixed_dictionaries({}, optional=fields)


def vocab_size(profile_name: str) -> int:
    config = Path(resolve_model(load_profile(profile_name).model.id)) / "config.json"
    return int(json.loads(config.read_text())["vocab_size"])


def drawn(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Every field drawn, ``None`` leaving it out: the sampling values come in all their
    combinations (``top_k`` with and without ``top_p`` reached the engine-killing path)."""
    return st.fixed_dictionaries(fields).map(
        lambda body: {k: v for k, v in body.items() if v is not None}
    )


def sampling(vocab: int, *, min_p: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    """Temperature, top-k, top-p (and min-p), each set or left out."""
    fields = {
        "temperature": temperatures,
        "top_k": st.sampled_from([None, -1, 0, 1, 5, vocab]),
        "top_p": top_ps,
    }
    return drawn({**fields, "min_p": min_ps} if min_p else fields)


#: Set or left out, independently.
OTHER_SAMPLING_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "seed": seeds,
    "presence_penalty": penalties,
    "frequency_penalty": penalties,
    "repetition_penalty": repetition_penalties,
}


@st.composite
def openai_calls(draw: st.DrawFn, vocab: int) -> Call:
    """``/v1/completions`` or ``/v1/chat/completions`` as the openai SDK sends them."""
    chat = draw(st.booleans())
    stream = draw(st.booleans())
    body: dict[str, Any] = {"model": MODEL, "max_tokens": draw(max_tokens), "stream": stream}
    body |= draw(sampling(vocab))
    body |= draw(optional({**OTHER_SAMPLING_FIELDS, "n": st.integers(1, 3), "stop": stops}))
    if draw(st.booleans()):
        body["min_tokens"] = draw(st.integers(0, body["max_tokens"] + 4))
    # Mostly left out, like min_p: always refused with speculation.
    if (logit_bias := draw(st.sampled_from([None, None, None, {"13": 1.0}]))) is not None:
        body["logit_bias"] = logit_bias  # a token id of every vocabulary
    refused = refusals("", body)
    if body.get("n", 1) > 1 and vllm_api.greedy(body.get("temperature", 1.0)):
        refused.add("n")  # vLLM: copies of one greedy answer
    if body.get("min_tokens", 0) > body["max_tokens"]:
        refused.add("min_tokens")
    if chat:
        body["messages"] = [{"role": "user", "content": draw(st.sampled_from(QUESTIONS))}]
        if draw(st.booleans()):
            body["logprobs"] = True
            body["top_logprobs"] = draw(st.integers(0, 5))
        body |= draw(
            optional(
                {
                    "response_format": st.sampled_from(
                        [
                            {"type": "json_object"},
                            {
                                "type": "json_schema",
                                "json_schema": {"name": "a", "schema": JSON_SCHEMA},
                            },
                        ]
                    )
                }
            )
        )
        return Call("/v1/chat/completions", body, stream, refused)
    body["prompt"] = draw(st.sampled_from(RAW_PROMPTS))
    body |= draw(
        optional(
            {
                "logprobs": st.integers(0, 5),
                "structured_outputs": st.sampled_from(
                    [{"choice": ["yes", "no"]}, {"regex": "[a-z ]{1,20}"}, {"json": JSON_SCHEMA}]
                ),
            }
        )
    )
    return Call("/v1/completions", body, stream, refused)


@st.composite
def own_calls(draw: st.DrawFn, profile_name: str, vocab: int) -> Call:
    """``/generate`` (streams text) or ``/generate_full``."""
    stream = draw(st.booleans())
    body = {"prompt": draw(st.sampled_from(RAW_PROMPTS)), "max_tokens": draw(max_tokens)}
    body |= draw(sampling(vocab))
    body |= draw(optional({**OTHER_SAMPLING_FIELDS, "stop": stops, "speculation": st.just("off")}))
    return Call(
        "/generate" if stream else "/generate_full", body, stream, refusals(profile_name, body)
    )


@st.composite
def opea_calls(draw: st.DrawFn, profile_name: str, vocab: int) -> Call:
    """OPEA ``spec_decode``, with and without documents, with OPEA's defaults where left out."""
    stream = draw(st.booleans())
    body: dict[str, Any] = {
        "query": draw(st.sampled_from(QUESTIONS)),
        "max_new_tokens": draw(max_tokens),
        "streaming": stream,
    }
    if draw(st.booleans()):
        body["documents"] = [DOCUMENT]
    body |= draw(sampling(vocab, min_p=False))  # OPEA has no min_p or seed
    others = {k: v for k, v in OTHER_SAMPLING_FIELDS.items() if k != "seed"}
    body |= draw(optional({**others, "speculation": st.just("off")}))
    return Call("/v1/spec_decode/completions", body, stream, refusals(profile_name, body))


def refusals(profile_name: str, body: dict[str, Any]) -> set[str]:
    """The README's rules: with speculation ``min_p`` is refused unless the request is greedy
    (vLLM's rule: temperature 0; SmolLM2's generation config sets none, so 1.0 when left out)
    and ``logit_bias`` always; ``speculation: off`` needs the adaptive proposer."""
    refused = set()
    temperature = body.get("temperature", 1.0)
    if vllm_api.applies_min_p(min_p=body.get("min_p", 0.0), temperature=temperature):
        refused.add("min_p")
    if body.get("logit_bias"):
        refused.add("logit_bias")
    if body.get("speculation") == "off" and profile_name != "cpu-adaptive":
        refused.add("speculation")
    return refused


#: The request of issue 19 that killed the engine core (``top_k`` without ``top_p``).
ISSUE_19 = Call(
    "/v1/completions",
    {"model": MODEL, "prompt": "The river", "max_tokens": 20, "temperature": 0.8, "top_k": 10},
    stream=False,
)


def batches(profile_name: str) -> st.SearchStrategy[list[Call]]:
    vocab = vocab_size(profile_name)
    one = openai_calls(vocab) | own_calls(profile_name, vocab) | opea_calls(profile_name, vocab)
    return st.lists(one, min_size=1, max_size=4)


def send(client: httpx.Client, call: Call) -> str | None:
    """Send ``call``; ``None`` if the outcome keeps the contract, else what broke it."""
    with client.stream("POST", call.path, json=call.body) as response:
        text = response.read().decode()
    status = response.status_code
    if call.refused:
        if not 400 <= status < 500:
            return f"expected a 4xx naming {sorted(call.refused)}, got {status}: {text[:300]}"
        try:
            json.loads(text)
        except ValueError:
            return f"{status} without a JSON body: {text[:300]}"
        if not any(re.search(rf"\b{name}\b", text) for name in call.refused):
            return f"{status} does not name {sorted(call.refused)}: {text[:300]}"
        return None
    if status != 200:
        return f"{status}: {text[:500]}"
    if call.path == "/generate":
        return None  # raw text deltas; a stream cut off by an engine death raises in read()
    if call.stream:
        events = sse_events(text)
        if not events or events[-1] != "[DONE]":
            return f"stream not closed by [DONE]: {text[-300:]}"
        if any('"error"' in e for e in events):
            return f"error event in the stream: {text[-500:]}"
        return None
    reply = json.loads(text)
    if call.path.startswith("/v1/") and "choices" in reply:
        expected = call.body.get("n", 1)
        if len(reply["choices"]) != expected:
            return f"{len(reply['choices'])} choices for n={expected}"
        return None if all(c["finish_reason"] for c in reply["choices"]) else f"unfinished: {reply}"
    return None if isinstance(reply.get("text"), str) else f"no text: {reply}"


@pytest.mark.parametrize("profile_name", list(SERVERS))
def test_every_generated_request_completes_or_names_its_field(
    profile_name: str, request: pytest.FixtureRequest
) -> None:
    server: BentoServer = request.getfixturevalue(SERVERS[profile_name])

    @fuzz_settings()
    @given(batch=batches(profile_name))
    @example(batch=[ISSUE_19])
    def check(batch: list[Call]) -> None:
        with (
            httpx.Client(base_url=server.url, timeout=300) as client,
            ThreadPoolExecutor(len(batch)) as pool,
        ):
            broken = [
                f"{call.path} {json.dumps(call.body)}: {problem}"
                for call, problem in zip(
                    batch, pool.map(lambda c: send(client, c), batch), strict=True
                )
                if problem is not None
            ]
            ready = client.get("/readyz").status_code
        for call in batch:  # hypothesis records events in the test's thread only
            event(f"refused: {sorted(call.refused)}" if call.refused else call.path)
        assert not broken, "\n".join(broken)
        assert ready == 200, "the engine is not ready after the batch"

    check()
