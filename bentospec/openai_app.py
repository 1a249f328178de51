"""Glue to vLLM 0.32's own OpenAI serving layer, around the engine the service owns.

The serving layer is vLLM-internal (``vllm.entrypoints.launchers``): it is reached through
:mod:`bentospec.vllm_api`, like everything else the project takes from vLLM.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentospec import vllm_api
from bentospec.engine import SpecEngine
from bentospec.errors import RequestRejected, openai_rejection, unavailable
from bentospec.gate import engine_failed, not_ready
from bentospec.generation import check_sampling

CHAT_PATH = "/v1/chat/completions"
RESPONSES_PATH = "/v1/responses"
#: The routes of vLLM's serving layer the service exposes: what OpenAI-SDK clients call
#: (``/v1/responses`` is stateless: retrieving or cancelling stored responses needs vLLM's
#: in-memory store, which is off), plus vLLM's tokenizer routes. The rest stays private.
OPENAI_ROUTES = frozenset(
    {
        "/v1/models",
        "/v1/completions",
        CHAT_PATH,
        RESPONSES_PATH,
        "/tokenize",
        "/detokenize",
    }
)
#: Swagger UI group of these routes.
OPENAI_TAG = "OpenAI"
_SUPPORTED_TASKS = ("generate",)


@contextlib.asynccontextmanager
async def _no_lifespan(_: FastAPI) -> AsyncIterator[None]:
    # vLLM's lifespan assumes it owns the engine; here the service does.
    yield


def build_openai_app() -> FastAPI:
    """vLLM's OpenAI routes and error handlers on an app of ours; serves 503 until :func:`attach`.

    vLLM's own app comes with the rest of ``vllm serve``'s API and a finished middleware stack,
    so its :data:`OPENAI_ROUTES` move to a fresh app where the readiness gate can be added.
    Built at import time so that BentoML's ``/docs.json`` lists the routes.
    """
    vllm_app = vllm_api.build_serve_app(vllm_api.serve_args(), _SUPPORTED_TASKS)
    # No docs routes of its own: BentoML's Swagger UI (``/``, ``/docs.json``) lists these routes.
    app = FastAPI(
        title="OpenAI-compatible API (vLLM)",
        lifespan=_no_lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    for route in vllm_app.router.routes:
        if isinstance(route, APIRoute) and route.path in OPENAI_ROUTES:
            route.tags = [OPENAI_TAG]
            app.router.routes.append(route)
    app.exception_handlers.update(vllm_app.exception_handlers)
    for failure in vllm_api.engine_failures():
        app.exception_handlers[failure] = _engine_failed
    app.state.bentospec_engine = None
    app.state.bentospec_attached = False
    app.add_middleware(RequestRewriteMiddleware)

    @app.middleware("http")
    async def _guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        engine: SpecEngine | None = request.app.state.bentospec_engine
        if (refusal := not_ready(engine)) is not None:
            return refusal
        if not request.app.state.bentospec_attached:  # ready, serving layer not yet
            return unavailable("engine is loading")
        assert engine is not None  # not_ready answered for a missing one
        if request.method == "POST" and (refused := await _refused(request, engine)):
            return refused
        return await call_next(request)

    return app


async def _engine_failed(request: Request, exc: Exception) -> JSONResponse:
    """vLLM's own handler stops ``vllm serve``'s uvicorn server (``app.state.server``, which
    BentoML owns here, so it failed with a bare 500); the service's watchdog acts instead."""
    return engine_failed(request.app.state.bentospec_engine, exc)


#: Fields whose JSON type vLLM 0.32 does not check before using them, with the types it needs:
#: a ``messages`` that is neither a list nor OPEA's one string gets "'int' object is not
#: iterable", a ``structured_outputs`` that is not an object "'int' object has no attribute
#: 'get'", both as 500s.
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "messages": ((str, list), "a list of messages or one string"),
    "structured_outputs": ((dict, type(None)), "an object (choice, regex, json, grammar, ...)"),
}


async def _refused(request: Request, engine: SpecEngine) -> JSONResponse | None:
    """400 naming the field for what vLLM would run anyway or refuse without naming it.

    ``n`` beyond the profile's ``max_num_seqs`` would fill the batch with one request's copies
    and queue everyone else; fields of :data:`_FIELD_TYPES` of another JSON type crash vLLM's
    request parsing (a 500); sampling that speculation cannot honour is refused by vLLM only
    once a stream has started (:func:`check_sampling`).
    """
    try:
        body = await request.json()
    except ValueError:
        return None  # vLLM answers malformed JSON itself
    if not isinstance(body, dict):
        return None
    n, limit = body.get("n"), engine.profile.engine.max_num_seqs
    try:
        if isinstance(n, int) and n > limit:
            raise RequestRejected(
                "n", f"n must be at most {limit} (the profile's max_num_seqs), got {n}"
            )
        for field, (types, expected) in _FIELD_TYPES.items():
            if field in body and not isinstance(body[field], types):
                raise RequestRejected(field, f"must be {expected}")
        min_p, temperature = body.get("min_p") or 0.0, body.get("temperature")
        if isinstance(min_p, int | float) and isinstance(temperature, int | float | None):
            # Other types: vLLM's request model names the field.
            check_sampling(
                engine, min_p=min_p, temperature=temperature, logit_bias=body.get("logit_bias")
            )
    except RequestRejected as exc:
        return openai_rejection(exc)
    return None


class RequestRewriteMiddleware:
    """Rewrites request bodies that vLLM's serving layer would misread, before it reads them.

    - Chat requests whose ``messages`` is one string become one user message: OPEA's LLM
      microservice accepts ``{"messages": "What is Deep Learning?"}`` and its clients send it;
      vLLM's request model only takes a list of messages.
    - Responses requests whose input replays an assistant message: vLLM 0.32 reads only
      ``content[0].text`` of it, so a refusal part (or an empty content list) raised a 500; the
      parts become one ``output_text`` with their text.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rewrite = _REWRITES.get(scope["path"]) if scope["type"] == "http" else None
        if rewrite is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body arrived
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = _rewritten(b"".join(chunks), rewrite)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # later reads wait for the disconnect, as vLLM's cancellation expects
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)


def _rewritten(body: bytes, rewrite: Callable[[dict[str, Any]], bool]) -> bytes:
    """``body`` after ``rewrite`` (which says whether it changed the request); else as is."""
    try:
        request = json.loads(body)
    except ValueError:
        return body  # vLLM answers malformed JSON itself
    if not isinstance(request, dict) or not rewrite(request):
        return body
    return json.dumps(request).encode()


def _messages_as_list(request: dict[str, Any]) -> bool:
    """A string ``messages`` becomes ``[{"role": "user", ...}]``."""
    if not isinstance(request.get("messages"), str):
        return False
    request["messages"] = [{"role": "user", "content": request["messages"]}]
    return True


def _assistant_output_as_text(request: dict[str, Any]) -> bool:
    """Assistant output messages in ``input`` get one ``output_text`` part with all their text
    (refusals included); parts of other types are left for vLLM to validate."""
    items = request.get("input")
    changed = False
    for item in items if isinstance(items, list) else ():
        if not (isinstance(item, dict) and item.get("type") == "message"):
            continue
        parts = item.get("content")
        if item.get("role") != "assistant" or not isinstance(parts, list):
            continue
        texts = [_part_text(part) for part in parts]
        if all(isinstance(text, str) for text in texts):
            item["content"] = [{"type": "output_text", "text": "".join(texts), "annotations": []}]
            changed = True
    return changed


def _part_text(part: object) -> str | None:
    if isinstance(part, dict):
        key = {"output_text": "text", "refusal": "refusal"}.get(str(part.get("type")))
        if key is not None and isinstance(part.get(key), str):
            return part[key]
    return None


_REWRITES: dict[str, Callable[[dict[str, Any]], bool]] = {
    CHAT_PATH: _messages_as_list,
    RESPONSES_PATH: _assistant_output_as_text,
}


def serving_argv(engine: SpecEngine) -> list[str]:
    """``vllm serve`` flags of the profile's model name, tool calling and chat template."""
    profile = engine.profile
    openai = profile.openai
    argv = [
        "--model",
        engine.model_path or profile.model.id,
        "--served-model-name",
        profile.served_model_name,
    ]
    if openai.tool_call_parser is not None:
        argv += ["--tool-call-parser", openai.tool_call_parser]
    if openai.enable_auto_tool_choice:
        argv.append("--enable-auto-tool-choice")
    if (template := openai.chat_template_file) is not None:
        argv += ["--chat-template", str(template)]
    return argv


def detach(app: FastAPI) -> None:
    """503 "engine is loading" until :func:`attach` points the serving layer at a new engine."""
    app.state.bentospec_attached = False


def store_engine(app: FastAPI, engine: SpecEngine) -> None:
    """Keep ``engine`` on ``app``, whose routes answer 503 with its state until :func:`attach`
    points vLLM's serving layer at it."""
    app.state.bentospec_engine = engine


async def attach(app: FastAPI, engine: SpecEngine) -> None:
    """Point vLLM's serving state at ``engine`` (call once it is ready)."""
    store_engine(app, engine)
    args = vllm_api.serve_args(serving_argv(engine))
    # `vllm serve` hands the engine's structured-output config (reasoning parser included, set
    # from the profile by engine_args) to its serving layer: the same object here.
    args.structured_outputs_config = engine.llm.vllm_config.structured_outputs_config
    await vllm_api.attach_serve_state(engine.llm, app.state, args, _SUPPORTED_TASKS)
    app.state.bentospec_attached = True
