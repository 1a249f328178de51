"""The real ``cpu`` profile engine: coherent text, speculation stats, lossless speculation."""

from __future__ import annotations

import os

import pytest

from bentospec import vllm_api
from bentospec.cpu_runtime import every_cpu, worker_cpus
from bentospec.dataset import load_cases, render_cases
from bentospec.engine import EngineStatus, SpecEngine
from bentospec.engine_args import engine_dtype
from bentospec.generation import RequestRejected, generate_full, stream_text, tokenized
from bentospec.metrics import engine_counters
from bentospec.profile import load_profile
from bentospec.schemas import SamplingOptions
from bentospec.verify import compare, greedy_tokens, run_profile
from tests.conftest import LoopThread

pytestmark = pytest.mark.engine

GREEDY = SamplingOptions(max_tokens=48, temperature=0)
LOSSLESS_TOKENS = 48


def rag_prompt(engine: SpecEngine, index: int = 0) -> tuple[str, str]:
    """A rendered RAG prompt and its documents' text."""
    case = load_cases(categories={"rag"})[index]
    return render_cases([case], engine.llm.get_tokenizer())[0], " ".join(case.documents)


def test_engine_is_ready(cpu_engine: SpecEngine) -> None:
    assert cpu_engine.status is EngineStatus.READY
    assert cpu_engine.exit_code() is None  # vLLM's engine-core process, still running
    # What `dtype: auto` resolved to here: float32 where engine_dtype says so, else vLLM's bf16.
    expected = "float32" if engine_dtype(cpu_engine.profile) == "float32" else "bfloat16"
    assert cpu_engine.dtype == expected


def test_engine_core_runs_vllms_prescribed_cpu_runtime(cpu_engine: SpecEngine) -> None:
    """Intel OpenMP and tcmalloc, read back from the engine-core process's memory maps."""
    runtime = cpu_engine.runtime
    assert runtime is not None and runtime.openmp == "libiomp5.so", runtime
    assert runtime.allocator.startswith("libtcmalloc_minimal.so.4"), runtime


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a core to reserve")
def test_engine_core_runs_on_the_cores_vllm_reserved(cpu_engine: SpecEngine) -> None:
    """The engine core and this process stay off the core the worker computes on."""
    engine_core = vllm_api.engine_core_pid(cpu_engine.llm)
    assert engine_core is not None and cpu_engine.runtime is not None
    worker = worker_cpus(engine_core)
    assert worker and cpu_engine.runtime.cpus, cpu_engine.runtime
    assert set(cpu_engine.runtime.cpus) == every_cpu() - worker


def test_generation_defaults_are_read_once_at_start(
    cpu_engine: SpecEngine, loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests use the values read at start: vLLM's reader opens generation_config.json."""
    expected = vllm_api.generation_defaults(cpu_engine.llm)

    def reads_the_disk(_: object) -> dict[str, object]:
        raise AssertionError("generation config read again for a request")

    monkeypatch.setattr(vllm_api, "generation_defaults", reads_the_disk)
    assert cpu_engine.generation_defaults() == expected
    result = loop.run(generate_full(cpu_engine, "Hello", SamplingOptions(max_tokens=2)))
    assert result.completion_tokens == 2


def test_generates_coherent_text_about_the_document(
    cpu_engine: SpecEngine, loop: LoopThread
) -> None:
    prompt, documents = rag_prompt(cpu_engine)
    result = loop.run(generate_full(cpu_engine, prompt, GREEDY))
    words = [w.strip(".,:;!?\"'()").lower() for w in result.text.split()]
    doc_words = {w.strip(".,:;!?\"'()").lower() for w in documents.split() if len(w) > 4}
    assert result.completion_tokens > 5
    assert sum(w.isalpha() for w in words) >= len(words) // 2, result.text  # mostly words
    assert doc_words & set(words), f"answer shares no word with the document: {result.text!r}"


def test_stream_concatenates_to_the_full_answer(cpu_engine: SpecEngine, loop: LoopThread) -> None:
    prompt, _ = rag_prompt(cpu_engine, 1)

    async def collect() -> list[str]:
        return [delta async for delta in stream_text(cpu_engine, prompt, GREEDY)]

    deltas = loop.run(collect())
    full = loop.run(generate_full(cpu_engine, prompt, GREEDY))
    assert len(deltas) > 1
    assert "".join(deltas) == full.text


def test_request_reports_speculation_and_counters_grow(
    cpu_engine: SpecEngine, loop: LoopThread
) -> None:
    prompt, _ = rag_prompt(cpu_engine, 2)
    before = engine_counters()
    result = loop.run(generate_full(cpu_engine, prompt, GREEDY))
    after = engine_counters()
    spec = result.speculation
    assert spec.method == "ngram"
    assert spec.applied and spec.draft_tokens > 0
    assert 0 <= spec.accepted_tokens <= spec.draft_tokens
    delta = after - before
    assert delta.draft_tokens >= spec.draft_tokens > 0
    assert delta.accepted_tokens >= spec.accepted_tokens


def test_request_without_drafts_says_why(cpu_engine: SpecEngine, loop: LoopThread) -> None:
    # One token comes from the prefill alone: nothing to speculate.
    prompt, _ = rag_prompt(cpu_engine)
    result = loop.run(generate_full(cpu_engine, prompt, SamplingOptions(max_tokens=1)))
    assert not result.speculation.applied
    assert result.speculation.reason


def test_prompt_runs_as_the_token_ids_it_was_checked_with(
    cpu_engine: SpecEngine, loop: LoopThread
) -> None:
    prompt, _ = rag_prompt(cpu_engine)
    tokens = loop.run(tokenized(cpu_engine, prompt))
    assert tokens["prompt_token_ids"] == cpu_engine.llm.get_tokenizer().encode(prompt)
    result = loop.run(generate_full(cpu_engine, tokens, GREEDY))
    assert result.prompt_tokens == len(tokens["prompt_token_ids"]) and result.text


def test_prompt_beyond_the_context_is_refused_naming_it(
    cpu_engine: SpecEngine, loop: LoopThread
) -> None:
    limit = cpu_engine.profile.engine.max_model_len
    with pytest.raises(RequestRejected, match=f"^query: .* max_model_len={limit}$"):
        loop.run(tokenized(cpu_engine, "word " * limit, chat=True, prompt_field="query"))


@pytest.fixture(scope="module")
def lossless_prompts(cpu_engine: SpecEngine) -> list[str]:
    """12 prompts across all categories of the committed dataset."""
    return render_cases(load_cases()[::4][:12], cpu_engine.llm.get_tokenizer())


@pytest.fixture(scope="module")
def greedy_baseline(loop: LoopThread, lossless_prompts: list[str]) -> list[list[int]]:
    """Plain greedy decoding (no speculation, float32) of the lossless prompts."""
    plain = load_profile("cpu").without_speculation().with_engine(dtype="float32")
    return loop.run(run_profile(plain, lossless_prompts, LOSSLESS_TOKENS), timeout=1200)


def test_ngram_speculation_is_lossless(
    cpu_engine: SpecEngine,
    loop: LoopThread,
    lossless_prompts: list[str],
    greedy_baseline: list[list[int]],
) -> None:
    spec = loop.run(greedy_tokens(cpu_engine, lossless_prompts, LOSSLESS_TOKENS))
    assert len(spec) >= 10 and sum(map(len, greedy_baseline)) > 10 * 20
    assert not compare(greedy_baseline, spec)


def test_draft_model_speculation_is_lossless(
    loop: LoopThread, lossless_prompts: list[str], greedy_baseline: list[list[int]]
) -> None:
    draft = load_profile("cpu-draft").with_engine(dtype="float32")
    assert draft.speculative is not None and draft.speculative.method == "draft_model"
    spec = loop.run(run_profile(draft, lossless_prompts, LOSSLESS_TOKENS), timeout=1200)
    assert not compare(greedy_baseline, spec)
