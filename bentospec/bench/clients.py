"""The ways the benchmark sends requests: straight into an in-process engine, or streaming
``/v1/completions`` through the OpenAI API of a server (this service or ``vllm serve``).

Every client counts the tokens of each response from the token ids it carries, and reads the
engine's counters (in-process, or from the server's ``/metrics``) to check that count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import httpx

from bentospec import settings
from bentospec.bench.records import Workload
from bentospec.bench.servers import Server
from bentospec.bench.stats import GENERATION_TOKENS, Counters, RequestRecord, record_from_chunks
from bentospec.cpu_runtime import LoadedRuntime, engine_core_environment
from bentospec.engine import SpecEngine
from bentospec.generation import stream_outputs
from bentospec.metrics import engine_samples, prometheus_samples
from bentospec.profile import Profile
from bentospec.schemas import SamplingOptions

#: A server's engine compiles its model when it starts: minutes, tens of them on a loaded machine.
SERVER_START_TIMEOUT_S = 1800


class Client(Protocol):
    """One way to send requests to a config."""

    #: The OpenMP library and allocator of the config's engine core, where it can be read.
    runtime: LoadedRuntime | None

    async def request(
        self, prompt_index: int, prompt: str, max_tokens: int, workload: Workload
    ) -> RequestRecord: ...

    async def counters(self) -> Counters: ...


def sampling(workload: Workload, max_tokens: int, prompt_index: int) -> SamplingOptions:
    """The workload's sampling; a sampled request is seeded by its prompt, so every config
    draws from the same seeds. ``top_k`` is never sent: it is not a workload setting."""
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=workload.temperature,
        top_p=workload.top_p,
        seed=prompt_index if workload.temperature > 0 else None,
    )


class EngineClient:
    """Requests straight into an in-process engine: its speed without HTTP."""

    def __init__(self, engine: SpecEngine) -> None:
        self._engine = engine
        self.runtime = engine.runtime

    async def request(
        self, prompt_index: int, prompt: str, max_tokens: int, workload: Workload
    ) -> RequestRecord:
        options = sampling(workload, max_tokens, prompt_index)
        start = time.perf_counter()
        chunks = [
            (time.perf_counter(), list(out.outputs[0].token_ids))
            async for out in stream_outputs(self._engine, prompt, options)
            if out.outputs
        ]
        return record_from_chunks(prompt_index, start, chunks)

    async def counters(self) -> Counters:
        return Counters.from_samples(engine_samples())


class OpenAIClient:
    """Streaming ``/v1/completions`` with the token ids of every chunk; counters from
    ``/metrics``. The same client for this service and for ``vllm serve``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        model: str,
        read_runtime: Callable[[], LoadedRuntime | None] | None = None,
    ) -> None:
        self._http = http
        self._model = model
        self._read_runtime = read_runtime

    @property
    def runtime(self) -> LoadedRuntime | None:
        """Read when asked, after each level: the cores the worker's threads ran on change
        with the work (``bentospec/cpu_step_threads.py``)."""
        return self._read_runtime() if self._read_runtime is not None else None

    async def request(
        self, prompt_index: int, prompt: str, max_tokens: int, workload: Workload
    ) -> RequestRecord:
        body = {
            "model": self._model,
            "prompt": prompt,
            **sampling(workload, max_tokens, prompt_index).model_dump(
                include={"max_tokens", "temperature", "top_p", "seed"}, exclude_none=True
            ),
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        chunks: list[tuple[float, list[int]]] = []
        usage: int | None = None
        start = time.perf_counter()
        async with self._http.stream("POST", "/v1/completions", json=body) as response:
            if response.is_error:
                await response.aread()
                raise RuntimeError(
                    f"/v1/completions answered {response.status_code}: {response.text}"
                )
            async for line in response.aiter_lines():
                data = line.removeprefix("data: ")
                if data == line or data == "[DONE]":
                    continue
                event = json.loads(data)
                if event.get("choices"):
                    chunks.append((time.perf_counter(), event["choices"][0].get("token_ids") or []))
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
        record = record_from_chunks(prompt_index, start, chunks)
        if usage != record.tokens:
            raise RuntimeError(
                f"{response.url}: the stream carried {record.tokens} token ids but its usage "
                f"says {usage} completion tokens"
            )
        return record

    async def counters(self) -> Counters:
        response = await self._http.get("/metrics")
        response.raise_for_status()
        samples = prometheus_samples(response.text)
        if not any(name.removesuffix("_total") == GENERATION_TOKENS for name, _ in samples):
            raise RuntimeError(
                f"{response.url} has no {GENERATION_TOKENS}: each `bentoml serve` empties "
                "<BENTOML_HOME>/prometheus_multiproc_dir when it starts, so run no other server "
                "with the same BENTOML_HOME during the benchmark"
            )
        return Counters.from_samples(samples)


@contextlib.asynccontextmanager
async def open_engine(profile: Profile, env: Mapping[str, str]) -> AsyncIterator[EngineClient]:
    engine = SpecEngine(profile)
    try:
        with engine_core_environment(env):
            await engine.start()
        yield EngineClient(engine)
    finally:
        engine.shutdown()


#: How long an idle connection is reused. Servers close theirs after 5 s (uvicorn's default,
#: which BentoML and vLLM keep), httpx after 5 s too: a request sent on a connection in that
#: instant fails with a ``ReadError``, as one did after a server sat idle between rounds.
KEEPALIVE_EXPIRY_S = 2.0


@contextlib.asynccontextmanager
async def open_openai(
    url: str, model: str, read_runtime: Callable[[], LoadedRuntime | None] | None = None
) -> AsyncIterator[OpenAIClient]:
    key = settings.API_KEY.get()
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"} if key else None,
        timeout=httpx.Timeout(600, connect=10),
        limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
    ) as http:
        yield OpenAIClient(http, model, read_runtime)


@contextlib.asynccontextmanager
async def open_server(start: Callable[[], Server], model: str) -> AsyncIterator[OpenAIClient]:
    """A server started for the measurement (its log goes to ``build/``), stopped after."""
    server = await asyncio.to_thread(start)
    try:
        await asyncio.to_thread(server.wait_ready, SERVER_START_TIMEOUT_S)
        async with open_openai(server.url, model, server.engine_core_runtime) as client:
            yield client
    finally:
        await asyncio.to_thread(server.stop)
