"""OPEA GenAIComps ``spec_decode`` compatible routes, for users migrating from OPEA.

``POST /v1/spec_decode/completions`` takes OPEA's ``LLMParamsDoc`` fields; the prompt is built
from ``prompts/`` (RAG template with documents, plain without) and the model's chat template.
Streaming answers are proper SSE: ``data: {json}`` events and ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from bentospec.engine import EngineStatus, EngineUnavailable, SpecEngine
from bentospec.generation import (
    RequestRejected,
    check_request,
    generate_full,
    speculation_stats,
    stream_outputs,
)
from bentospec.prompts import PromptTemplates, chat_prompt
from bentospec.schemas import GenerateResult, HealthStatus, OPEACompletionRequest


class OPEAGeneratedDoc(GenerateResult):
    """OPEA's ``GeneratedDoc`` (``text``, ``prompt``) plus token counts and speculation stats."""

    prompt: str


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, object] = {"error": message, "status": status}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def build_opea_app(templates: PromptTemplates) -> FastAPI:
    """The OPEA routes; ``app.state.engine`` is set by the service once it owns an engine."""
    # No docs routes of its own: BentoML's Swagger UI (``/``, ``/docs.json``) lists these routes.
    app = FastAPI(
        title="OPEA spec_decode compatible API", openapi_url=None, docs_url=None, redoc_url=None
    )
    app.state.engine = None

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return _error(400, f"{field}: {first['msg']}", field)

    def engine_of(request: Request) -> SpecEngine:
        engine: SpecEngine | None = request.app.state.engine
        if engine is None:
            raise EngineUnavailable("engine is loading")
        return engine

    @app.get("/v1/health_check", response_model=HealthStatus)
    async def health_check(request: Request) -> JSONResponse:
        """OPEA health check: 200 once the engine serves, 503 before or after."""
        engine: SpecEngine | None = request.app.state.engine
        status = engine.status if engine is not None else EngineStatus.LOADING
        body = HealthStatus(
            status="ok"
            if status is EngineStatus.READY
            else "loading"
            if status is EngineStatus.LOADING
            else "unavailable",
            engine=status.value,
            profile=engine.profile.name if engine is not None else "",
        )
        return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)

    @app.post(
        "/v1/spec_decode/completions",
        response_model=OPEAGeneratedDoc,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def spec_decode_completions(body: OPEACompletionRequest, request: Request) -> Response:
        """Generate an answer to ``query`` from ``documents`` with speculative decoding."""
        try:
            engine = engine_of(request)
            message = templates.question(body.query, body.document_texts())
            options = body.sampling()
            check_request(
                engine,
                message,
                options,
                prompt_field="query",
                max_tokens_field="max_new_tokens",
            )
            prompt = chat_prompt(engine.llm.get_tokenizer(), message)
        except EngineUnavailable as exc:
            return _error(503, str(exc))
        except RequestRejected as exc:
            return _error(400, str(exc), exc.field)
        if body.streaming:
            return StreamingResponse(_sse(engine, prompt, body), media_type="text/event-stream")
        result = await generate_full(engine, prompt, options)
        return JSONResponse(OPEAGeneratedDoc(**result.model_dump(), prompt=body.query).model_dump())

    return app


async def _sse(engine: SpecEngine, prompt: str, body: OPEACompletionRequest) -> AsyncIterator[str]:
    """SSE events: one per text delta, a last one with finish reason and speculation stats."""
    async for output in stream_outputs(engine, prompt, body.sampling()):
        completion = output.outputs[0]
        if completion.text:
            yield f"data: {json.dumps({'text': completion.text})}\n\n"
        if output.finished:
            final = {
                "text": "",
                "finish_reason": completion.finish_reason,
                "speculation": speculation_stats(engine.profile, output).model_dump(),
            }
            yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"
