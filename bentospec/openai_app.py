"""Glue to vLLM 0.32's own OpenAI serving layer, around the engine the service owns.

These are vLLM-internal modules (``vllm.entrypoints.launchers``), so the vLLM version is pinned
and this is the only file a vLLM upgrade should have to touch.
"""

from __future__ import annotations

import contextlib
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bentospec.engine import EngineUnavailable, SpecEngine
from bentospec.generation import RequestRejected, check_sampling
from bentospec.schemas import SamplingOptions

#: The OpenAI routes the service exposes; the rest of ``vllm serve``'s API stays private.
OPENAI_ROUTES = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions"})
_SUPPORTED_TASKS = ("generate",)


def _serve_args(*argv: str) -> Namespace:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(list(argv))


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
    from vllm.entrypoints.launchers.app import build_app

    vllm_app = build_app(_serve_args(), _SUPPORTED_TASKS, None)
    # No docs routes of its own: BentoML's Swagger UI (``/``, ``/docs.json``) lists these routes.
    app = FastAPI(
        title="OpenAI-compatible API (vLLM)",
        lifespan=_no_lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.router.routes.extend(
        r for r in vllm_app.router.routes if getattr(r, "path", None) in OPENAI_ROUTES
    )
    app.exception_handlers.update(vllm_app.exception_handlers)
    app.state.bentospec_engine = None

    @app.middleware("http")
    async def _guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        engine: SpecEngine | None = request.app.state.bentospec_engine
        try:
            if engine is None:
                raise EngineUnavailable("engine is loading")
            engine.llm  # noqa: B018 - raises unless ready (catches a dead engine too)
            if request.method == "POST":
                await _check_sampling(request, engine)
        except EngineUnavailable as exc:
            return _openai_error(503, "ServiceUnavailable", str(exc))
        except RequestRejected as exc:
            return _openai_error(400, "BadRequestError", str(exc), exc.field)
        return await call_next(request)

    return app


def _openai_error(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    error = {"message": message, "type": kind, "param": param, "code": status}
    return JSONResponse({"error": error}, status_code=status)


async def _check_sampling(request: Request, engine: SpecEngine) -> None:
    """Refuse what the profile's speculation cannot honour before vLLM sees it (or crashes)."""
    try:
        body = await request.json()
    except ValueError:
        return  # vLLM answers malformed JSON itself
    if not isinstance(body, dict):
        return
    temperature, min_p = body.get("temperature"), body.get("min_p")
    if isinstance(temperature, int | float) or isinstance(min_p, int | float):
        check_sampling(
            engine.profile,
            SamplingOptions.model_construct(temperature=temperature, min_p=min_p or 0.0),
        )


async def attach(app: FastAPI, engine: SpecEngine) -> None:
    """Point vLLM's serving state at ``engine`` (call once it is ready)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    args = _serve_args(
        "--model",
        engine.model_path or engine.profile.model.id,
        "--served-model-name",
        engine.profile.served_model_name,
    )
    await init_app_state(engine.llm, app.state, args, _SUPPORTED_TASKS)
    app.state.bentospec_engine = engine
