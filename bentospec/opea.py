"""OPEA GenAIComps ``spec_decode`` compatible routes, for users migrating from OPEA.

``POST /v1/spec_decode/completions`` takes OPEA's ``LLMParamsDoc`` fields; the prompt is built
from ``prompts/`` (RAG template with documents, plain without) and the model's chat template.
Streaming answers are proper SSE (:mod:`bentospec.sse`): ``data: {json}`` events, an error
event if generation fails part-way, keep-alive comments while quiet, and ``data: [DONE]``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import Field
from starlette.responses import JSONResponse, Response, StreamingResponse

from bentospec import sse, vllm_api
from bentospec.engine import EngineStatus, SpecEngine
from bentospec.errors import EngineUnavailable, RequestRejected, opea_answer, opea_error
from bentospec.gate import engine_failed
from bentospec.generation import (
    check_request,
    generate_full,
    speculation_stats,
    stream_outputs,
    tokenized,
)
from bentospec.prompts import PromptTemplates
from bentospec.schemas import (
    GenerateResult,
    HealthStatus,
    OPEACompletionRequest,
)

if TYPE_CHECKING:
    from bentospec.vllm_api import RequestOutput

logger = logging.getLogger(__name__)

#: Swagger UI group of these routes.
OPEA_TAG = "OPEA"


class OPEAGeneratedDoc(GenerateResult):
    """OPEA's ``GeneratedDoc`` (``text``, ``prompt``) plus token counts and speculation stats."""

    prompt: str
    #: Request fields that were accepted but not applied, with the reason.
    ignored_fields: dict[str, str] = Field(default_factory=dict)


def build_opea_app(templates: PromptTemplates) -> FastAPI:
    """The OPEA routes; ``app.state.engine`` is set by the service once it owns an engine."""
    # No docs routes of its own: BentoML's Swagger UI (``/``, ``/docs.json``) lists these routes.
    app = FastAPI(
        title="OPEA spec_decode compatible API", openapi_url=None, docs_url=None, redoc_url=None
    )
    app.state.engine = None

    async def _engine_failed(request: Request, exc: Exception) -> JSONResponse:
        # FastAPI's default is a bare-text 500; clients parse a JSON error.
        return engine_failed(request.app.state.engine, exc)

    for failure in vllm_api.engine_failures():
        app.add_exception_handler(failure, _engine_failed)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return opea_error(400, f"{field}: {first['msg']}", field)

    def engine_of(request: Request) -> SpecEngine:
        engine: SpecEngine | None = request.app.state.engine
        if engine is None:
            raise EngineUnavailable("engine is loading")
        return engine

    @app.get("/v1/health_check", response_model=HealthStatus, tags=[OPEA_TAG])
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
        tags=[OPEA_TAG],
    )
    async def spec_decode_completions(body: OPEACompletionRequest, request: Request) -> Response:
        """Generate an answer to ``query`` from ``documents`` with speculative decoding."""
        try:
            engine = engine_of(request)
            if body.model is not None and body.model != engine.profile.served_model_name:
                return opea_error(
                    404,
                    f"model: {body.model!r} is not served here; this service serves "
                    f"{engine.profile.served_model_name!r}",
                    "model",
                )
            message = templates.question(body.query, body.document_texts(), body.chat_template)
            options = body.sampling()
            check_request(
                engine,
                message,
                options,
                prompt_field="query",
                max_tokens_field="max_new_tokens",
            )
            prompt = await tokenized(engine, message, chat=True, prompt_field="query")
            ignored = body.ignored_fields()
            if ignored:
                logger.warning("OPEA request fields ignored: %s", ignored)
            if body.streaming:
                outputs = stream_outputs(engine, prompt, options)  # checked before the 200
                events = sse.with_keepalive(sse.framed(_events(engine, outputs, ignored)))
                return StreamingResponse(events, media_type="text/event-stream")
            result = await generate_full(engine, prompt, options)
        except (EngineUnavailable, RequestRejected) as exc:
            return opea_answer(exc)
        doc = OPEAGeneratedDoc(**result.model_dump(), prompt=body.query, ignored_fields=ignored)
        return JSONResponse(doc.model_dump())

    return app


async def _events(
    engine: SpecEngine, outputs: AsyncIterator[RequestOutput], ignored: dict[str, str]
) -> AsyncIterator[dict[str, Any]]:
    """One event per text delta; the last one has finish reason, usage (the tokens of every
    delta) and speculation stats."""
    completion_tokens = 0
    async for output in outputs:
        completion = output.outputs[0]
        completion_tokens += len(completion.token_ids)
        if completion.text:
            yield {"text": completion.text}
        if output.finished:
            yield {
                "text": "",
                "finish_reason": completion.finish_reason,
                "prompt_tokens": len(output.prompt_token_ids or ()),
                "completion_tokens": completion_tokens,
                "speculation": speculation_stats(engine.profile, output).model_dump(),
                "ignored_fields": ignored,
            }
