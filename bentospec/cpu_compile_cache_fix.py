"""vLLM plugin: let vLLM 0.32 on CPU load its own torch.compile cache instead of recompiling.

On CPU, vLLM compiles the model with torch's stock inductor backend
(``CpuPlatform.check_and_update_config`` turns ``VLLM_COMPILE`` into ``DYNAMO_TRACE_ONCE``) and
saves it as an AOT artifact. The next start finds the artifact, loads it with
``torch.compiler.load_compiled_function``, then calls
``loaded_fn._artifacts.compiled_fn.finalize_loading(vllm_config)``
(``vllm/compilation/decorators.py``, ``_try_load_aot_compiled_fn``): a method only vLLM's own
``VllmSerializableFunction`` (the GPU path) has. torch's wrapper,
``BundledAOTAutogradSerializableCallable``, forwards the lookup to the inner function, the
call raises ``AttributeError: 'function' object has no attribute 'finalize_loading'``, vLLM logs
"Compiling model again due to a load failure" and recompiles: ~90 s more on every start, the
first one after an engine death included. See ``docs/upstream/vllm-cpu-compile-cache.md``.

The bundled inductor artifact is complete once torch has loaded it, so the missing method is a
no-op. It is added only where torch's class lacks it; delete this module once vLLM checks for
it (``tests/test_cpu_compile_cache_fix.py`` fails that day).
"""

from __future__ import annotations

import logging
from typing import Any

#: The entry-point name in ``pyproject.toml``.
PLUGIN_NAME = "bentospec_cpu_compile_cache_fix"

logger = logging.getLogger(f"vllm.plugins.{PLUGIN_NAME}")


def artifact_class() -> type:
    """torch's wrapper of a bundled AOT-compiled inductor function (what vLLM's CPU cache holds)."""
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable

    return BundledAOTAutogradSerializableCallable


def finalize_loading(self: Any, vllm_config: Any) -> None:
    """Nothing to finalize: torch loaded the whole inductor artifact already."""


def needs_fix(cls: type) -> bool:
    """True if vLLM's loader would fail on ``cls`` (it defines no ``finalize_loading``)."""
    return "finalize_loading" not in vars(cls)


def register() -> None:
    """``vllm.general_plugins`` entry point: add the method where torch's class lacks it."""
    try:
        cls = artifact_class()
    except ImportError:  # a torch without AOT compile: vLLM does not use the cache either
        return
    if not needs_fix(cls):
        return
    cls.finalize_loading = finalize_loading  # type: ignore[attr-defined]
    logger.info(
        "%s: vLLM's torch.compile cache loads on CPU (torch's AOT artifact got the "
        "finalize_loading vLLM calls)",
        PLUGIN_NAME,
    )
