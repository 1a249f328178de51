"""The vLLM plugin that fixes vLLM-CPU's ``expand_kernel`` fallback (docs/upstream/).

The end-to-end proofs are in tests/test_sampling.py (distributions with and without
speculation) and the service tests (sampling requests on ``cpu`` and ``cpu-draft``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from bentospec.cpu_sampling_fix import PLUGIN_NAME, expand_tokens, register, reproduces_bug

#: Runs vLLM's own ``expand_batch_to_tokens`` the way the rejection sampler does, after the
#: worker's start-up sequence: general plugins, then the platform's kernel overrides.
_EXPAND_IN_VLLM = """
import json, torch
from vllm.plugins import load_general_plugins
from vllm.platforms import current_platform
load_general_plugins()
current_platform.register_triton_kernel_overrides()
from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens
cu = torch.tensor([2, 5, 6], dtype=torch.int32)
temperature = expand_batch_to_tokens(torch.tensor([0.7, 0.0, 1.3]), cu, 6, 0, 1)
top_k = expand_batch_to_tokens(torch.tensor([10, 5, 3], dtype=torch.int32), cu, 6)
print(json.dumps({"temperature": temperature.tolist(), "top_k": top_k.tolist()}))
"""


def _expand_in_vllm(plugins: str | None) -> dict[str, list[float]]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    run = subprocess.run(
        [sys.executable, "-c", _EXPAND_IN_VLLM], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_replacement_expands_each_request_over_its_tokens_keeping_the_dtype() -> None:
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = torch.full((8,), -99.0)  # longer than the tokens: the tail is left alone
    expand_tokens(out, torch.tensor([0.7, 0.0, 1.3]), cu, 0, 1)
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.3, -99.0, -99.0])
    ints = torch.full((6,), -99, dtype=torch.int32)
    expand_tokens(ints, torch.tensor([10, 5, 3], dtype=torch.int32), cu, 0, 0)
    assert ints.dtype == torch.int32 and ints.tolist() == [10, 10, 5, 5, 5, 3]


def test_reproducer_tells_a_kernel_that_writes_into_a_copy_from_a_correct_one() -> None:
    def writes_into_a_copy(output, input_val, cu_num_tokens, replace_from, replace_to):  # type: ignore[no-untyped-def]
        expand_tokens(output.to(torch.int64), input_val, cu_num_tokens, replace_from, replace_to)

    assert reproduces_bug(writes_into_a_copy)
    assert not reproduces_bug(expand_tokens)


def test_plugin_is_a_vllm_general_plugin_of_this_distribution() -> None:
    (plugin,) = [p for p in entry_points(group="vllm.general_plugins") if p.name == PLUGIN_NAME]
    assert plugin.load() is register


@pytest.mark.slow
def test_vllm_expands_temperature_and_top_k_correctly_with_the_plugin() -> None:
    fixed = _expand_in_vllm(plugins=None)
    assert fixed["temperature"] == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.3])
    assert fixed["top_k"] == [10, 10, 5, 5, 5, 3]


@pytest.mark.slow
def test_upstream_vllm_still_needs_the_plugin() -> None:
    """Fails the day vLLM fixes its kernel: then delete the plugin and docs/upstream/."""
    without = _expand_in_vllm(plugins="")  # an allowlist that matches no plugin
    assert without["temperature"] != pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.3]), (
        "vLLM's CPU expand kernel is fixed upstream: remove bentospec/cpu_sampling_fix.py"
    )
