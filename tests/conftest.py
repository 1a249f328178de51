"""Shared fixtures: one real engine and one real ``bentoml serve`` per test session.

Engines take ~20 s to start on CPU, so every test that needs one shares these.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from hypothesis.database import DirectoryBasedExampleDatabase

from bentospec import settings

# Re-exported: the tests start servers with the benchmark's launcher.
from bentospec.bench.servers import ServerProcess as ServerProcess
from bentospec.bench.servers import free_port as free_port
from bentospec.engine import SpecEngine
from bentospec.profile import Profile, list_profiles, load_profile

ROOT = settings.PROJECT_ROOT
#: The repository's profile catalogue, whatever ``BENTOSPEC_CONFIG_DIR`` says.
CATALOGUE_DIR: Path = settings.CONFIG_DIR.default
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


def catalogue() -> list[Profile]:
    """Every profile of the repository's catalogue, loaded and validated."""
    return [load_profile(name, CATALOGUE_DIR) for name in list_profiles(CATALOGUE_DIR)]


def sse_payloads(text: str) -> list[Any]:
    """The JSON payloads of an SSE body (comments skipped), which must end with ``[DONE]``."""
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data:")]
    assert events and events[-1] == "[DONE]", text[-500:]
    return [json.loads(e) for e in events[:-1]]


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
def server() -> Iterator[ServerProcess]:
    """``bentoml serve`` on the ``cpu`` profile, ready."""
    with ServerProcess("cpu") as proc:
        yield proc


@pytest.fixture(scope="session")
def adaptive_server() -> Iterator[ServerProcess]:
    """``bentoml serve`` on ``cpu-adaptive`` (vLLM's ``custom_class`` proposer path), ready."""
    with ServerProcess("cpu-adaptive") as proc:
        yield proc


@pytest.fixture(scope="session")
def draft_server() -> Iterator[ServerProcess]:
    """``bentoml serve`` on the ``cpu-draft`` profile (a draft model rather than ngram), ready."""
    with ServerProcess("cpu-draft") as proc:
        yield proc
