"""vLLM plugin: a CPU engine's forward passes also run on the cores vLLM reserves.

vLLM's CPU worker runs its forward passes with one OpenMP thread per core it is bound to and
reserves the other cores "for the scheduler process": on 2 cores, one thread. bentospec binds the
engine core and the API process to the reserved core (``cpu_runtime.confine_to_reserved``), and
while the worker computes, that core mostly waits: the engine core for the step's output (it
spins with ``sched_yield``, which yields to any runnable thread), the API process for tokens. An
unseen 700-token RAG prompt took ~1 s to prefill on the one thread, the same with and without
speculation, which is what kept concurrency 1 from the speedup speculation gives once decoding.

A step that schedules at least ``BENTOSPEC_CPU_WIDE_STEP_TOKENS`` tokens (default 1: every step)
runs its forward pass with one more OpenMP thread per reserved core, bound there; sampling and
drafting keep vLLM's threads. On the AVX-512 class this made every config 1.2-1.6x faster through
``bentoml serve`` (docs/benchmarks.md). ``0`` keeps vLLM's threads (the benchmark's A/B).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from bentospec import settings

#: The entry-point name in ``pyproject.toml``.
PLUGIN_NAME = "bentospec_cpu_step_threads"
#: The model runner's attribute holding its :class:`StepThreads`, made at its first wide step.
_THREADS = "_bentospec_step_threads"

logger = logging.getLogger(f"vllm.plugins.{PLUGIN_NAME}")


def thread_ids() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def reserved_cores() -> set[int]:
    """The cores the engine core (this worker's parent) runs on, less the worker's own.

    vLLM binds the worker's OpenMP threads, its main thread first, to the cores it picks and
    reserves the others; bentospec binds the engine core to those (``confine_to_reserved``),
    before the first request."""
    try:
        return os.sched_getaffinity(os.getppid()) - os.sched_getaffinity(0)
    except OSError:  # the engine core is gone: the worker is stopping
        return set()


class StepThreads:
    """The OpenMP threads of one worker: vLLM's for a narrow step, one more per reserved core
    for a wide one."""

    def __init__(self) -> None:
        #: vLLM's threads (one per core the worker is bound to).
        self.narrow = torch.get_num_threads()
        self.reserved = reserved_cores()
        self.wide = self.narrow + len(self.reserved)
        self._placed = False

    def widen(self) -> None:
        """Every core for the next forward pass."""
        # vLLM replaces torch.set_num_threads to forbid changes after its binding.
        torch._C.set_num_threads(self.wide)
        if not self._placed:
            self._place_new_threads()

    def _place_new_threads(self) -> None:
        """Bind the threads OpenMP adds to the reserved cores (it binds a new thread to the
        worker's cores, where it would only take turns with the others)."""
        before = thread_ids()
        torch.ones(1 << 20).sum()  # a parallel region: OpenMP starts its threads
        added = thread_ids() - before
        for tid in added:
            os.sched_setaffinity(tid, self.reserved)
        self._placed = True
        logger.info(
            "%s: wide steps on %d threads, %d of them on reserved cores %s",
            PLUGIN_NAME,
            self.wide,
            len(added),
            sorted(self.reserved),
        )

    def narrow_again(self) -> None:
        torch._C.set_num_threads(self.narrow)


def widening(execute_model: Any, min_tokens: int) -> Any:
    """The model runner's ``execute_model`` (the forward pass), on every core for a step of
    at least ``min_tokens`` scheduled tokens."""

    @functools.wraps(execute_model)
    def execute(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        if scheduler_output.total_num_scheduled_tokens < min_tokens:
            return execute_model(self, scheduler_output, *args, **kwargs)
        threads: StepThreads | None = self.__dict__.get(_THREADS)
        if threads is None:
            threads = self.__dict__.setdefault(_THREADS, StepThreads())
        if not threads.reserved:  # bound to every core already: nothing to add
            return execute_model(self, scheduler_output, *args, **kwargs)
        threads.widen()
        try:
            return execute_model(self, scheduler_output, *args, **kwargs)
        finally:
            threads.narrow_again()

    execute.bentospec_wide_tokens = min_tokens  # type: ignore[attr-defined]
    return execute


def register() -> None:
    """``vllm.general_plugins`` entry point: on CPU, wide steps run on every core."""
    min_tokens = settings.CPU_WIDE_STEP_TOKENS.get()
    if min_tokens <= 0:
        return
    from bentospec import vllm_api

    if not vllm_api.is_cpu_platform():
        return
    runner = vllm_api.model_runner_class()
    if getattr(runner.execute_model, "bentospec_wide_tokens", None) is not None:
        return  # registered already in this process
    runner.execute_model = widening(runner.execute_model, min_tokens)
