"""The vLLM plugin that lets vLLM-CPU load its torch.compile cache (docs/upstream/).

The proof that matters is the second compiled start: the engine test below starts the ``cpu``
profile with torch.compile twice on one cache and reads vLLM's own log lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from bentospec import settings
from bentospec.cpu_compile_cache_fix import (
    PLUGIN_NAME,
    artifact_class,
    finalize_loading,
    needs_fix,
    register,
)

#: vLLM's log lines on a start that loaded the cache, and on one that compiled again.
LOADED = "Directly load AOT compilation from path"
RECOMPILED = "Compiling model again due to a load failure"

#: One compiled start of the ``cpu`` profile's engine and one greedy request.
_START = """
import asyncio
from bentospec.engine import SpecEngine
from bentospec.generation import generate_full
from bentospec.profile import load_profile
from bentospec.schemas import SamplingOptions

async def main() -> None:
    engine = SpecEngine(load_profile("cpu"))
    await engine.start()
    result = await generate_full(engine, "The capital of France is", SamplingOptions(
        max_tokens=12, temperature=0))
    print("TEXT", repr(result.text), flush=True)
    engine.shutdown()

asyncio.run(main())
"""


def test_the_plugin_adds_the_method_only_where_it_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Missing:
        pass

    class Present:
        def finalize_loading(self, vllm_config: object) -> None: ...

    assert needs_fix(Missing) and not needs_fix(Present)
    monkeypatch.setattr("bentospec.cpu_compile_cache_fix.artifact_class", lambda: Missing)
    register()
    assert vars(Missing)["finalize_loading"] is finalize_loading
    assert Missing().finalize_loading(None) is None  # type: ignore[attr-defined]


def test_plugin_is_a_vllm_general_plugin_of_this_distribution() -> None:
    (plugin,) = [p for p in entry_points(group="vllm.general_plugins") if p.name == PLUGIN_NAME]
    assert plugin.load() is register


def test_upstream_torch_still_lacks_what_vllm_calls() -> None:
    """Fails the day torch's artifact (or vLLM's loader) no longer needs the plugin."""
    import torch  # noqa: F401 - the plugin runs after vLLM imported torch

    assert needs_fix(artifact_class()) or vars(artifact_class())["finalize_loading"] is (
        finalize_loading
    ), "torch's BundledAOTAutogradSerializableCallable has finalize_loading: remove the plugin"


def _compiled_start(cache: Path) -> str:
    dropped = (settings.ENFORCE_EAGER.name, "VLLM_PLUGINS")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["VLLM_CACHE_ROOT"] = str(cache)
    run = subprocess.run(
        [sys.executable, "-c", _START], env=env, capture_output=True, text=True, timeout=900
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    return log


@pytest.mark.engine
def test_a_second_compiled_start_loads_the_cache_and_answers_the_same(tmp_path: Path) -> None:
    first = _compiled_start(tmp_path)
    assert LOADED not in first  # an empty cache: compiled, then saved
    second = _compiled_start(tmp_path)
    assert LOADED in second and RECOMPILED not in second, second[-3000:]
    text = [line for line in first.splitlines() if line.startswith("TEXT ")]
    assert text and text == [line for line in second.splitlines() if line.startswith("TEXT ")]
