"""bentospec: vLLM speculative decoding as one BentoML service.

Routes: ``/generate`` (streams text), ``/generate_full`` (JSON with speculation stats), the
OpenAI API (models, completions, chat, responses, tokenize; ``bentospec/openai_app.py``) from
vLLM's own serving layer, and the OPEA ``spec_decode`` routes. The profile comes from
``--arg profile=NAME``, ``BENTOSPEC_PROFILE`` or the hardware.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import bentoml
from pydantic import BaseModel

from bentospec import settings
from bentospec.api_docs import OpenAPIDocsMiddleware
from bentospec.auth import APIKeyMiddleware
from bentospec.engine import EngineStatus, SpecEngine
from bentospec.errors import bentoml_answers
from bentospec.gate import EngineGateMiddleware
from bentospec.generation import (
    check_request,
    generate_full,
    stream_text,
    tokenized,
)
from bentospec.hardware import select_profile
from bentospec.metrics import SpecGauges, StatusGauges, engine_counters
from bentospec.model_store import bento_model
from bentospec.opea import build_opea_app
from bentospec.openai_app import attach, build_openai_app, detach, store_engine
from bentospec.packaging import bento_image
from bentospec.prompts import PromptTemplates
from bentospec.schemas import GenerateRequest, GenerateResult
from bentospec.watchdog import RestartBackoff, Supervisor, watch_engine

if TYPE_CHECKING:
    from bentospec.vllm_api import TokensPrompt


class ServiceArgs(BaseModel):
    """``bentoml serve/build --arg profile=NAME`` (else ``BENTOSPEC_PROFILE``, else detected)."""

    profile: str | None = None


#: How often the acceptance gauges on /metrics are recomputed from vLLM's counters.
GAUGE_REFRESH_SECONDS = 5.0

PROFILE = select_profile(bentoml.use_arguments(ServiceArgs).profile)
openai_app = build_openai_app()
opea_app = build_opea_app(PromptTemplates())


@bentoml.asgi_app(openai_app, path="/", name="openai")
@bentoml.asgi_app(opea_app, path="/", name="opea")
@bentoml.service(
    name="bentospec",
    image=bento_image(PROFILE),
    resources=PROFILE.hardware.bento_resources(),
    traffic={
        "timeout": PROFILE.serving.timeout,
        "max_concurrency": PROFILE.serving.max_concurrency,
    },
    # Gated hub models (Llama) need a token: declared without a value so none lands in the
    # Bento, and only for profiles that load from the hub (BentoML then requires it at start).
    envs=[{"name": settings.HF_TOKEN.name}] if PROFILE.needs_hub_token() else [],
)
class BentoSpec:
    """Serves the profile's target model with its speculative method."""

    # The profile's embedded models once in BentoML's model store (`bentospec models prepare`):
    # `bentoml build` packs them into the Bento, which then serves them as they are.
    target_model = bento_model(PROFILE.model.id)
    draft_model = bento_model(PROFILE.speculative.model if PROFILE.speculative else None)

    def __init__(self) -> None:
        # bentospec's INFO lines (models, engine runtime) at BentoML's own level: the worker's
        # root logger passes only warnings.
        logging.getLogger("bentospec").setLevel(logging.getLogger("bentoml").getEffectiveLevel())
        self.engine = SpecEngine(PROFILE)
        self.gauges = SpecGauges(PROFILE.served_model_name)
        self.status_gauges = StatusGauges(PROFILE)
        # Any background task failing (the load included) restarts the worker, with a backoff.
        self._supervisor = Supervisor(RestartBackoff.for_this_worker())

    @bentoml.on_startup
    async def start_engine(self) -> None:
        # The OpenAI and OPEA routes report the engine's state (a failed load's cause too).
        opea_app.state.engine = self.engine
        store_engine(openai_app, self.engine)
        # Load in the background: awaiting here would block every route, /livez included.
        self._supervisor.spawn(self._load(), "engine load")
        # A dead engine core is replaced in this worker; a failed load restarts the worker.
        watchdog = watch_engine(self.engine, self._supervisor.backoff, revive=self._revive)
        self._supervisor.spawn(watchdog, "watchdog")

    async def _load(self) -> None:
        await self.engine.start()
        await self._serving()
        if PROFILE.speculative is not None:
            self._supervisor.spawn(self._refresh_gauges(), "acceptance gauges")

    async def _revive(self) -> None:
        self.status_gauges.set_ready(False)
        detach(openai_app)  # its handlers still point at the dead engine
        await self.engine.restart()
        await self._serving()

    async def _serving(self) -> None:
        """The OpenAI routes and the readiness gauge follow the engine that just started."""
        self.status_gauges.set_ready(True)
        await attach(openai_app, self.engine)

    async def _refresh_gauges(self) -> None:
        while True:
            self.gauges.refresh(engine_counters())
            await asyncio.sleep(GAUGE_REFRESH_SECONDS)

    async def __is_ready__(self) -> bool:
        return self.engine.status is EngineStatus.READY

    @bentoml.on_shutdown
    def stop_engine(self) -> None:
        self._supervisor.cancel_all()
        self.engine.shutdown()

    async def _checked(self, request: GenerateRequest) -> TokensPrompt:
        """The request's token ids, once it passed the profile's checks."""
        check_request(self.engine, request.prompt, request)
        return await tokenized(self.engine, request.prompt)

    @bentoml.api(input_spec=GenerateRequest)
    async def generate(self, **fields: Any) -> AsyncGenerator[str, None]:
        """Stream the completion of a raw prompt as text deltas."""
        request = GenerateRequest.model_construct(**fields)
        # Refusals come before the first chunk (BentoML awaits it): still a status code.
        with bentoml_answers():
            prompt = await self._checked(request)
            async for delta in stream_text(self.engine, prompt, request):
                yield delta

    @bentoml.api(input_spec=GenerateRequest)
    async def generate_full(self, **fields: Any) -> GenerateResult:
        """Complete a raw prompt; returns text, token counts and this request's speculation."""
        request = GenerateRequest.model_construct(**fields)
        with bentoml_answers():
            prompt = await self._checked(request)
            return await generate_full(self.engine, prompt, request)


# The first added is the outermost: authenticate before telling anything about the engine.
BentoSpec.add_asgi_middleware(APIKeyMiddleware)
BentoSpec.add_asgi_middleware(EngineGateMiddleware)
# The Swagger UI's description, version and route groups (BentoML has no setting for them).
BentoSpec.add_asgi_middleware(OpenAPIDocsMiddleware, profile=PROFILE)
