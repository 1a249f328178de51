"""Server subprocesses the benchmark (and the test suite) measures: ``bentoml serve`` of a
catalogue profile, and vLLM's own OpenAI server with the same engine arguments.

One implementation for both users: each server gets a free port and a log in ``build/``, and
a ``bentoml serve`` gets a ``BENTOML_HOME`` of its own, because every ``bentoml serve`` empties
``<BENTOML_HOME>/prometheus_multiproc_dir`` when it starts: servers sharing a home would erase
each other's metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import httpx

from bentospec.cpu_runtime import LoadedRuntime, loaded_runtime, preload_environment
from bentospec.engine_args import engine_kwargs
from bentospec.model_store import resolve_model
from bentospec.profile import Profile
from bentospec.settings import PROJECT_ROOT

if TYPE_CHECKING:
    import psutil

LOG_DIR = PROJECT_ROOT / "build"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free port; :meth:`wait_ready` polls its probes."""

    #: Answers 200 once the server takes requests.
    ready_path = "/readyz"
    #: Answers 200 while the process lives, ready or not.
    live_path = "/livez"

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        log_path: Path,
        env: Mapping[str, str],
        cwd: Path = PROJECT_ROOT,
    ):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        #: (live status, ready status) pairs seen while waiting for readiness.
        self.probes: list[tuple[int, int]] = []

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.proc.returncode}; log {self.log_path}:\n"
                        + self.log_path.read_text(errors="replace")[-4000:]
                    )
                try:
                    live = client.get(self.live_path).status_code
                    ready = client.get(self.ready_path).status_code
                except httpx.TransportError:
                    time.sleep(0.5)
                    continue
                self.probes.append((live, ready))
                if ready == 200:
                    return
                time.sleep(0.5)
        raise TimeoutError(
            f"server not ready in {timeout:.0f}s; log {self.log_path}:\n"
            + self.log_path.read_text(errors="replace")[-4000:]
        )

    def children(self, needle: str) -> list[psutil.Process]:
        """The server's descendant processes whose name or command line contains ``needle``
        (vLLM names its engine core ``VLLM::EngineCore``)."""
        import psutil  # a dependency of vLLM

        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if needle in child.name() or needle in " ".join(child.cmdline()):
                    found.append(child)
        return found

    def engine_core_runtime(self) -> LoadedRuntime | None:
        """The OpenMP library and allocator of the server's engine-core process, or ``None``
        if there is none to read."""
        cores = self.children("EngineCore")
        return loaded_runtime(cores[0].pid) if cores else None

    def stop(self) -> None:
        """Stop the server and every process it started: an engine core whose server is
        stopped while it still compiles can outlive it."""
        import psutil  # a dependency of vLLM

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=30)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self._log.close()

    def __enter__(self) -> Self:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class BentoServer(Server):
    """``bentoml serve`` of catalogue profile ``profile_name``, with a ``BENTOML_HOME`` of its
    own."""

    def __init__(
        self, profile_name: str, env: Mapping[str, str] | None = None, log_dir: Path = LOG_DIR
    ) -> None:
        port = free_port()
        self.home = log_dir / f"bentoml-home-{port}"
        command = [
            *(sys.executable, "-m", "bentoml", "serve", "service:BentoSpec"),
            *("--host", "127.0.0.1", "--port", str(port), "--arg", f"profile={profile_name}"),
        ]
        super().__init__(
            command,
            port,
            log_dir / f"server-{profile_name}-{port}.log",
            {"BENTOML_HOME": str(self.home), **(env or {})},
        )


def vllm_cli_args(kwargs: Mapping[str, Any]) -> list[str]:
    """``AsyncEngineArgs`` keyword arguments as ``vllm serve`` flags (dicts as JSON)."""
    args: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if key == "disable_log_stats":
            continue  # a store-true flag, off by default: the server logs stats
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


class VllmServer(Server):
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) with the
    engine arguments ``profile`` resolves to: the same model directory, the same
    ``--speculative-config``; what a user would run instead of this service."""

    ready_path = live_path = "/health"

    def __init__(
        self, profile: Profile, env: Mapping[str, str] | None = None, log_dir: Path = LOG_DIR
    ) -> None:
        port = free_port()
        spec = profile.speculative
        kwargs = engine_kwargs(
            profile,
            model=resolve_model(profile.model.id),
            draft_model=resolve_model(spec.model) if spec is not None and spec.model else None,
        )
        command = [
            *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
            *("--host", "127.0.0.1", "--port", str(port)),
            *vllm_cli_args(kwargs),
        ]
        # As vLLM's CPU install guide runs it: LD_PRELOAD for the whole command.
        environ = {**os.environ, **(env or {})}
        preload = preload_environment(environ) if profile.hardware.accelerator == "cpu" else {}
        super().__init__(
            command, port, log_dir / f"vllm-{profile.name}-{port}.log", {**(env or {}), **preload}
        )
