"""The vLLM plugin that sets how long a CPU engine's processes spin on their shared-memory
queues (``BENTOSPEC_CPU_SHM_SPIN``), on real ``SpinCondition`` readers. No engine test yet:
the setting stays opt-in until the benchmark shows it pays."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import zmq

from bentospec import settings, vllm_api
from bentospec.cpu_shm_wait import PLUGIN_NAME, register


@pytest.fixture
def spin_condition(monkeypatch: pytest.MonkeyPatch) -> type:
    """vLLM's class, with its ``__init__`` restored after the test."""
    condition = vllm_api.shm_spin_condition()
    monkeypatch.setattr(condition, "__init__", condition.__init__)
    return condition


def reader_spin(condition: type) -> float:
    """The ``busy_loop_s`` a reader built the way vLLM builds one gets."""
    # The process's shared context, left open as vLLM leaves its own: terminating a context
    # these sockets were built in aborted libzmq now and then.
    reader = condition(
        is_reader=True,
        context=zmq.Context.instance(),
        notify_address="inproc://bentospec-shm-wait-test",
    )
    for socket in (
        reader.local_notify_socket,
        reader.read_cancel_socket,
        reader.write_cancel_socket,
    ):
        socket.close(linger=0)
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
