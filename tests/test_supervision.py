"""Supervision of the service's background tasks and the restart backoff, without an engine.

The end-to-end check (a real load that fails, then recovers, under ``bentoml serve``) is
``tests/test_recovery.py``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bentospec.engine import EngineStatus, SpecEngine
from bentospec.profile import load_profile
from bentospec.watchdog import (
    MAX_REVIVALS,
    EngineDown,
    RestartBackoff,
    Supervisor,
    watch_engine,
)

PROFILE = load_profile("cpu")


def fake_engine(
    status: EngineStatus, error: str | None = None, exit_code: int | None = -9
) -> SimpleNamespace:
    """An engine whose core, once dead, exited with ``exit_code`` (-9: killed, a crash)."""
    return SimpleNamespace(status=status, error=error, profile=PROFILE, exit_code=lambda: exit_code)


# --- backoff ---------------------------------------------------------------------------------


def test_backoff_starts_at_once_doubles_and_is_capped(tmp_path: Path) -> None:
    backoff = RestartBackoff(tmp_path / "restarts.json", first=2.0, cap=20.0)
    delays = []
    for _ in range(8):
        delays.append(backoff.delay())
        backoff.record_restart()
    assert delays == [0.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0]


def test_backoff_survives_the_worker_process_and_resets_on_success(tmp_path: Path) -> None:
    path = tmp_path / "restarts.json"
    first = RestartBackoff(path, first=3.0, cap=60.0)
    first.record_restart()
    first.record_restart()
    # The next worker is a new process with a new object: only the file carries the count.
    assert RestartBackoff(path, first=3.0, cap=60.0).delay() == 6.0
    first.reset()
    assert RestartBackoff(path, first=3.0, cap=60.0).delay() == 0.0


def test_unreadable_backoff_state_counts_as_no_restart(tmp_path: Path) -> None:
    path = tmp_path / "restarts.json"
    path.write_text("{not json")
    assert RestartBackoff(path).delay() == 0.0
    path.write_text('{"restarts": -4}')
    assert RestartBackoff(path).delay() == 0.0


# --- watchdog --------------------------------------------------------------------------------


async def _watch(
    engine: SimpleNamespace, backoff: RestartBackoff, revive: Any = None
) -> asyncio.Task[None]:
    task = asyncio.create_task(
        watch_engine(cast(SpecEngine, engine), backoff, revive=revive, interval=0.01, grace=0)
    )
    await asyncio.sleep(0.1)
    return task


def test_failed_load_is_treated_like_a_dead_engine(tmp_path: Path) -> None:
    engine = fake_engine(EngineStatus.LOADING)
    backoff = RestartBackoff(tmp_path / "restarts.json")

    async def run() -> None:
        task = await _watch(engine, backoff)
        assert not task.done()
        engine.status, engine.error = EngineStatus.FAILED, "ModelNotFoundError: '/m' is gone"
        with pytest.raises(EngineDown, match=r"failed to load: ModelNotFoundError: '/m' is gone"):
            await asyncio.wait_for(task, 5)

    asyncio.run(run())


def test_dead_engine_is_reported_and_a_ready_one_resets_the_backoff(tmp_path: Path) -> None:
    engine = fake_engine(EngineStatus.LOADING)
    backoff = RestartBackoff(tmp_path / "restarts.json")
    backoff.record_restart()

    async def run() -> None:
        task = await _watch(engine, backoff)
        engine.status = EngineStatus.READY
        await asyncio.sleep(0.1)
        assert not task.done() and backoff.restarts == 0
        engine.status = EngineStatus.DEAD
        with pytest.raises(EngineDown, match="engine core of profile 'cpu' died"):
            await asyncio.wait_for(task, 5)

    asyncio.run(run())


def test_dead_engine_is_revived_in_the_worker_and_watched_again(tmp_path: Path) -> None:
    engine = fake_engine(EngineStatus.READY)
    revived: list[int] = []

    async def revive() -> None:
        engine.status = EngineStatus.LOADING
        await asyncio.sleep(0.05)
        revived.append(1)
        engine.status = EngineStatus.READY

    async def run() -> None:
        task = await _watch(engine, RestartBackoff(tmp_path / "restarts.json"), revive)
        for deaths in (1, 2):  # each death gets a new engine, and the new one is watched
            engine.status = EngineStatus.DEAD
            await asyncio.sleep(0.3)
            assert len(revived) == deaths and not task.done()
        task.cancel()

    asyncio.run(run())


def test_a_revival_that_fails_to_load_is_left_to_a_worker_restart(tmp_path: Path) -> None:
    engine = fake_engine(EngineStatus.READY)

    async def revive() -> None:
        engine.status, engine.error = EngineStatus.FAILED, "MemoryError: no room"
        raise RuntimeError("MemoryError: no room")

    async def run() -> None:
        task = await _watch(engine, RestartBackoff(tmp_path / "restarts.json"), revive)
        engine.status = EngineStatus.DEAD
        with pytest.raises(RuntimeError, match="no room"):
            await asyncio.wait_for(task, 5)

    asyncio.run(run())


def test_an_engine_core_that_exited_cleanly_is_a_stop_not_revived(tmp_path: Path) -> None:
    engine = fake_engine(EngineStatus.READY, exit_code=0)  # SIGTERM: drained, exit code 0
    revived: list[int] = []

    async def revive() -> None:
        revived.append(1)

    async def run() -> None:
        task = await _watch(engine, RestartBackoff(tmp_path / "restarts.json"), revive)
        engine.status = EngineStatus.DEAD
        with pytest.raises(EngineDown, match=r"died \(exit code 0\)"):
            await asyncio.wait_for(task, 5)
        assert revived == []

    asyncio.run(run())


def test_an_engine_that_keeps_dying_is_left_to_a_worker_restart(tmp_path: Path) -> None:
    engine = fake_engine(EngineStatus.READY)
    revived: list[int] = []

    async def revive() -> None:
        revived.append(1)
        engine.status = EngineStatus.READY

    async def run() -> None:
        task = await _watch(engine, RestartBackoff(tmp_path / "restarts.json"), revive)
        for _ in range(MAX_REVIVALS):
            engine.status = EngineStatus.DEAD
            await asyncio.sleep(0.1)
        engine.status = EngineStatus.DEAD
        with pytest.raises(EngineDown, match=r"died \(exit code -9\)"):
            await asyncio.wait_for(task, 5)
        assert len(revived) == MAX_REVIVALS

    asyncio.run(run())


# --- supervisor ------------------------------------------------------------------------------


class Stops:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def _fail(error: Exception) -> None:
    await asyncio.sleep(0)
    raise error


def test_a_failing_task_is_logged_with_its_cause_and_stops_the_worker_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stops = Stops()
    backoff = RestartBackoff(tmp_path / "restarts.json", first=0.05)
    backoff.record_restart()  # the second restart in a row waits `first`

    async def run() -> None:
        supervisor = Supervisor(backoff, stop=stops)
        supervisor.spawn(_fail(OSError("gauge file vanished")), "acceptance gauges")
        supervisor.spawn(_fail(EngineDown("engine core died")), "watchdog")
        await asyncio.sleep(0.02)
        assert stops.calls == 0  # still waiting out the backoff
        await asyncio.sleep(0.2)

    with caplog.at_level(logging.ERROR, logger="bentospec.watchdog"):
        asyncio.run(run())
    assert stops.calls == 1
    assert backoff.restarts == 2
    first = caplog.records[0]
    assert first.levelno == logging.ERROR
    assert "'acceptance gauges' failed: OSError: gauge file vanished" in first.getMessage()
    assert "in 0.05 s" in first.getMessage() and "restart 2 in a row" in first.getMessage()


def test_finished_and_cancelled_tasks_do_not_restart(tmp_path: Path) -> None:
    stops = Stops()

    async def run() -> None:
        supervisor = Supervisor(RestartBackoff(tmp_path / "restarts.json"), stop=stops)
        supervisor.spawn(asyncio.sleep(0), "engine load")
        forever = supervisor.spawn(asyncio.sleep(3600), "acceptance gauges")
        await asyncio.sleep(0.05)
        forever.cancel()
        await asyncio.sleep(0.05)

    asyncio.run(run())
    assert stops.calls == 0


def test_a_normal_stop_cancels_a_pending_restart(tmp_path: Path) -> None:
    stops = Stops()
    backoff = RestartBackoff(tmp_path / "restarts.json", first=0.1)
    backoff.record_restart()

    async def run() -> None:
        supervisor = Supervisor(backoff, stop=stops)
        supervisor.spawn(_fail(EngineDown("engine core died")), "watchdog")
        await asyncio.sleep(0.02)
        assert supervisor.restarting
        supervisor.cancel_all()
        await asyncio.sleep(0.3)

    asyncio.run(run())
    assert stops.calls == 0
