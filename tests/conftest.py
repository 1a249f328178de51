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
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

# Re-exported: the tests start servers with the benchmark's launcher.
from bentospec.bench.servers import ServerProcess as ServerProcess
from bentospec.bench.servers import free_port as free_port
from bentospec.engine import SpecEngine
from bentospec.engine_args import ENFORCE_EAGER_ENV
from bentospec.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# No hub is reachable in tests: fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every engine, in-process or under a server, skips torch.compile: ~30 engine starts of ~40 s
# instead of ~130 s each (see bentospec.engine_args.ENFORCE_EAGER_ENV); the engine is the same.
os.environ.setdefault(ENFORCE_EAGER_ENV, "1")


def wait_for(condition: Callable[[], bool], seconds: float, interval: float = 0.2) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


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


#: ``BENTOSPEC_FUZZ_EXAMPLES=N``: N random examples per fuzzed test instead of CI's fixed run.
FUZZ_EXAMPLES_ENV = "BENTOSPEC_FUZZ_EXAMPLES"
#: Where a longer run keeps its failing examples (``make fuzz`` names it); hypothesis'
#: ``.hypothesis/examples`` when unset.
FUZZ_DATABASE_ENV = "BENTOSPEC_FUZZ_DATABASE"
#: Examples per fuzzed test in CI, from a fixed seed: inside CI's budget.
CI_FUZZ_EXAMPLES = 60


def fuzz_settings(max_examples: int = CI_FUZZ_EXAMPLES) -> settings:
    """Hypothesis settings of the tests that fuzz a live server.

    CI: ``max_examples`` examples, derandomized (the same run every time, no database).
    With :data:`FUZZ_EXAMPLES_ENV`: that many random examples; failing ones are kept in
    :data:`FUZZ_DATABASE_ENV`'s directory (else ``.hypothesis/``, git-ignored) and replayed
    first next time. No shrinking: a request that kills the engine fails every later one until
    the worker restarts, so the first failing example is the one to report.
    """
    longer = os.environ.get(FUZZ_EXAMPLES_ENV)
    kept = os.environ.get(FUZZ_DATABASE_ENV)
    database = {"database": DirectoryBasedExampleDatabase(kept)} if longer and kept else {}
    return settings(
        **database,
        max_examples=int(longer) if longer else max_examples,
        derandomize=not longer,
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
