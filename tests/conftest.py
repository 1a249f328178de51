"""Shared fixtures: one real engine and one real ``bentoml serve`` per test session.

Engines take ~20 s to start on CPU, so every test that needs one shares these.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from bentospec.engine import SpecEngine
from bentospec.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# No hub is reachable in tests: fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``bentoml serve`` subprocess and what its probes answered while it started."""

    def __init__(self, profile: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = ROOT / "build" / f"server-{profile}-{self.port}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        self._log = self.log_path.open("wb")
        self.home = ROOT / "build" / f"bentoml-home-{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                "service:BentoSpec",
                "--port",
                str(self.port),
                "--host",
                "127.0.0.1",
                "--arg",
                f"profile={profile}",
            ],
            cwd=ROOT,
            # BentoML keeps Prometheus' multiprocess files under BENTOML_HOME and wipes them when
            # a server starts: servers sharing one home would erase each other's metrics.
            env={**os.environ, "BENTOML_HOME": str(self.home), **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        #: (livez status, readyz status) pairs seen while waiting for readiness.
        self.probes: list[tuple[int, int]] = []

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited; log:\n{self.log_path.read_text()[-4000:]}")
                try:
                    live = client.get("/livez").status_code
                    ready = client.get("/readyz").status_code
                except httpx.TransportError:
                    time.sleep(0.5)
                    continue
                self.probes.append((live, ready))
                if ready == 200:
                    return
                time.sleep(0.5)
        raise TimeoutError(
            f"server not ready in {timeout}s; log:\n{self.log_path.read_text()[-4000:]}"
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """``bentoml serve`` on the ``cpu`` profile, ready."""
    proc = ServerProcess("cpu")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
