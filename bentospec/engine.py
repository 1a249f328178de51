"""The vLLM engine a service owns: build it from a profile, run requests, report its health.

The engine is created off the event loop so that a BentoML worker answers liveness probes while
weights load; readiness follows :attr:`SpecEngine.status`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from bentospec.engine_args import build_engine_args
from bentospec.model_store import resolve_model
from bentospec.profile import Profile

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


class EngineStatus(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    #: Loading raised; the message is in :attr:`SpecEngine.error`.
    FAILED = "failed"
    #: The engine-core process died after it was ready.
    DEAD = "dead"


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests now (loading, failed or dead); maps to HTTP 503."""


class SpecEngine:
    """One ``AsyncLLM`` built from a :class:`Profile`, with its lifecycle made explicit."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.error: str | None = None
        #: Local directory of the target model, once resolved.
        self.model_path: str | None = None
        self._llm: AsyncLLM | None = None

    @property
    def status(self) -> EngineStatus:
        if self._llm is not None:
            return EngineStatus.DEAD if self._llm.errored else EngineStatus.READY
        return EngineStatus.FAILED if self.error is not None else EngineStatus.LOADING

    @property
    def llm(self) -> AsyncLLM:
        """The running engine; raises :class:`EngineUnavailable` unless it is ready."""
        status = self.status
        if status is not EngineStatus.READY or self._llm is None:
            detail = f": {self.error}" if self.error else ""
            raise EngineUnavailable(f"engine is {status.value}{detail}")
        return self._llm

    async def start(self) -> None:
        """Resolve the models and start the engine without blocking the event loop."""
        try:
            self._llm = await asyncio.to_thread(self._create)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            logger.exception("engine for profile %r failed to start", self.profile.name)
            raise
        logger.info("engine for profile %r is ready", self.profile.name)

    def _create(self) -> AsyncLLM:
        from vllm import AsyncLLMEngine

        model = self.model_path = resolve_model(self.profile.model.id)
        spec = self.profile.speculative
        draft = resolve_model(spec.model) if spec is not None and spec.model else None
        args = build_engine_args(self.profile, model=model, draft_model=draft)
        logger.info(
            "starting vLLM for profile %r: model=%s speculative=%s",
            self.profile.name,
            model,
            args.speculative_config,
        )
        return AsyncLLMEngine.from_engine_args(args)

    async def generate(
        self, prompt: str, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request (deltas if ``params.output_kind`` says so).

        Closing or cancelling the iterator (client disconnect) aborts the request in vLLM.
        """
        request_id = request_id or f"bentospec-{uuid.uuid4().hex}"
        async for output in self.llm.generate(prompt, params, request_id):
            yield output

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests() if self._llm is not None else 0

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
            self.error = "engine was shut down"
