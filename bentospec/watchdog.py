"""Bring back an engine that died, in the worker; turn one that fails to load into a worker
restart, with a bounded backoff.

vLLM never restarts its engine-core process: once it dies (OOM kill, crash in a kernel) the
``AsyncLLM`` stays errored, and an engine that failed to load stays failed; every request would
get 503 until someone restarts the service. :func:`watch_engine` starts a new engine in the
same worker when the engine core dies (the fast path: no imports to redo, the compile cache
loads). If that load fails, or the first one did, the :class:`Supervisor` stops the worker,
so that its supervisor starts a fresh one with a new engine. BentoML's circus arbiter respawns
workers under ``bentoml serve``; inside a container (``BENTOML_CONTAINERIZED``, BentoCloud) it
does not, and the orchestrator restarts the container once ``/livez`` stops answering.

A load that fails every time (missing model, too little memory) must not restart in a tight
loop: :class:`RestartBackoff` counts restarts in a row across worker processes and waits longer
each time, up to :data:`MAX_BACKOFF_SECONDS`. A load that succeeds resets the count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from bentospec.engine import EngineStatus, SpecEngine

logger = logging.getLogger(__name__)

#: Seconds between checks; vLLM's own monitor notices the death, this only polls its verdict.
CHECK_INTERVAL_SECONDS = 1.0
#: The engine core also exits when the server stops (circus sends SIGTERM to the worker's
#: children too), with exit code 0. An engine core that exited so, or whose exit code is not
#: known after this long, is waited for this long again before acting, so that the service's
#: on_shutdown cancels the watchdog first and a normal stop is not reported as a crash. A crash
#: (any other exit code) is acted on at once.
SHUTDOWN_GRACE_SECONDS = 2.0
#: Requests that reached the engine just before it died may never finish, and uvicorn's graceful
#: shutdown waits for their connections (up to the traffic timeout): exit hard after this long.
EXIT_DEADLINE_SECONDS = 10.0
#: More in-process revivals than this within the window: the engine dies of something a new
#: engine does not fix (a request retried by its client, a poisoned compile cache); the
#: supervisor's worker restart with its backoff takes over.
MAX_REVIVALS = 3
REVIVAL_WINDOW_SECONDS = 600.0
#: Wait before the second restart in a row; it doubles with each further one.
FIRST_BACKOFF_SECONDS = 10.0
#: The longest wait between two restarts: a fixed model or freed memory is picked up this soon.
MAX_BACKOFF_SECONDS = 300.0


class EngineDown(RuntimeError):
    """The engine failed to load or died; the message names the cause."""


def stop_worker() -> None:
    """SIGTERM to this process (uvicorn's graceful shutdown, then on_shutdown), bounded."""
    hard_exit = threading.Timer(EXIT_DEADLINE_SECONDS, os._exit, args=(1,))
    hard_exit.daemon = True
    hard_exit.start()
    os.kill(os.getpid(), signal.SIGTERM)


class RestartBackoff:
    """Restarts in a row, kept in a file because each one happens in a new worker process."""

    def __init__(
        self,
        path: Path,
        *,
        first: float = FIRST_BACKOFF_SECONDS,
        cap: float = MAX_BACKOFF_SECONDS,
    ) -> None:
        self.path = path
        self.first = first
        self.cap = cap

    @classmethod
    def for_this_worker(cls) -> RestartBackoff:
        """The count shared by the workers one server (one arbiter process) starts in turn."""
        return cls(Path(tempfile.gettempdir()) / f"bentospec-restarts-{os.getppid()}.json")

    @property
    def restarts(self) -> int:
        """Restarts in a row so far (0 after a successful load)."""
        try:
            count = json.loads(self.path.read_text())["restarts"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        return count if isinstance(count, int) and count > 0 else 0

    def delay(self) -> float:
        """Seconds to wait before the next restart: none for the first, then doubling, capped."""
        restarts = self.restarts
        return 0.0 if restarts == 0 else min(self.first * 2 ** (restarts - 1), self.cap)

    def record_restart(self) -> None:
        self.path.write_text(json.dumps({"restarts": self.restarts + 1}))

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


async def watch_engine(
    engine: SpecEngine,
    backoff: RestartBackoff,
    *,
    revive: Callable[[], Awaitable[None]] | None = None,
    interval: float = CHECK_INTERVAL_SECONDS,
    grace: float = SHUTDOWN_GRACE_SECONDS,
) -> None:
    """Reset ``backoff`` once ``engine`` is ready; when its engine core dies, await ``revive``
    (a new engine in this worker) and watch again; raise :class:`EngineDown` once it failed to
    load, or died with no ``revive``.

    Runs from the start of the load, so a load that fails is acted on like an engine that dies.
    """
    revivals: list[float] = []
    loop = asyncio.get_running_loop()
    while True:
        while engine.status is EngineStatus.LOADING:
            await asyncio.sleep(interval)
        if engine.status is EngineStatus.READY:
            backoff.reset()
        while engine.status is EngineStatus.READY:
            await asyncio.sleep(interval)
        # A crash (nonzero exit code) is acted on at once; a stop (exit code 0, SIGTERM from
        # circus or the kubelet) or an unknown code waits for on_shutdown to cancel this task.
        code = await _exit_code(engine, grace) if engine.status is EngineStatus.DEAD else None
        if code in (None, 0):
            await asyncio.sleep(grace)
        if engine.status is not EngineStatus.DEAD:
            raise EngineDown(
                f"the vLLM engine of profile {engine.profile.name!r} failed to load: {engine.error}"
            )
        died = f"the vLLM engine core of profile {engine.profile.name!r} died (exit code {code})"
        now = loop.time()
        revivals = [t for t in revivals if now - t < REVIVAL_WINDOW_SECONDS] + [now]
        # Exit code 0 is a requested stop that on_shutdown did not cancel in time: not a crash a
        # new engine would fix (an outside SIGTERM, say); the worker restart handles it.
        if revive is None or code == 0 or len(revivals) > MAX_REVIVALS:
            raise EngineDown(died)
        logger.error("%s: starting a new engine in this worker (503 until it is ready)", died)
        started = loop.time()
        await revive()  # a failed load raises: the supervisor restarts the worker
        logger.info(
            "engine of profile %r ready again %.1f s after the new one was started",
            engine.profile.name,
            loop.time() - started,
        )


async def _exit_code(engine: SpecEngine, timeout: float, step: float = 0.1) -> int | None:
    """The dead engine core's exit code, once its process has exited (``None`` after
    ``timeout``: vLLM saw it die before the process was reaped, or hides the process)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (code := engine.exit_code()) is None and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(step)
    return code


class Supervisor:
    """Runs a service's background tasks; any of them failing restarts the worker, once.

    A task that raises is logged with its cause, then the worker is stopped after the backoff's
    delay (so a failing load does not restart in a tight loop). Cancelled tasks are normal stops.
    """

    def __init__(self, backoff: RestartBackoff, stop: Callable[[], None] = stop_worker) -> None:
        self.backoff = backoff
        self._stop = stop
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending_stop: asyncio.TimerHandle | None = None

    @property
    def restarting(self) -> bool:
        return self._pending_stop is not None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        cause = str(error) if isinstance(error, EngineDown) else f"{type(error).__name__}: {error}"
        if self.restarting:
            logger.warning("background task %r failed too: %s", task.get_name(), cause)
            return
        delay = self.backoff.delay()
        self.backoff.record_restart()
        logger.error(
            "background task %r failed: %s. Stopping this worker in %.3g s so that it restarts "
            "(restart %d in a row; the wait doubles up to %.3g s; requests get 503 until then)",
            task.get_name(),
            cause,
            delay,
            self.backoff.restarts,
            self.backoff.cap,
            exc_info=None if isinstance(error, EngineDown) else error,
        )
        self._pending_stop = asyncio.get_running_loop().call_later(delay, self._stop)

    def cancel_all(self) -> None:
        """Normal stop: cancel every task and a restart that is still waiting."""
        for task in list(self._tasks):
            task.cancel()
        if self._pending_stop is not None:
            self._pending_stop.cancel()
