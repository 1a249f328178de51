"""The vLLM engine a service owns: build it from a profile, run requests, report its health.

The engine is created off the event loop so that a BentoML worker answers liveness probes while
weights load; readiness follows :attr:`SpecEngine.status`. Prompts are tokenized off the event
loop too: a 200k-character prompt takes ~0.1 s, which would stall every other stream.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Self, cast

from bentospec import vllm_api
from bentospec.cpu_runtime import (
    LoadedRuntime,
    confine_to_reserved,
    engine_core_environment,
    log_runtime,
    preload_environment,
    unconfine,
)
from bentospec.engine_args import build_engine_args
from bentospec.errors import EngineUnavailable
from bentospec.model_store import resolve_model
from bentospec.profile import Profile
from bentospec.prompts import ChatEncoder

if TYPE_CHECKING:
    from bentospec.vllm_api import AsyncLLM, RequestOutput, SamplingParams, TokensPrompt

logger = logging.getLogger(__name__)


class EngineStatus(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    #: Loading raised; the message is in :attr:`SpecEngine.error`.
    FAILED = "failed"
    #: The engine-core process died after it was ready.
    DEAD = "dead"


class SpecEngine:
    """One ``AsyncLLM`` built from a :class:`Profile`, with its lifecycle made explicit."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.error: str | None = None
        #: Local directory of the target model, once resolved.
        self.model_path: str | None = None
        self._llm: AsyncLLM | None = None
        self._chat: ChatEncoder | None = None
        self._generation_defaults: dict[str, object] = {}
        #: The engine core's OpenMP library and allocator (CPU profiles, once started).
        self.runtime: LoadedRuntime | None = None
        #: One thread: prompts tokenize off the event loop, in turn, so that long ones never
        #: take more than one core from the engine core.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="bentospec-tokenize")

    @property
    def status(self) -> EngineStatus:
        if self._llm is not None:
            return EngineStatus.DEAD if vllm_api.engine_errored(self._llm) else EngineStatus.READY
        return EngineStatus.FAILED if self.error is not None else EngineStatus.LOADING

    @property
    def llm(self) -> AsyncLLM:
        """The running engine; raises :class:`EngineUnavailable` unless it is ready."""
        status = self.status
        if status is not EngineStatus.READY or self._llm is None:
            detail = f": {self.error}" if self.error else ""
            raise EngineUnavailable(f"engine is {status.value}{detail}")
        return self._llm

    def require_ready(self) -> None:
        """Raise :class:`EngineUnavailable`, naming the state (a failed load's cause, a dead
        engine), unless the engine serves."""
        self.llm  # noqa: B018

    async def start(self) -> None:
        """Resolve the models and start the engine without blocking the event loop."""
        try:
            self._llm = await asyncio.to_thread(self._create)
        except Exception as exc:
            # The caller logs and acts (the service's supervisor restarts the worker).
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        logger.info("engine for profile %r is ready", self.profile.name)

    def _create(self) -> AsyncLLM:
        model = self.model_path = resolve_model(self.profile.model.id)
        spec = self.profile.speculative
        draft = resolve_model(spec.model) if spec is not None and spec.model else None
        args = build_engine_args(self.profile, model=model, draft_model=draft)
        logger.info(
            "starting vLLM for profile %r: model=%s dtype=%s speculative=%s",
            self.profile.name,
            model,
            args.dtype,
            args.speculative_config,
        )
        cpu = self.profile.hardware.accelerator == "cpu"
        if cpu:
            unconfine()
        with engine_core_environment(preload_environment() if cpu else {}):
            llm = vllm_api.start_engine(args)
        engine_core = vllm_api.engine_core_pid(llm) if cpu else None
        if engine_core is not None:
            confine_to_reserved(engine_core)
            self.runtime = log_runtime(engine_core)
        self._chat = ChatEncoder(llm.get_tokenizer())
        # vLLM reads generation_config.json from disk on every call: once here, off the loop.
        self._generation_defaults = vllm_api.generation_defaults(llm)
        return llm

    async def __aenter__(self) -> Self:
        """``async with SpecEngine(profile) as engine``: started, and shut down on the way out."""
        try:
            await self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        self.shutdown()

    @property
    def dtype(self) -> str:
        """The dtype the running engine resolved (``float32``, ``bfloat16``): what ``auto``
        became on this host."""
        return vllm_api.model_dtype(self.llm)

    async def encode(self, prompt: str) -> list[int]:
        """Token ids of a raw prompt, as vLLM tokenizes one (special-token strings included)."""
        return await self._tokenize(self.llm.get_tokenizer().encode, prompt)

    async def encode_chat(self, message: str) -> list[int]:
        """Token ids of untrusted ``message`` as the user turn of the model's chat template."""
        self.require_ready()  # the encoder is built with the engine
        return await self._tokenize(cast(ChatEncoder, self._chat).encode, message)

    async def _tokenize(self, encode: Callable[[str], list[int]], text: str) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, encode, text)

    def generation_defaults(self) -> dict[str, object]:
        """The model's ``generation_config.json`` sampling values (what ``vllm serve`` applies
        to requests that leave them out), read when the engine started; empty where the model
        sets none."""
        self.require_ready()
        return self._generation_defaults

    async def generate(
        self, prompt: str | TokensPrompt, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request (deltas if ``params.output_kind`` says so).

        Closing or cancelling the iterator (client disconnect) aborts the request in vLLM.
        """
        request_id = request_id or f"bentospec-{uuid.uuid4().hex}"
        async for output in self.llm.generate(prompt, params, request_id):
            yield output

    def exit_code(self) -> int | None:
        """Exit code of the engine-core process once it exited, else ``None``."""
        return vllm_api.engine_exit_code(self._llm) if self._llm is not None else None

    async def restart(self) -> None:
        """Replace a dead engine with a new one in this process: :meth:`start` again.

        The new engine-core process loads vLLM's compile cache and skips the imports a new
        worker would redo: 26-42 s on 2 cores, against 42 s for a worker restart that loads
        the cache (97 s when it recompiled). Requests get 503 "engine is loading" meanwhile.
        """
        dead, self._llm, self.error = self._llm, None, None
        if dead is not None:
            await asyncio.to_thread(dead.shutdown)  # ends what is left of its processes
        await self.start()

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
            self.error = "engine was shut down"
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
