"""The vLLM plugin that sets how long a CPU engine's processes spin on their shared-memory
queues (``BENTOSPEC_CPU_SHM_SPIN``), on real ``SpinCondition`` readers. No engine test yet:
the setting stays opt-in until the benchmark shows it pays."""

from __future__ import annotations

import threading
from importlib.metadata import entry_points
from typing import Any

import pytest
import zmq

from bentospec import settings, vllm_api
from bentospec.cpu_shm_wait import PLUGIN_NAME, register


@pytest.fixture
def spin_condition(monkeypatch: pytest.MonkeyPatch) -> type:
    """vLLM's class, with its ``__init__`` restored after the test."""
    condition = vllm_api.shm_spin_condition()
    monkeypatch.setattr(condition, "__init__", condition.__init__)
    monkeypatch.setattr(condition, "wait", condition.wait)
    return condition


def new_reader(condition: type) -> Any:
    """A reader built the way vLLM builds one."""
    # The process's shared context, left open as vLLM leaves its own: terminating a context
    # these sockets were built in aborted libzmq now and then.
    return condition(
        is_reader=True,
        context=zmq.Context.instance(),
        notify_address="inproc://bentospec-shm-wait-test",
    )


def close(reader: Any) -> None:
    for socket in (
        reader.local_notify_socket,
        reader.read_cancel_socket,
        reader.write_cancel_socket,
    ):
        socket.close(linger=0)


def reader_spin(condition: type) -> float:
    """The ``busy_loop_s`` a reader built the way vLLM builds one gets."""
    reader = new_reader(condition)
    close(reader)
    return reader.busy_loop_s


def test_the_plugin_is_a_vllm_general_plugin() -> None:
    assert PLUGIN_NAME in {ep.name for ep in entry_points(group="vllm.general_plugins")}


def test_unset_leaves_vllms_spin(spin_condition: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.CPU_SHM_SPIN.name, raising=False)
    register()
    assert reader_spin(spin_condition) == 1


@pytest.mark.parametrize("seconds", [0.0, 0.002])
def test_the_variable_sets_every_readers_spin_once(
    spin_condition: type, monkeypatch: pytest.MonkeyPatch, seconds: float
) -> None:
    monkeypatch.setenv(settings.CPU_SHM_SPIN.name, str(seconds))
    register()
    register()  # vLLM may load plugins more than once in a process: wrapped once
    assert reader_spin(spin_condition) == seconds
    assert not hasattr(spin_condition.__init__.__wrapped__, "bentospec_spin")


def test_a_configured_reader_never_sleeps_through_a_lost_signal(
    spin_condition: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no writer signalling at all (as when a signal is dropped), a sleeping reader still
    returns to look at its buffer: vLLM's own wait blocks until a signal that never comes."""
    monkeypatch.setenv(settings.CPU_SHM_SPIN.name, "0")
    register()
    reader = new_reader(spin_condition)
    waited = threading.Thread(target=reader.wait, kwargs={"timeout_ms": None}, daemon=True)
    waited.start()
    waited.join(timeout=10)
    assert not waited.is_alive(), "the reader slept on past its wake check"
    close(reader)
