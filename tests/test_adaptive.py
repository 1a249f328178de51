"""The adaptive proposer's decision logic (no engine), its profile, and its engine (lossless)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bentospec.adaptive import (
    PROBE_INTERVAL,
    PROBE_TOKENS,
    AdaptivePolicy,
    AdaptiveSettings,
    Row,
    StepCost,
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


def curve(cost: tuple[tuple[int, float], ...]) -> Callable[[float], float]:
    return lambda tokens: step_time(cost, tokens)


class Clock:
    """The seconds a policy is called at: one step of ``ms`` per call."""

    def __init__(self) -> None:
        self.now = 0.0

    def tick(self, ms: float = 10.0) -> float:
        self.now += ms / 1000.0
        return self.now


def policy_at(cost: tuple[tuple[int, float], ...]) -> tuple[AdaptivePolicy, Clock]:
    return AdaptivePolicy(cost=StepCost(prior=cost)), Clock()


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
    assert choose_ks([0.9], [5], curve(COST)) == [5]
    assert choose_ks([0.05], [5], curve(COST)) == [0]
    # Each row's k stops where its next token's a^j no longer pays for itself.
    ks = choose_ks([0.9, 0.7, 0.1], [5, 5, 5], curve(COST))
    assert ks[0] == 5 and 0 < ks[1] < 5 and ks[2] == 0


def test_a_costlier_batch_drafts_less() -> None:
    cheap = ((1, 10.0), (100, 50.0))
    dear = ((1, 10.0), (100, 500.0))
    assert sum(choose_ks([0.6] * 8, [5] * 8, curve(cheap))) > sum(
        choose_ks([0.6] * 8, [5] * 8, curve(dear))
    )


def test_k_never_exceeds_the_available_draft() -> None:
    assert choose_ks([0.99, 0.99], [2, 0], curve(COST)) == [2, 0]


def _feed(policy: AdaptivePolicy, clock: Clock, rows: list[Row]) -> tuple[list[int], list[str]]:
    """One step that took what the prior curve says for the tokens it verified."""
    verified = sum(1 + row.verified_drafts for row in rows)
    ks, decisions = policy.step(rows, clock.tick(step_time(policy.cost.prior, verified)))
    return ks, list(decisions)


def test_interleaved_requests_never_share_an_estimate() -> None:
    """Two requests swap rows between steps (the batch is condensed): each keeps its own."""
    policy, clock = policy_at(COST)
    good, bad = "req-good", "req-bad"
    _feed(policy, clock, [Row(good, 1, 0, 5), Row(bad, 1, 0, 5)])
    for step in range(12):
        # Row order alternates; the good request accepts all 5 drafts, the bad one none.
        rows = [Row(good, 6, 5, 5), Row(bad, 1, 5, 5)]
        _feed(policy, clock, rows if step % 2 else rows[::-1])
        # A third request comes and goes in between, taking row 0 sometimes.
        if step == 5:
            _feed(policy, clock, [Row("req-new", 1, 0, 5), Row(bad, 1, 0, 5), Row(good, 1, 0, 5)])
    assert policy.states[good].rate > 0.9
    assert policy.states[bad].rate < 0.1
    assert "req-new" not in policy.states  # finished requests are forgotten
    ks, _ = _feed(policy, clock, [Row(bad, 1, 0, 5), Row(good, 1, 0, 5)])
    assert ks == [0, 5]


def test_paused_request_is_probed_again_with_one_token() -> None:
    policy, clock = policy_at(COST)
    decision = "draft"
    for _ in range(10):  # every draft rejected, until the request is paused
        decision = _feed(policy, clock, [Row("r", 1, 5, 5)])[1][0]
        if decision == "paused":
            break
    assert decision == "paused"
    steps = [_feed(policy, clock, [Row("r", 1, 0, 5)]) for _ in range(PROBE_INTERVAL - 1)]
    assert [d[0] for _, d in steps[:-1]] == ["paused"] * (PROBE_INTERVAL - 2)
    assert steps[-1] == ([PROBE_TOKENS], ["probe"])
    # A rejected probe waits the full interval again.
    assert _feed(policy, clock, [Row("r", 1, 1, 5)]) == ([0], ["paused"])


def test_accepted_probes_follow_each_other_until_the_request_drafts() -> None:
    policy, clock = policy_at(((1, 10.0), (100, 500.0)))  # one accepted token does not pay
    for _ in range(8):  # every draft rejected: the estimate is low
        _feed(policy, clock, [Row("r", 1, 5, 5)])
    while _feed(policy, clock, [Row("r", 1, 0, 5)])[1] != ["probe"]:
        pass
    # The request copies again: each accepted probe brings the next at once, then drafts.
    decisions = [_feed(policy, clock, [Row("r", 2, 1, 5)])[1][0] for _ in range(5)]
    assert decisions[0] == "probe" and "draft" in decisions
    assert policy.states["r"].rate > 0.5


def test_request_switched_off_never_drafts() -> None:
    policy, clock = policy_at(COST)
    for _ in range(PROBE_INTERVAL + 2):
        ks, decisions = _feed(policy, clock, [Row("r", 6, 0, 5, off=True)])
        assert ks == [0] and decisions == ["off"]


def test_rows_without_a_match_or_still_prefilling_are_not_counted_as_paused() -> None:
    policy, clock = policy_at(COST)
    ks, decisions = _feed(policy, clock, [Row("prefill", 0, 0, 0), Row("nomatch", 1, 0, 0)])
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
    assert choose_ks([0.5] * 6, [5] * 6, curve(dear)) == [0] * 6
    policy, clock = policy_at(dear)
    ks, decisions = _feed(policy, clock, [Row(f"r{i}", 1, 0, 5) for i in range(6)])
    assert ks == [PROBE_TOKENS] * 6 and decisions == ["probe"] * 6
    ks, decisions = _feed(policy, clock, [Row(f"r{i}", 1, 1, 5) for i in range(6)])
    assert ks == [0] * 6 and decisions == ["paused"] * 6


#: The prior curve of the step-cost tests: a step's fixed part is 100 ms, a token 10 ms.
PRIOR = ((1, 100.0), (101, 1100.0))


def _engine_ms(rows: int, drafts: int) -> float:
    """A host twice as slow as the prior on plain steps, where drafts cost a quarter of it."""
    return 2.0 * (step_time(PRIOR, rows) + 0.25 * 10.0 * drafts)


def test_step_cost_learns_the_hosts_speed_and_draft_cost_from_step_times() -> None:
    cost = StepCost(prior=PRIOR)
    assert (cost.speed, cost.draft_ratio) == (1.0, 1.0)
    for step in range(200):
        rows, drafts = 4 + step % 8, (step % 3) * 5
        cost.observe(rows, rows + drafts, _engine_ms(rows, drafts))
    assert cost.speed == pytest.approx(2.0, rel=0.02)
    assert cost.draft_ratio == pytest.approx(0.25, rel=0.05)
    # At this measured price, drafts that did not pay on the prior curve now do.
    rates, available = [0.3] * 8, [5] * 8
    assert sum(choose_ks(rates, available, curve(PRIOR))) == 0
    assert sum(choose_ks(rates, available, lambda n: cost.time(8, n))) > 0


def test_one_stalled_step_does_not_swing_the_estimate() -> None:
    cost = StepCost(prior=PRIOR)
    for _ in range(50):
        cost.observe(4, 4, step_time(PRIOR, 4))
    cost.observe(4, 4, 1000 * step_time(PRIOR, 4))
    assert cost.speed < 1.2


def test_only_steps_in_which_every_row_was_decoding_are_timed() -> None:
    policy, clock = policy_at(PRIOR)
    _feed(policy, clock, [Row("a", 0, 0, 0), Row("b", 0, 0, 0)])  # both prefill
    policy.step([Row("a", 1, 0, 5), Row("b", 0, 0, 0)], clock.tick(500))  # b still prefills
    policy.step([Row("a", 1, 0, 5), Row("b", 1, 0, 5)], clock.tick(500))  # b's last chunk
    assert policy.cost.speed_sums == StepCost(prior=PRIOR).speed_sums
    # A request arrives (its prefill is in the step) and after an idle minute another one.
    policy.step([Row("a", 1, 0, 5), Row("b", 1, 0, 5), Row("c", 1, 0, 5)], clock.tick(500))
    policy.step([Row("d", 1, 0, 5)], clock.tick(60_000))
    assert policy.cost.speed_sums == StepCost(prior=PRIOR).speed_sums
    # Two steady steps of d alone, at the prior's speed, twice: counted.
    policy.step([Row("d", 1, 0, 5)], clock.tick(step_time(PRIOR, 1)))
    policy.step([Row("d", 1, 0, 5)], clock.tick(step_time(PRIOR, 1)))
    assert policy.cost.speed_sums != StepCost(prior=PRIOR).speed_sums
    assert policy.cost.speed == pytest.approx(1.0)
