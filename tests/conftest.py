"""Shared fixtures: one real engine and one real ``bentoml serve`` per test session.

Engines take ~20 s to start on CPU, so every test that needs one shares these.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from hypothesis.database import DirectoryBasedExampleDatabase

from bentospec import settings
from bentospec.bench.records import BenchRow, RequestCount, Via, WorkloadName

# Re-exported: the tests start servers with the benchmark's launcher.
from bentospec.bench.servers import BentoServer as BentoServer
from bentospec.bench.servers import Server
from bentospec.bench.servers import free_port as free_port
from bentospec.dataset import PromptCase, render_cases
from bentospec.engine import SpecEngine
from bentospec.generation import generate_full
from bentospec.metrics import SpecCounters
from bentospec.profile import Profile, SpeculativeSpec, list_profiles, load_profile
from bentospec.schemas import GenerateResult, SamplingOptions

ROOT = settings.PROJECT_ROOT
#: The repository's profile catalogue, whatever ``BENTOSPEC_CONFIG_DIR`` says.
CATALOGUE_DIR: Path = settings.CONFIG_DIR.default
#: Profiles with one deliberate mistake each.
BAD_PROFILES = ROOT / "tests" / "bad_profiles"
T = TypeVar("T")

# No hub is reachable in tests: fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every engine, in-process or under a server, skips torch.compile: ~30 engine starts of ~40 s
# instead of ~130 s each (bentospec.settings.ENFORCE_EAGER); the engine is the same.
os.environ.setdefault(settings.ENFORCE_EAGER.name, "1")


def wait_for(condition: Callable[[], bool], seconds: float, interval: float = 0.2) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def in_bentoml_home(home: Path, *argv: str, env: dict[str, str] | None = None) -> str:
    """The stdout of ``argv`` run with ``BENTOML_HOME=home`` (BentoML reads its home once, at
    import, so a test's own home needs a process of its own) and ``env``; fails on an error."""
    run = subprocess.run(
        list(argv),
        env={
            **os.environ,
            "BENTOML_HOME": str(home),
            "BENTOML_DO_NOT_TRACK": "true",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"{argv}: {run.stderr[-3000:]}"
    return run.stdout.strip()


def catalogue() -> list[Profile]:
    """Every profile of the repository's catalogue, loaded and validated."""
    return [load_profile(name, CATALOGUE_DIR) for name in list_profiles(CATALOGUE_DIR)]


def sse_events(text: str) -> list[str]:
    """The ``data:`` fields of an SSE body, comments skipped, ``[DONE]`` included."""
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data:")]


def sse_payloads(text: str) -> list[Any]:
    """The JSON payloads of an SSE body (comments skipped), which must end with ``[DONE]``."""
    events = sse_events(text)
    assert events and events[-1] == "[DONE]", text[-500:]
    return [json.loads(e) for e in events[:-1]]


def openai_client(
    server: Server,
    *,
    api_key: str = "unused",
    timeout: float = 300,
    max_retries: int = openai.DEFAULT_MAX_RETRIES,
) -> openai.OpenAI:
    """The openai SDK on ``server``'s OpenAI routes."""
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=api_key, timeout=timeout, max_retries=max_retries
    )


#: Fixtures that start a real server or engine, and the marker every test using one gets, so
#: the fast suite (``-m "not engine and not server and not slow"``) never starts one.
HEAVY_FIXTURES = {
    "server": "server",
    "adaptive_server": "server",
    "draft_server": "server",
    "cpu_engine": "engine",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in HEAVY_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(HEAVY_FIXTURES[fixture])


class LoopThread:
    """An event loop in a background thread, so sync tests can drive one async engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def greedy_answer(loop: LoopThread, profile: Profile, case: PromptCase) -> GenerateResult:
    """``case``'s 48-token greedy answer from a fresh engine of ``profile``: what a plugin's
    engine test compares with the plugin one way and the other."""

    async def run() -> GenerateResult:
        async with SpecEngine(profile) as engine:
            (prompt,) = render_cases([case], engine.llm.tokenizer)
            options = SamplingOptions(temperature=0.0, max_tokens=48)
            return await generate_full(engine, prompt, options)

    return loop.run(run())


#: Examples per fuzzed test in CI, from a fixed seed: inside CI's budget.
CI_FUZZ_EXAMPLES = 60


def fuzz_settings(max_examples: int = CI_FUZZ_EXAMPLES) -> hypothesis_settings:
    """Hypothesis settings of the tests that fuzz a live server.

    CI: ``max_examples`` examples, derandomized (the same run every time, no database).
    With ``BENTOSPEC_FUZZ_EXAMPLES``: that many random examples; failing ones are kept in
    ``BENTOSPEC_FUZZ_DATABASE``'s directory (else ``.hypothesis/``, git-ignored) and replayed
    first next time. No shrinking: a request that kills the engine fails every later one until
    the worker restarts, so the first failing example is the one to report.
    """
    longer = settings.FUZZ_EXAMPLES.get()
    kept = settings.FUZZ_DATABASE.get()
    database = {"database": DirectoryBasedExampleDatabase(kept)} if longer and kept else {}
    return hypothesis_settings(
        **database,
        max_examples=longer or max_examples,
        derandomize=longer is None,
        deadline=None,  # one example is a batch of real generations
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


#: The speculation of a benchmark row made by :func:`make_row`.
NGRAM = SpeculativeSpec(
    method="ngram", num_speculative_tokens=5, prompt_lookup_min=2, prompt_lookup_max=5
)


def make_row(
    config: str = "cpu",
    concurrency: int = 1,
    tokens_per_s: float = 100.0,
    speculative: SpeculativeSpec | None = NGRAM,
    via: Via = "engine",
    round_: int = 1,
    workload: WorkloadName = "greedy",
    tokens: tuple[int, ...] = (600, 400),
    variant: str = "",
    ttft_ms: float = 50.0,
) -> BenchRow:
    """A row of two requests measuring ``tokens_per_s`` (their tokens over the wall time)."""
    total = sum(tokens)
    return BenchRow(
        config=config,
        via=via,
        model="m",
        speculative=speculative,
        variant=variant,
        workload=workload,
        round=round_,
        concurrency=concurrency,
        requests=[RequestCount(prompt=i, tokens=n, digest=f"d{n}") for i, n in enumerate(tokens)],
        output_tokens=total,
        counter_tokens=total,
        wall_s=total / tokens_per_s,
        ttft_ms_p50=ttft_ms,
        ttft_ms_p95=80.0,
        itl_ms_p50=10.0,
        itl_ms_p95=20.0,
        spec=SpecCounters(drafts=10, draft_tokens=50, accepted_tokens=20)
        if speculative
        else SpecCounters(),
        load_avg=0.5,
    )


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def cpu_engine(loop: LoopThread) -> Iterator[SpecEngine]:
    """The ``cpu`` profile's engine (ngram), in float32 so greedy output is reproducible."""
    engine = SpecEngine(load_profile("cpu").with_engine(dtype="float32"))
    loop.run(engine.start())
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def server() -> Iterator[BentoServer]:
    """``bentoml serve`` on the ``cpu`` profile, ready."""
    with BentoServer("cpu") as proc:
        yield proc


@pytest.fixture(scope="session")
def adaptive_server() -> Iterator[BentoServer]:
    """``bentoml serve`` on ``cpu-adaptive`` (vLLM's ``custom_class`` proposer path), ready."""
    with BentoServer("cpu-adaptive") as proc:
        yield proc


@pytest.fixture(scope="session")
def draft_server() -> Iterator[BentoServer]:
    """``bentoml serve`` on the ``cpu-draft`` profile (a draft model rather than ngram), ready."""
    with BentoServer("cpu-draft") as proc:
        yield proc
