"""vLLM plugin: a CPU engine's drafts come back with the step's sampled tokens.

vLLM's CPU platform schedules synchronously, and then, after every step of a speculative
engine, ``EngineCore.post_step`` asks the worker for the drafts it proposed
(``take_draft_token_ids``): a third round trip through the shared-memory queues beside
``execute_model`` and ``sample_tokens``, also when the batch's schedule drafts nothing. On 2
cores each round trip waits on the core the engine core shares with the API process; a step
with no draft at all cost 3-6% over no speculation (docs/benchmarks.md).

The worker proposes the drafts inside ``sample_tokens``, before it returns, so they can travel
with its output: the model runner attaches them, and the executor hands them to ``post_step``
without asking again. Where the output carries none (async scheduling, a non-blocking call,
an empty step) the executor asks the worker as vLLM does. ``BENTOSPEC_CPU_DRAFTS=rpc`` leaves
vLLM's round trip (the benchmark's A/B).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from bentospec import settings

#: The entry-point name in ``pyproject.toml``.
PLUGIN_NAME = "bentospec_cpu_draft_ids"
#: The attribute of a ``ModelRunnerOutput`` that carries the step's drafts to the engine core.
DRAFTS = "bentospec_draft_token_ids"
#: The executor's attribute holding the drafts of the last step until ``post_step`` takes them.
_TAKEN = "_bentospec_draft_token_ids"

logger = logging.getLogger(f"vllm.plugins.{PLUGIN_NAME}")


def with_drafts(sample_tokens: Any) -> Any:
    """The model runner's ``sample_tokens``, whose output also carries the step's drafts."""

    @functools.wraps(sample_tokens)
    def sample_and_draft(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = sample_tokens(self, *args, **kwargs)
        synchronous = self.speculative_config is not None and not self.use_async_scheduling
        # Only a step's own output object: vLLM shares one empty output between steps.
        if synchronous and output is not None and getattr(output, "req_ids", None):
            setattr(output, DRAFTS, self.take_draft_token_ids())
        return output

    sample_and_draft.bentospec_drafts = True  # type: ignore[attr-defined]
    return sample_and_draft


def keeping_drafts(sample_tokens: Any) -> Any:
    """The executor's ``sample_tokens``: keeps the drafts its output carries for ``post_step``."""

    @functools.wraps(sample_tokens)
    def sample_and_keep(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = sample_tokens(self, *args, **kwargs)
        carried = getattr(output, "__dict__", {})
        if DRAFTS in carried:
            setattr(self, _TAKEN, carried.pop(DRAFTS))
        return output

    return sample_and_keep


def taking_kept(take_draft_token_ids: Any) -> Any:
    """The executor's ``take_draft_token_ids``: the drafts kept from the last step if any, else
    the worker's answer."""

    @functools.wraps(take_draft_token_ids)
    def take(self: Any) -> Any:
        if hasattr(self, _TAKEN):
            return self.__dict__.pop(_TAKEN)
        return take_draft_token_ids(self)

    return take


def register() -> None:
    """``vllm.general_plugins`` entry point: on CPU, drafts travel with ``sample_tokens``."""
    from bentospec import vllm_api

    if settings.CPU_DRAFTS.get() == "rpc" or not vllm_api.is_cpu_platform():
        return
    runner = vllm_api.model_runner_class()
    if getattr(runner.sample_tokens, "bentospec_drafts", False):
        return  # registered already in this process
    runner.sample_tokens = with_drafts(runner.sample_tokens)
    executor = vllm_api.multiproc_executor_class()
    executor.sample_tokens = keeping_drafts(executor.sample_tokens)
    executor.take_draft_token_ids = taking_kept(executor.take_draft_token_ids)
    logger.info("%s: drafts travel with each step's sampled tokens", PLUGIN_NAME)
