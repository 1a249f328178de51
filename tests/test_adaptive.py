"""The adaptive proposer in vLLM: its profile, the speculation switch, and its engine (lossless).

The decision logic alone is in ``test_adaptive_policy.py``."""

from __future__ import annotations

import pytest

from bentospec.adaptive import AdaptiveSettings
from bentospec.dataset import load_cases, render_cases
from bentospec.engine import SpecEngine
from bentospec.engine_args import engine_kwargs
from bentospec.generation import RequestRejected, check_request, generate_full, sampling_params
from bentospec.profile import ProfileError, SpeculativeSpec, load_profile
from bentospec.schemas import SamplingOptions
from bentospec.verify import compare, greedy_tokens, run_profile
from tests.conftest import LoopThread

LOSSLESS_TOKENS = 48


def test_profile_maps_to_vllm_custom_class_with_its_settings() -> None:
    profile = load_profile("cpu-adaptive")
    kwargs = engine_kwargs(profile)
    assert kwargs["speculative_config"] == {
        "method": "custom_class",
        "model": "bentospec.adaptive.AdaptiveNgramProposer",
        "num_speculative_tokens": 5,
    }
    settings = AdaptiveSettings.model_validate(
        kwargs["additional_config"]["bentospec_adaptive_ngram"]
    )
    assert (settings.prompt_lookup_min, settings.prompt_lookup_max) == (2, 5)
    assert settings.step_cost == profile.speculative.step_cost  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"step_cost": None}, "step_cost is required"),
        ({"step_cost": [[1, 10.0]]}, "at least two"),
        ({"step_cost": [[4, 10.0], [2, 20.0]]}, "must rise in tokens"),
        ({"step_cost": [[1, 10.0], [2, -1.0]]}, "greater than 0"),
        ({"num_speculative_tokens_per_batch_size": [[1, 64, 2]]}, "chooses k per request"),
        ({"prompt_lookup_max": None, "prompt_lookup_min": None}, "needs prompt_lookup_max"),
    ],
)
def test_bad_adaptive_settings_name_the_problem(changes: dict, message: str) -> None:
    base = load_profile("cpu-adaptive").speculative
    assert base is not None
    with pytest.raises(ValueError, match=message):
        SpeculativeSpec.model_validate({**base.model_dump(), **changes})


def test_step_cost_belongs_to_adaptive_ngram_only() -> None:
    spec = load_profile("cpu").speculative
    assert spec is not None
    with pytest.raises(ValueError, match="only used there"):
        SpeculativeSpec.model_validate({**spec.model_dump(), "step_cost": [[1, 1.0], [2, 2.0]]})
    assert issubclass(ProfileError, ValueError)


@pytest.mark.engine
def test_adaptive_speculation_is_lossless_and_reports_its_steps(loop: LoopThread) -> None:
    """Greedy tokens with the adaptive proposer equal plain decoding's (float32, one engine
    each, 12 prompts of every category in flight at once so rows move within the batch).
    Eager mode on both sides: the proposer, not torch.compile, is under test, and two more
    compiled engines would add minutes of start-up on 2 cores."""
    adaptive = load_profile("cpu-adaptive").with_engine(dtype="float32", enforce_eager=True)
    engine = SpecEngine(adaptive)
    loop.run(engine.start())
    try:
        tokenizer = engine.llm.get_tokenizer()
        prompts = render_cases(load_cases()[::4][:12], tokenizer)
        spec = loop.run(greedy_tokens(engine, prompts, LOSSLESS_TOKENS))
        rag = render_cases(load_cases(categories={"rag"})[:1], tokenizer)[0]
        full = loop.run(generate_full(engine, rag, SamplingOptions(max_tokens=64, temperature=0)))
        off = loop.run(
            generate_full(
                engine, rag, SamplingOptions(max_tokens=64, temperature=0, speculation="off")
            )
        )
    finally:
        engine.shutdown()
    plain = adaptive.without_speculation()
    baseline = loop.run(run_profile(plain, prompts, LOSSLESS_TOKENS), timeout=1200)
    assert sum(map(len, baseline)) > 10 * 20
    assert not compare(baseline, spec)
    # The RAG answer copies from its document: the adapter drafted, and says how.
    stats = full.speculation
    assert stats.applied and stats.steps_with_drafts and stats.drafts_per_step
    assert len(stats.drafts_per_step) == stats.steps_with_drafts
    assert all(1 <= k <= 5 for k in stats.drafts_per_step)
    assert stats.steps_without_drafts is not None
    # The same request with speculation off: no drafts at all, same text.
    assert not off.speculation.applied and off.speculation.steps_with_drafts == 0
    assert off.text == full.text


def test_speculation_off_is_passed_to_the_proposer_or_refused_naming_the_field() -> None:
    off = SamplingOptions(speculation="off")
    assert sampling_params(off, stream=False).extra_args == {"speculation": "off"}
    assert not sampling_params(SamplingOptions(), stream=False).extra_args
    check_request(SpecEngine(load_profile("cpu-adaptive")), "Hello", off)
    with pytest.raises(RequestRejected) as refused:
        check_request(SpecEngine(load_profile("cpu")), "Hello", off)
    assert refused.value.field == "speculation" and "adaptive-ngram" in str(refused.value)
    with pytest.raises(ValueError, match="speculation"):
        SamplingOptions.model_validate({"speculation": "sometimes"})
