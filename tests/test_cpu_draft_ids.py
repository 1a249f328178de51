"""The vLLM plugin that returns a CPU engine's drafts with each step's sampled tokens
(``BENTOSPEC_CPU_DRAFTS``): its wrappers, its registration, and a real engine either way."""

from __future__ import annotations

from importlib.metadata import entry_points
from types import SimpleNamespace
from typing import Any

import pytest

from bentospec import settings, vllm_api
from bentospec.cpu_draft_ids import (
    DRAFTS,
    PLUGIN_NAME,
    keeping_drafts,
    register,
    taking_kept,
    with_drafts,
)
from bentospec.dataset import load_cases
from bentospec.profile import load_profile
from bentospec.schemas import GenerateResult
from tests.conftest import LoopThread, greedy_answer


class Runner:
    """The model runner's side: drafts proposed during ``sample_tokens``."""

    def __init__(self, *, speculative: bool = True, async_scheduling: bool = False) -> None:
        self.speculative_config = object() if speculative else None
        self.use_async_scheduling = async_scheduling
        self.drafts = ["drafts of this step"]

    def sample_tokens(self, req_ids: list[str]) -> SimpleNamespace:
        return SimpleNamespace(req_ids=req_ids)

    def take_draft_token_ids(self) -> list[str]:
        return self.drafts


class Executor:
    """The engine core's side: one output per step, drafts asked for after it."""

    def __init__(self, outputs: list[Any]) -> None:
        self.outputs = outputs
        self.rpcs = 0

    def sample_tokens(self) -> Any:
        return self.outputs.pop(0)

    def take_draft_token_ids(self) -> str:
        self.rpcs += 1
        return "drafts from the worker"


def test_the_plugin_is_a_vllm_general_plugin() -> None:
    assert PLUGIN_NAME in {ep.name for ep in entry_points(group="vllm.general_plugins")}


@pytest.mark.parametrize(
    ("runner", "req_ids", "carried"),
    [
        (Runner(), ["r1"], True),
        (Runner(), [], False),  # vLLM's shared empty output is left alone
        (Runner(async_scheduling=True), ["r1"], False),  # drafts stay in the worker there
        (Runner(speculative=False), ["r1"], False),
    ],
)
def test_a_step_output_carries_its_drafts_when_the_engine_asks_for_them(
    runner: Runner, req_ids: list[str], carried: bool
) -> None:
    output = with_drafts(Runner.sample_tokens)(runner, req_ids)
    assert (getattr(output, DRAFTS, None) == runner.drafts) is carried


def test_post_step_takes_the_carried_drafts_and_asks_the_worker_otherwise() -> None:
    carrying = SimpleNamespace(req_ids=["r1"], **{DRAFTS: "carried drafts"})
    executor = Executor([carrying, SimpleNamespace(req_ids=["r1"])])
    sample, take = (
        keeping_drafts(Executor.sample_tokens),
        taking_kept(Executor.take_draft_token_ids),
    )
    assert sample(executor) is carrying
    assert not hasattr(carrying, DRAFTS)  # the output goes on to the scheduler without them
    assert (take(executor), executor.rpcs) == ("carried drafts", 0)
    sample(executor)  # a step whose output carries none (async, empty)
    assert (take(executor), executor.rpcs) == ("drafts from the worker", 1)


@pytest.fixture
def vllm_classes(monkeypatch: pytest.MonkeyPatch) -> tuple[type, type]:
    """vLLM's runner and executor classes as vLLM defines them (an engine started earlier in
    this process loaded the plugin already), restored after the test."""
    runner, executor = vllm_api.model_runner_class(), vllm_api.multiproc_executor_class()
    ours = getattr(runner.sample_tokens, "bentospec_drafts", False)
    for cls, name in (
        (runner, "sample_tokens"),
        (executor, "sample_tokens"),
        (executor, "take_draft_token_ids"),
    ):
        method = getattr(cls, name)
        monkeypatch.setattr(cls, name, method.__wrapped__ if ours else method)
    return runner, executor


@pytest.mark.parametrize(("mode", "patched"), [("carried", True), ("rpc", False)])
def test_register_patches_vllm_once_unless_switched_off(
    vllm_classes: tuple[type, type], monkeypatch: pytest.MonkeyPatch, mode: str, patched: bool
) -> None:
    runner, executor = vllm_classes
    before = runner.sample_tokens, executor.sample_tokens, executor.take_draft_token_ids
    monkeypatch.setenv(settings.CPU_DRAFTS.name, mode)
    register()
    register()  # vLLM may load plugins more than once in a process: wrapped once
    after = runner.sample_tokens, executor.sample_tokens, executor.take_draft_token_ids
    assert [a is not b for a, b in zip(after, before, strict=True)] == [patched] * 3
    assert not hasattr(getattr(runner.sample_tokens, "__wrapped__", None), "bentospec_drafts")


@pytest.mark.engine
def test_an_engine_verifies_the_same_drafts_either_way(
    loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float32 greedy: the same text and the same drafts, proposed, carried and verified."""
    profile = load_profile("cpu").with_engine(dtype="float32")
    (case,) = load_cases(None, {"rag"}, 1)
    results: dict[str, GenerateResult] = {}
    for mode in ("rpc", "carried"):
        monkeypatch.setenv(settings.CPU_DRAFTS.name, mode)
        results[mode] = greedy_answer(loop, profile, case)
    assert results["carried"].speculation.accepted_tokens > 0
    assert results["carried"] == results["rpc"]
