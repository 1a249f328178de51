"""The adaptive proposer's decision logic (no engine), its profile, and its engine (lossless)."""

from __future__ import annotations

import pytest

from bentospec.adaptive import (
    PROBE_INTERVAL,
    AdaptivePolicy,
    AdaptiveSettings,
    Row,
    choose_ks,
    expected_tokens,
    step_time,
)
from bentospec.dataset import load_cases, render_cases
from bentospec.engine import SpecEngine
from bentospec.engine_args import engine_kwargs
from bentospec.generation import RequestRejected, check_request, generate_full, sampling_params
from bentospec.profile import ProfileError, SpeculativeSpec, load_profile
from bentospec.schemas import SamplingOptions
from bentospec.verify import compare, greedy_tokens, run_profile
from tests.conftest import LoopThread

#: A cost curve where verifying a token costs a fifth of a step's fixed part.
COST = ((1, 10.0), (2, 12.0), (100, 208.0))
LOSSLESS_TOKENS = 48


def test_expected_tokens_is_the_geometric_bound() -> None:
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 4) == 5.0


def test_step_time_interpolates_and_extends_the_measured_points() -> None:
    cost = ((1, 10.0), (11, 20.0), (21, 40.0))
    assert step_time(cost, 1) == 10.0
    assert step_time(cost, 6) == 15.0
    assert step_time(cost, 16) == 30.0
    assert step_time(cost, 31) == 60.0  # beyond the last point: the last slope
    assert step_time(cost, 0) == 9.0  # below the first: the first slope


def test_high_acceptance_drafts_everything_low_acceptance_nothing() -> None:
    assert choose_ks([0.9], [5], COST) == [5]
    assert choose_ks([0.05], [5], COST) == [0]
    # Each row's k stops where its next token's a^j no longer pays for itself.
    ks = choose_ks([0.9, 0.7, 0.1], [5, 5, 5], COST)
    assert ks[0] == 5 and 0 < ks[1] < 5 and ks[2] == 0


def test_a_costlier_batch_drafts_less() -> None:
    cheap = ((1, 10.0), (100, 50.0))
    dear = ((1, 10.0), (100, 500.0))
    assert sum(choose_ks([0.6] * 8, [5] * 8, cheap)) > sum(choose_ks([0.6] * 8, [5] * 8, dear))


def test_k_never_exceeds_the_available_draft() -> None:
    assert choose_ks([0.99, 0.99], [2, 0], COST) == [2, 0]


def _feed(policy: AdaptivePolicy, rows: list[Row]) -> tuple[list[int], list[str]]:
    ks, decisions = policy.step(rows)
    return ks, list(decisions)


def test_interleaved_requests_never_share_an_estimate() -> None:
    """Two requests swap rows between steps (the batch is condensed): each keeps its own."""
    policy = AdaptivePolicy(cost=COST)
    good, bad = "req-good", "req-bad"
    _feed(policy, [Row(good, 1, 0, 5), Row(bad, 1, 0, 5)])
    for step in range(12):
        # Row order alternates; the good request accepts all 5 drafts, the bad one none.
        rows = [Row(good, 6, 5, 5), Row(bad, 1, 5, 5)]
        _feed(policy, rows if step % 2 else rows[::-1])
        # A third request comes and goes in between, taking row 0 sometimes.
        if step == 5:
            _feed(policy, [Row("req-new", 1, 0, 5), Row(bad, 1, 0, 5), Row(good, 1, 0, 5)])
    assert policy.states[good].rate > 0.9
    assert policy.states[bad].rate < 0.1
    assert "req-new" not in policy.states  # finished requests are forgotten
    ks, _ = _feed(policy, [Row(bad, 1, 0, 5), Row(good, 1, 0, 5)])
    assert ks == [0, 5]


def test_paused_request_is_probed_again() -> None:
    policy = AdaptivePolicy(cost=COST)
    decision = "draft"
    for _ in range(10):  # every draft rejected, until the request is paused
        decision = policy.step([Row("r", 1, 5, 5)])[1][0]
        if decision == "paused":
            break
    assert decision == "paused"
    decisions = [policy.step([Row("r", 1, 0, 5)])[1][0] for _ in range(PROBE_INTERVAL - 1)]
    assert decisions[:-1] == ["paused"] * (PROBE_INTERVAL - 2)
    assert decisions[-1] == "probe"
    # The probe's drafts were all accepted: the request drafts again at once.
    ks, decisions = policy.step([Row("r", 6, 5, 5)])
    assert policy.states["r"].rate > 0.5 and decisions == ["draft"] and ks[0] > 0


def test_request_switched_off_never_drafts() -> None:
    policy = AdaptivePolicy(cost=COST)
    for _ in range(PROBE_INTERVAL + 2):
        ks, decisions = policy.step([Row("r", 6, 0, 5, off=True)])
        assert ks == [0] and decisions == ["off"]


def test_rows_without_a_match_or_still_prefilling_are_not_counted_as_paused() -> None:
    policy = AdaptivePolicy(cost=COST)
    ks, decisions = policy.step([Row("prefill", 0, 0, 0), Row("nomatch", 1, 0, 0)])
    assert ks == [0, 0] and decisions == ["none", "none"]


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


def test_a_new_request_is_measured_before_it_is_paused() -> None:
    """At a cost where the prior (a=0.5) does not pay, new requests still verify one draft."""
    dear = ((1, 10.0), (100, 500.0))
    assert choose_ks([0.5] * 6, [5] * 6, dear) == [0] * 6
    policy = AdaptivePolicy(cost=dear)
    ks, decisions = policy.step([Row(f"r{i}", 1, 0, 5) for i in range(6)])
    assert ks == [5] * 6 and decisions == ["probe"] * 6
    ks, decisions = policy.step([Row(f"r{i}", 1, 0, 5) for i in range(6)])
    assert ks == [0] * 6 and decisions == ["paused"] * 6
