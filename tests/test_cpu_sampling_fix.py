"""The vLLM plugin that fixes vLLM-CPU's rejection sampler (docs/upstream/): the
``expand_kernel`` fallback, and top-k on a step with no draft token.

The end-to-end proofs are in tests/test_sampling.py (distributions with and without
speculation) and the service tests (sampling requests on ``cpu`` and ``cpu-draft``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from typing import Any

import pytest
import torch

from bentospec.cpu_sampling_fix import (
    PLUGIN_NAME,
    expand_tokens,
    fails_on_empty_steps,
    register,
    reproduces_bug,
    skip_empty_steps,
)

#: Runs vLLM's own ``expand_batch_to_tokens`` and ``apply_sampling_constraints`` the way the
#: rejection sampler does, after the worker's start-up sequence: general plugins, then the
#: platform's kernel overrides. The last step has two requests and no draft token (a prefill):
#: zero target rows, ``top_k`` without ``top_p``.
_SAMPLER_IN_VLLM = """
import json, torch
from types import SimpleNamespace
from vllm.plugins import load_general_plugins
from vllm.platforms import current_platform
load_general_plugins()
current_platform.register_triton_kernel_overrides()
from vllm.v1.sample import rejection_sampler
cu = torch.tensor([2, 5, 6], dtype=torch.int32)
temperature = rejection_sampler.expand_batch_to_tokens(torch.tensor([0.7, 0.0, 1.3]), cu, 6, 0, 1)
top_k = rejection_sampler.expand_batch_to_tokens(torch.tensor([10, 5, 3], dtype=torch.int32), cu, 6)
no_draft = SimpleNamespace(
    all_greedy=False, temperature=torch.full((2,), 0.8), top_p=None,
    top_k=torch.full((2,), 10, dtype=torch.int32),
)
try:
    rows = rejection_sampler.apply_sampling_constraints(
        torch.empty(0, 32), torch.zeros(2, dtype=torch.int32), no_draft
    ).shape[0]
except RuntimeError as exc:
    rows = str(exc)
print(json.dumps({"temperature": temperature.tolist(), "top_k": top_k.tolist(), "empty": rows}))
"""


def _sampler_in_vllm(plugins: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    run = subprocess.run(
        [sys.executable, "-c", _SAMPLER_IN_VLLM], env=env, capture_output=True, text=True
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


def test_steps_without_drafts_skip_the_constraints_and_others_are_constrained() -> None:
    calls: list[int] = []

    def constrain(logits: torch.Tensor, cu: torch.Tensor, metadata: object) -> torch.Tensor:
        calls.append(logits.shape[0])
        return logits * 2

    guarded = skip_empty_steps(constrain)
    empty = torch.empty(0, 4)
    assert guarded(empty, torch.zeros(3, dtype=torch.int32), None) is empty
    assert guarded(torch.ones(2, 4), torch.tensor([1, 2]), None).tolist() == [[2.0] * 4] * 2
    assert calls == [2]


def test_empty_step_check_tells_a_kernel_that_fails_on_zero_rows() -> None:
    def max_of_k(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> object:
        return k.max() if k is not None else logits  # what vLLM's CPU top-k-only path does

    assert fails_on_empty_steps(max_of_k)
    assert not fails_on_empty_steps(lambda logits, k, p: logits)


def test_plugin_is_a_vllm_general_plugin_of_this_distribution() -> None:
    (plugin,) = [p for p in entry_points(group="vllm.general_plugins") if p.name == PLUGIN_NAME]
    assert plugin.load() is register


@pytest.mark.slow
def test_vllm_samples_correctly_with_the_plugin() -> None:
    fixed = _sampler_in_vllm(plugins=None)
    assert fixed["temperature"] == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.3])
    assert fixed["top_k"] == [10, 10, 5, 5, 5, 3]
    assert fixed["empty"] == 0


@pytest.mark.slow
def test_upstream_vllm_still_needs_the_plugin() -> None:
    """Fails the day vLLM fixes either bug: then delete that fix (and its docs/upstream/ part)."""
    without = _sampler_in_vllm(plugins="")  # an allowlist that matches no plugin
    assert without["temperature"] != pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.3]), (
        "vLLM's CPU expand kernel is fixed upstream: remove expand_tokens"
    )
    assert "Expected reduction dim" in str(without["empty"]), (
        "vLLM's CPU top-k takes zero rows upstream: remove skip_empty_steps"
    )
