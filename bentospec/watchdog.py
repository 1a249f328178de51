"""Turn a dead engine into a worker restart.

vLLM never restarts its engine-core process: once it dies (OOM kill, crash in a kernel) the
``AsyncLLM`` stays errored and every request would get 503 until someone restarts the service.
The watchdog stops the worker instead, so that its supervisor starts a fresh one with a new
engine. BentoML's circus arbiter respawns workers under ``bentoml serve``; inside a container
(``BENTOML_CONTAINERIZED``, BentoCloud) it does not, and the orchestrator restarts the container
once ``/livez`` stops answering.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable

from bentospec.engine import EngineStatus, SpecEngine

logger = logging.getLogger(__name__)

#: Seconds between checks; vLLM's own monitor notices the death, this only polls its verdict.
CHECK_INTERVAL_SECONDS = 1.0
#: The engine core also exits when the server stops (circus sends SIGTERM to the worker's
#: children too). Waiting this long before acting lets the service's on_shutdown cancel the
#: watchdog first, so that a normal stop is not reported as a crash.
SHUTDOWN_GRACE_SECONDS = 5.0
#: Requests that reached the engine just before it died may never finish, and uvicorn's graceful
#: shutdown waits for their connections (up to the traffic timeout): exit hard after this long.
EXIT_DEADLINE_SECONDS = 10.0


def stop_worker() -> None:
    """SIGTERM to this process (uvicorn's graceful shutdown, then on_shutdown), bounded."""
    hard_exit = threading.Timer(EXIT_DEADLINE_SECONDS, os._exit, args=(1,))
    hard_exit.daemon = True
    hard_exit.start()
    os.kill(os.getpid(), signal.SIGTERM)


async def watch_engine(
    engine: SpecEngine,
    *,
    interval: float = CHECK_INTERVAL_SECONDS,
    grace: float = SHUTDOWN_GRACE_SECONDS,
    on_dead: Callable[[], None] = stop_worker,
) -> None:
    """Wait until a ready ``engine`` is dead, then log it and call ``on_dead`` once."""
    while engine.status is not EngineStatus.DEAD:
        await asyncio.sleep(interval)
    await asyncio.sleep(grace)
    logger.error(
        "the vLLM engine core of profile %r died: stopping this worker so that it restarts "
        "with a new engine (requests get 503 until then)",
        engine.profile.name,
    )
    on_dead()
