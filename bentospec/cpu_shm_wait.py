"""vLLM plugin: how long a CPU engine's processes spin on their shared-memory queues.

On CPU, vLLM runs its worker in a process of its own and passes each step's scheduler output
and model output through shared-memory queues (``shm_broadcast.MessageQueue``). A reader that
finds its queue empty calls ``sched_yield`` and looks again, for ``SpinCondition.busy_loop_s``
(1 s, no setting) after its last message; only then does it sleep on the queue's notify socket,
which every write signals. A decoding step takes 30-150 ms here, so the engine core never
sleeps: it spins for the whole forward pass, on the core vLLM reserves for it, which the API
process (tokenizing, streaming) shares, and which a worker running on every core would need.

``BENTOSPEC_CPU_SHM_SPIN`` (seconds) replaces vLLM's 1 s in every process of a CPU engine:
``0`` makes a reader sleep at once until the writer signals (a wake-up costs tens of
microseconds against a step of tens of milliseconds). Unset, vLLM's value stays.

A sleeping reader can miss its signal: with ``0``, a ``bentoml serve`` under the benchmark's
load stalled for good within minutes, every process idle. The likely path: the writer's
notify socket keeps one message (``SNDHWM=1``) and the reader's keeps the last
(``CONFLATE``), so a signal sent while an older one is still in flight is dropped, and a
reader that consumed the older one waits for a write that already happened. vLLM's 1 s spin
hides this, since a spinning reader looks at the buffer itself. So a reader this plugin
configures sleeps at most :data:`WAKE_CHECK_MS` before it looks at the buffer again.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from bentospec import settings

#: The entry-point name in ``pyproject.toml``.
PLUGIN_NAME = "bentospec_cpu_shm_wait"

logger = logging.getLogger(f"vllm.plugins.{PLUGIN_NAME}")

#: The longest a configured reader sleeps before it looks at its buffer again: what a lost
#: signal costs at most (a decoding step takes 25-250 ms here).
WAKE_CHECK_MS = 5


def with_spin(init: Any, seconds: float) -> Any:
    """``SpinCondition.__init__`` with ``busy_loop_s=seconds`` (a writer ignores it)."""

    @functools.wraps(init)
    def spin_for(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{**kwargs, "busy_loop_s": seconds})

    spin_for.bentospec_spin = seconds  # type: ignore[attr-defined]
    return spin_for


def with_wake_check(wait: Any) -> Any:
    """``SpinCondition.wait`` that sleeps at most :data:`WAKE_CHECK_MS` (the caller loops
    back to the buffer either way)."""

    @functools.wraps(wait)
    def bounded(self: Any, timeout_ms: int | None = None) -> None:
        wait(self, WAKE_CHECK_MS if timeout_ms is None else min(timeout_ms, WAKE_CHECK_MS))

    return bounded


def register() -> None:
    """``vllm.general_plugins`` entry point: set the spin where the variable asks for it."""
    seconds = settings.CPU_SHM_SPIN.get()
    if seconds is None:
        return
    from bentospec import vllm_api

    if not vllm_api.is_cpu_platform():
        return
    condition = vllm_api.shm_spin_condition()
    if getattr(condition.__init__, "bentospec_spin", None) == seconds:
        return  # registered already in this process
    condition.__init__ = with_spin(condition.__init__, seconds)
    condition.wait = with_wake_check(condition.wait)
    logger.info("%s: shared-memory queue readers spin %.3g s, then sleep", PLUGIN_NAME, seconds)
