"""The OpenAPI fuzzer (schemathesis) on every route the service's ``/docs.json`` lists: our own,
vLLM's OpenAI ones and OPEA's, against the live ``cpu`` server (ngram speculation).

Property: no 5xx, every 4xx a JSON body that says what is wrong, and the engine ready after
every request. Generation is kept short (:func:`cap_generation`, applied to every generated
case) and the example budget fixed (:func:`tests.conftest.fuzz_settings`) so that the run fits
CI. (schemathesis' own pytest plugin does not run under pytest 9, so its strategies are used
with hypothesis directly.)
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from schemathesis import Case, GenerationMode

from tests.conftest import BentoServer, fuzz_settings

pytestmark = pytest.mark.server

#: Generated requests ask for at most this many tokens, through whichever field their API has.
MAX_FUZZ_TOKENS = 8
TOKEN_FIELDS = ("max_tokens", "max_new_tokens", "max_completion_tokens", "max_output_tokens")
#: The field each generating route reads when a request sets none: left out, vLLM generates up
#: to the context (2048 tokens), OPEA 1024, ``/generate`` 256.
DEFAULT_TOKEN_FIELD = {
    "/generate": "max_tokens",
    "/generate_full": "max_tokens",
    "/v1/completions": "max_tokens",
    "/v1/chat/completions": "max_tokens",
    "/v1/responses": "max_output_tokens",
    "/v1/spec_decode/completions": "max_new_tokens",
}
#: Every route is fuzzed: the budget per route stays small because the routes are many.
EXAMPLES_PER_ROUTE = 15


@pytest.fixture(scope="module")
def service_schema(server: BentoServer) -> Any:
    """The service's spec, with schemathesis' masking of "secret-looking" values off: it
    printed ``max_completion_tokens``, ``return_token_ids`` and ``session_id`` as
    ``[Filtered]`` in reproductions, and this service's fields are no secrets."""
    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    schema.config.output.sanitization.update(enabled=False)
    return schema


def test_reproductions_keep_every_value(service_schema: Any) -> None:
    chat = service_schema["/v1/chat/completions"]["POST"]
    body = {"model": "m", "messages": [], "max_completion_tokens": 3, "session_id": "s-1"}
    curl = chat.Case(body=body).as_curl_command()
    assert '"max_completion_tokens": 3' in curl and '"session_id": "s-1"' in curl, curl


def cap_generation(case: Case) -> None:
    """Cap generation in place: a fuzzed ``max_tokens`` of 10**9 is valid, and takes hours; so
    is one of ``null``, which generates up to the context as a field left out does."""
    body = case.body
    if not isinstance(body, dict) or case.path not in DEFAULT_TOKEN_FIELD:
        return
    if all(body.get(name) is None for name in TOKEN_FIELDS):
        body[DEFAULT_TOKEN_FIELD[case.path]] = MAX_FUZZ_TOKENS
    for name in TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_FUZZ_TOKENS:
            body[name] = MAX_FUZZ_TOKENS


def problem_of(response: Any) -> str | None:
    """What breaks the property for one response, or ``None``."""
    status = response.status_code
    if status >= 500:
        return f"server error {status}: {response.text[:500]}"
    if status < 400:
        return None
    try:
        body = json.loads(response.text)
    except ValueError:
        return f"{status} without a JSON body: {response.text[:300]}"
    if isinstance(body, list) and len(body) == 1:
        body = body[0]  # BentoML 1.4 answers an API's 4xx as a one-item list (a stray comma)
    message = body.get("error", body.get("detail")) if isinstance(body, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    if not message:
        return f"{status} without a message: {response.text[:300]}"
    return None


def operations(schema: Any, mode: GenerationMode) -> list[Any]:
    """The routes to fuzz in ``mode``: all of them, or those with a body to break."""
    found = [result.ok() for result in schema.get_all_operations()]
    assert len(found) >= 14  # ours, OpenAI's and OPEA's
    return [op for op in found if mode is GenerationMode.POSITIVE or op.body]


def test_every_route_schema_generates_requests(service_schema: Any, subtests: Any) -> None:
    """The spec itself: every route's schema is one an OpenAPI tool can generate from (BentoML
    labelled its JSON Schema 2020-12 schemas OpenAPI 3.0, which schemathesis rejected)."""
    for operation in operations(service_schema, GenerationMode.POSITIVE):
        with subtests.test(route=f"{operation.method.upper()} {operation.path}"):
            assert_generates(operation)


def assert_generates(operation: Any) -> None:
    @settings(max_examples=3, deadline=None, derandomize=True)
    @given(case=operation.as_strategy())
    def generates(case: Case) -> None:
        assert case.path == operation.path

    generates()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_5xx_or_kills_the_engine(
    service_schema: Any, server: BentoServer, mode: GenerationMode, subtests: Any
) -> None:
    """Every route, with requests that follow its schema (positive) and that break it."""
    for operation in operations(service_schema, mode):
        with subtests.test(route=f"{operation.method.upper()} {operation.path}"):

            @fuzz_settings(max_examples=EXAMPLES_PER_ROUTE)
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Case) -> None:
                cap_generation(case)
                response = case.call(timeout=120)
                problem = problem_of(response)
                assert problem is None, f"{problem}\nReproduce with: {case.as_curl_command()}"
                ready = httpx.get(f"{server.url}/readyz", timeout=10).status_code
                assert ready == 200, f"engine not ready after {case.method} {case.path}"

            check()
