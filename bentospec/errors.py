"""The service's errors, and the one answer each gets in each API's shape.

Two kinds of error reach a client: a request the service or vLLM refuses
(:class:`RequestRejected`, HTTP 400 naming the field) and an engine that cannot serve now
(:class:`EngineUnavailable`, HTTP 503 with ``Retry-After``: loading, dead and restarting, or
failed and restarting its worker). Each API answers them in its own shape:

- OpenAI (and every 503): ``{"error": {"message", "type", "param", "code"}}``, which the openai
  SDK parses (and retries on 503, honouring ``Retry-After``);
- OPEA: ``{"error": message, "status": n, "field": f}``;
- the service's own BentoML routes: BentoML's ``[{"error": message}]``, raised as its
  exceptions (the engine gate answers their 503s in OpenAI's shape, before BentoML would
  replace the message with a generic one).

A stream whose response already started ends with the same error object as an SSE event.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from bentoml.exceptions import InvalidArgument, ServiceUnavailable
from starlette.responses import JSONResponse

#: Seconds a client is told to wait (``Retry-After``) while the engine cannot serve: a dead
#: engine is serving again 26-42 s after its death on 2 cores (28.7 s under 16 streams), and a
#: request retried this long after its 503 finds the new engine ready or nearly so.
RETRY_AFTER_SECONDS = 30
#: The message of a request the engine died under: it is safe to send again.
ENGINE_RESTARTED = f"the engine restarted; retry in {RETRY_AFTER_SECONDS} s"


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests now (loading, failed or dead): HTTP 503, retryable."""


class RequestRejected(ValueError):
    """The request is invalid for this profile or for vLLM; ``field`` names the offending
    input (HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def rejected(refusal: Exception, fields: Iterable[str]) -> RequestRejected:
    """vLLM's refusal of a request, naming the field: its ``parameter`` when vLLM set one,
    else the first of ``fields`` (the request's) that its message names."""
    message = str(refusal)
    field = getattr(refusal, "parameter", None)
    if not field:
        named = [(m.start(), f) for f in fields if (m := re.search(rf"\b{f}\b", message))]
        field = min(named)[1] if named else "body"
    return RequestRejected(field, message)


# --- OpenAI's shape (and every 503) -------------------------------------------------------


def openai_error(
    status: int,
    error_type: str,
    message: str,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """``status`` in OpenAI's error shape, which the openai SDK parses and other clients read."""
    return JSONResponse(openai_body(status, error_type, message, param), status, headers)


def openai_body(
    status: int, error_type: str, message: str, param: str | None = None
) -> dict[str, Any]:
    """The body of :func:`openai_error`: also the payload of an SSE error event."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def unavailable(exc: EngineUnavailable | str) -> JSONResponse:
    """503 naming why the engine cannot serve, with the wait before a retry."""
    return openai_error(
        503,
        "ServiceUnavailable",
        f"{exc}; retry in {RETRY_AFTER_SECONDS} s",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def restarted() -> JSONResponse:
    """503 for a request the engine died under (before its response started)."""
    return openai_error(
        503,
        "ServiceUnavailable",
        ENGINE_RESTARTED,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def restarted_event() -> dict[str, Any]:
    """The SSE error event of a stream the engine died under: :func:`restarted`'s body."""
    return openai_body(503, "ServiceUnavailable", ENGINE_RESTARTED)


def openai_rejection(exc: RequestRejected) -> JSONResponse:
    return openai_error(400, "BadRequestError", str(exc), param=exc.field)


# --- OPEA's shape --------------------------------------------------------------------------


def opea_error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, object] = {"error": message, "status": status}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def opea_answer(exc: RequestRejected | EngineUnavailable) -> JSONResponse:
    if isinstance(exc, EngineUnavailable):
        return unavailable(exc)
    return opea_error(400, str(exc), exc.field)


# --- BentoML's (the service's own routes) -------------------------------------------------


@contextlib.contextmanager
def bentoml_answers() -> Iterator[None]:
    """Raise :class:`RequestRejected` as BentoML's 400 (``InvalidArgument``) and
    :class:`EngineUnavailable` as its 503 (whose body the gate answers): the status a
    BentoML API answers with, also for a stream that has not started."""
    try:
        yield
    except RequestRejected as exc:
        raise InvalidArgument(str(exc)) from exc
    except EngineUnavailable as exc:
        raise ServiceUnavailable(str(exc)) from exc
