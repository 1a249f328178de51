"""The vLLM plugin that runs a CPU engine's wide steps on every core
(``BENTOSPEC_CPU_WIDE_STEP_TOKENS``): its wrapper, its registration, and a real engine."""

from __future__ import annotations

from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest

from bentospec import settings, vllm_api
from bentospec.cpu_runtime import every_cpu, worker_cpus
from bentospec.cpu_step_threads import _THREADS, PLUGIN_NAME, register, widening
from bentospec.dataset import load_cases, render_cases
from bentospec.engine import SpecEngine
from bentospec.generation import generate_full
from bentospec.profile import load_profile
from bentospec.schemas import GenerateResult, SamplingOptions
from tests.conftest import LoopThread


class Threads:
    """Stands in for the worker's OpenMP threads: how many a forward pass gets."""

    def __init__(self, reserved: set[int]) -> None:
        self.reserved = reserved
        self.current = 1

    def widen(self) -> None:
        self.current = 1 + len(self.reserved)

    def narrow_again(self) -> None:
        self.current = 1


class Runner:
    """A model runner whose forward pass reports the threads it ran on."""

    def __init__(self, threads: Threads) -> None:
        self.__dict__[_THREADS] = threads

    def execute_model(self, scheduler_output: SimpleNamespace) -> int:
        if scheduler_output.fail:
            raise RuntimeError("forward pass failed")
        return self.__dict__[_THREADS].current


def step(tokens: int, *, fail: bool = False) -> SimpleNamespace:
    return SimpleNamespace(total_num_scheduled_tokens=tokens, fail=fail)


def test_the_plugin_is_a_vllm_general_plugin() -> None:
    assert PLUGIN_NAME in {ep.name for ep in entry_points(group="vllm.general_plugins")}


@pytest.mark.parametrize(("tokens", "threads"), [(1, 1), (63, 1), (64, 2), (2048, 2)])
def test_only_a_step_of_the_threshold_or_more_runs_wide(tokens: int, threads: int) -> None:
    runner = Runner(Threads(reserved={1}))
    execute = widening(Runner.execute_model, 64)
    assert execute(runner, step(tokens)) == threads
    assert runner.__dict__[_THREADS].current == 1  # the next step starts narrow


def test_a_failed_wide_step_leaves_the_threads_narrow() -> None:
    runner = Runner(Threads(reserved={1}))
    with pytest.raises(RuntimeError, match="forward pass failed"):
        widening(Runner.execute_model, 64)(runner, step(500, fail=True))
    assert runner.__dict__[_THREADS].current == 1


def test_no_reserved_core_means_no_wide_step() -> None:
    runner = Runner(Threads(reserved=set()))
    assert widening(Runner.execute_model, 64)(runner, step(500)) == 1


@pytest.fixture
def vllm_runner(monkeypatch: pytest.MonkeyPatch) -> type:
    """vLLM's runner class as vLLM defines it, restored after the test."""
    runner = vllm_api.model_runner_class()
    method = runner.execute_model
    ours = getattr(method, "bentospec_wide_tokens", None) is not None
    monkeypatch.setattr(runner, "execute_model", method.__wrapped__ if ours else method)
    return runner


@pytest.mark.parametrize(("value", "patched"), [("64", True), ("", True), ("0", False)])
def test_register_patches_vllm_once_unless_switched_off(
    vllm_runner: type, monkeypatch: pytest.MonkeyPatch, value: str, patched: bool
) -> None:
    before = vllm_runner.execute_model
    monkeypatch.setenv(settings.CPU_WIDE_STEP_TOKENS.name, value)
    register()
    register()  # vLLM may load plugins more than once in a process: wrapped once
    assert (vllm_runner.execute_model is not before) is patched
    assert not hasattr(
        getattr(vllm_runner.execute_model, "__wrapped__", None), "bentospec_wide_tokens"
    )


@pytest.mark.engine
def test_an_engine_prefills_on_every_core_and_answers_the_same(
    loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float32 greedy: with the plugin the worker gains a thread on the reserved core (its
    forward passes ran there too) and answers exactly as with vLLM's threads."""
    profile = load_profile("cpu").with_engine(dtype="float32")
    (case,) = load_cases(None, {"rag"}, 1)

    async def run() -> tuple[GenerateResult, set[int]]:
        async with SpecEngine(profile) as engine:
            (prompt,) = render_cases([case], engine.llm.tokenizer)
            options = SamplingOptions(temperature=0.0, max_tokens=48)
            result = await generate_full(engine, prompt, options)
            engine_core = vllm_api.engine_core_pid(engine.llm)
            assert engine_core is not None
            return result, worker_cpus(engine_core)

    runs: dict[str, tuple[GenerateResult, set[int]]] = {}
    for tokens in ("0", "1"):
        monkeypatch.setenv(settings.CPU_WIDE_STEP_TOKENS.name, tokens)
        runs[tokens] = loop.run(run())
    assert len(runs["0"][1]) == 1  # vLLM's binding: one core for the worker, one reserved
    assert runs["1"][1] == every_cpu()
    assert runs["1"][0] == runs["0"][0]
